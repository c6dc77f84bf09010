"""`policyd doctor`: diagnose() runs every check and returns the findings, each with
a fix. Owns the checks of policyd's own state: the committed policy, a trial, the
kernel's tables and their drift. The host's checks: policyd.operator.doctor_host; the output
(text, JSON, exit code): policyd.operator.doctor_report; tables compared: policyd.operator.tableshape.
"""
import hashlib
import os

from policyd.rules.compile import compile_policy
from policyd.operator.doctor_host import (check_daemon, check_daemon_logs, check_filters, check_fleet,
                                 check_fleet_sandbox, check_interfaces, check_listeners,
                                 check_logs, check_nftables_service)
from policyd.operator.doctor_report import OK, exit_code, fail, ok, to_json, to_text, warn
from policyd.errors import InputError, KernelError
from policyd.policy.store import COMMITTED
from policyd.rules.model import FAMILY
from policyd.operator.tableshape import compare_shapes, table_shape
from policyd.kernel.trial import empty_policy

# What the CLI calls (policyd.operator.cli_views).
__all__ = ["diagnose", "policy_or_committed", "exit_code", "to_json", "to_text"]
MAX_DIFFERENCES_SHOWN = 5


def diagnose(policy, env):
    """Every finding about `policy` (the file the operator named) on this host."""
    findings = []
    committed, unreadable = _committed(policy, env)
    if unreadable is not None:
        findings.append(unreadable)
    pending = env.store.pending()
    # The kernel should hold the committed policy's tables (a trial cannot move them).
    expected = committed or (pending.policy() if pending is not None else policy)
    tables, kernel_error = _kernel_tables(env)
    guard_loaded = None if tables is None else expected.table in tables
    findings += check_listeners(policy, env, expected.table, guard_loaded)
    findings += check_interfaces(policy, env)
    findings += check_logs(policy, env)
    findings += check_filters(policy, env)
    findings += check_committed(policy, committed, pending, env, unreadable is not None)
    findings += check_trial(pending, env.now())
    if kernel_error is not None:
        fix = ("install python3-nftables" if isinstance(kernel_error, ImportError)
               else "run `policyd doctor` as root (it needs CAP_NET_ADMIN)")
        findings.append(fail("table", f"cannot read the kernel's nftables tables "
                             f"({kernel_error})", fix))
    else:
        findings += check_tables(expected, tables)
        findings += check_kernel(env.kernel_features())
        if guard_loaded:
            findings += check_drift(committed, pending, env)
    findings += check_nftables_service(env)
    daemon = check_daemon(env)
    findings += daemon
    if daemon[0].level == OK:
        findings += check_daemon_logs(env)
    findings += check_fleet_sandbox(policy, env)
    findings += check_fleet(policy)
    return findings


def _committed(policy, env):
    """The committed Policy (or None) and a finding if it cannot be read.

    When its bytes are the policy file's, the file's Policy stands in for it:
    validating a 100k-network allowlist twice costs seconds.
    """
    try:
        if hashlib.sha256((env.store.dir / COMMITTED).read_bytes()).hexdigest() == policy.digest:
            return policy, None
    except OSError:
        pass  # missing or unreadable: store.committed() below says which
    try:
        return env.store.committed(), None
    except InputError as exc:
        return None, fail("committed", f"the committed policy cannot be read: {exc}",
                          f"apply a good policy again: `policyd apply {policy.source}`")


def _kernel_tables(env):
    try:
        return set(env.kernel_tables()), None
    except (ImportError, OSError, KernelError) as exc:
        return None, exc


def policy_or_committed(path, store, explicit):
    """The Policy doctor diagnoses and any finding about the file itself.

    Without a policy file at the default path the committed policy is what runs:
    diagnose that and say so, rather than refuse (exit 2) on a host that works.
    A POLICY named on the command line must exist.
    """
    from policyd.policy import reader as policy_mod
    try:
        return policy_mod.load(path), []
    except InputError:
        if explicit or os.path.exists(path):
            raise
        committed = store.committed()
        if committed is None:
            raise
    origin = (store.meta() or {}).get("source") or committed.source
    return committed, [ok("policy-file", f"no policy file at {path}: diagnosing the committed "
                          f"policy (sha256 {committed.digest[:12]}, from {origin})")]


# --- the state dir: committed policy and trial ---------------------------

def check_committed(policy, committed, pending, env, unreadable):
    if unreadable:
        return []  # already reported as a fail
    held_back = env.store.held_back() if committed is None else None
    if held_back is not None:
        return [fail("committed", f"NOT ENFORCED: the daemon found nothing committed and did "
                     f"not load {held_back['source']}: {held_back['reason']}; nothing is "
                     "guarded and nobody is banned",
                     "allow that client in the policy (or accept cutting it), then "
                     f"`policyd apply --confirm-timeout 120 {held_back['source']}` and "
                     "`policyd confirm`; the running daemon takes it at once")]
    if committed is None:
        return [warn("committed", f"nothing is committed in {env.state_dir}: no policy "
                     "comes back after a reboot or a flush",
                     f"`policyd apply {policy.source}`")]
    if committed.digest == policy.digest:
        return [ok("committed", f"{policy.source} is the committed policy "
                   f"(sha256 {committed.digest[:12]})")]
    if pending is not None and pending.sha256 == policy.digest:
        return [ok("committed", f"{policy.source} is the policy on trial; "
                   f"the committed one is sha256 {committed.digest[:12]}")]
    origin = (env.store.meta() or {}).get("source") or committed.source
    return [warn("committed", f"{policy.source} differs from the committed policy "
                 f"(sha256 {committed.digest[:12]}, from {origin}): the daemon "
                 "runs the committed one",
                 f"`policyd apply --confirm-timeout 120 {policy.source}` then "
                 "`policyd confirm`, or plain `policyd apply`")]


def check_trial(pending, now):
    if pending is None:
        return [ok("trial", "no trial pending")]
    left = pending.deadline - now
    if left > 0:
        return [warn("trial", f"a trial of {pending.source} is pending: {int(left)}s left; "
                     "unconfirmed, the committed policy comes back by itself",
                     "`policyd confirm` to keep it, `policyd rollback` to end it now")]
    return [warn("trial", f"the trial of {pending.source} passed its deadline "
                 f"{int(-left)}s ago unconfirmed; the kernel runs the committed policy, "
                 "the record waits for the daemon to clear it",
                 "`policyd rollback` (or start the daemon) to clear the record")]


# --- the kernel: tables present and as committed -------------------------

def check_tables(expected, tables):
    findings = []
    for table, role, consequence in (
            (expected.table, "guard", "the guarded ports are open to every source"),
            (expected.bans_table, "ban", "no source is banned")):
        if table in tables:
            findings.append(ok("table", f"{role} table {FAMILY} {table} is loaded"))
        else:
            findings.append(fail(
                "table", f"{role} table {FAMILY} {table} is missing from the kernel: "
                f"{consequence}",
                "start or restart the daemon (`systemctl restart policyd`): it reloads "
                "the committed policy and every ban; `policyd restore` loads the tables "
                "without the bans"))
    return findings


def check_drift(committed, pending, env):
    """Compare the guard table's shape with what the committed policy (and a trial) load."""
    if committed is None and pending is None:
        return []  # nothing to compare with; check_committed says so
    trial_policy = pending.policy() if pending is not None else None
    base = committed or empty_policy(trial_policy.table)
    table = base.table
    if trial_policy is not None and trial_policy.table == table:
        ruleset = compile_policy(base, trial_policy, pending.seconds)
        what = "the committed policy with the trial"
    else:
        ruleset = compile_policy(base)
        what = "the committed policy"
    try:
        loaded = env.table_objects(table)
    except (OSError, KernelError) as exc:
        return [fail("drift", f"cannot list table {FAMILY} {table} ({exc})",
                     "run `policyd doctor` as root")]
    differences = compare_shapes(table_shape(ruleset.listed_objects(table)), table_shape(loaded))
    if not differences:
        return [ok("drift", f"table {FAMILY} {table} matches {what}")]
    shown = "; ".join(differences[:MAX_DIFFERENCES_SHOWN])
    if len(differences) > MAX_DIFFERENCES_SHOWN:
        shown += f"; and {len(differences) - MAX_DIFFERENCES_SHOWN} more"
    fix = ("`policyd rollback` ends the trial and reloads the committed policy"
           if pending is not None else
           "`policyd restore` reloads the committed policy (a running daemon does it too "
           "when it notices); make lasting changes in the policy file")
    return [fail("drift", f"table {FAMILY} {table} differs from {what}: {shown}", fix)]


def check_kernel(features):
    """What the feature probe found (Nft.features): informational, policyd handles both."""
    how = {True: "DESTROYSETELEM present", False: "no DESTROYSETELEM (Linux < 6.3)",
           None: "DESTROYSETELEM unknown (no CAP_NET_ADMIN)"}[features["destroy_set_element"]]
    return [ok("kernel", f"Linux {features['kernel']}: {how}; a re-ban sets its new "
               f"timeout by {features['reban']} in one transaction; reload: "
               f"{features.get('reload', 'whole table')}")]
