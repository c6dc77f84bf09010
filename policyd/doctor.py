"""`policyd doctor`: small checks of the host, each returning findings with a fix.

Owns the diagnosis only; every fact comes from an environment object (the real
host's is policyd.hostenv.HostEnvironment), so tests can fake sock_diag, the
kernel and files; policyd.tableshape compares tables.

JSON form (`policyd doctor --json`), stable:
    {"ok": bool,            # true when every finding is "ok"
     "findings": [{"level": "ok" | "warn" | "fail",
                   "check": "listener" | "interface" | "log" | "filter" | "table" |
                            "drift" | "trial" | "committed" | "nftables-service" |
                            "daemon" | "policy-file" | "fleet",
                   "message": str,   # what was found, one line
                   "fix": str}]}     # what to do about it; "" for "ok"
Text form: one line per finding, "LEVEL CHECK: MESSAGE" plus "; fix: FIX" for
warn and fail. Exit code 0 when all is ok, 1 when anything is warn or fail.
"""
import hashlib
import ipaddress
import json
import os
from dataclasses import asdict, dataclass

from policyd.compile import compile_policy
from policyd.ruleset import FAMILY
from policyd.errors import InputError, KernelError
from policyd.policystore import COMMITTED
from policyd.tableshape import compare_shapes, table_shape
from policyd.trial import empty_policy

OK, WARN, FAIL = "ok", "warn", "fail"
# The packaged unit hides these from the daemon (ProtectHome=yes, PrivateTmp=yes).
HIDDEN_FROM_DAEMON = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")
MAX_DIFFERENCES_SHOWN = 5


@dataclass(frozen=True)
class Finding:
    level: str
    check: str
    message: str
    fix: str = ""


def ok(check, message):
    return Finding(OK, check, message)


def warn(check, message, fix):
    return Finding(WARN, check, message, fix)


def fail(check, message, fix):
    return Finding(FAIL, check, message, fix)


# --- the whole diagnosis --------------------------------------------------

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


def all_ok(findings):
    return all(f.level == OK for f in findings)


def exit_code(findings):
    return 0 if all_ok(findings) else 1


def to_json(findings):
    return json.dumps({"ok": all_ok(findings), "findings": [asdict(f) for f in findings]})


def to_text(findings):
    lines = []
    for f in findings:
        line = f"{f.level:<4} {f.check}: {f.message}"
        if f.fix:
            line += f"; fix: {f.fix}"
        lines.append(line)
    return "\n".join(lines)


# --- listeners -----------------------------------------------------------

def check_listeners(policy, env, table, guard_loaded):
    """Who listens on each guarded port, and whether that is the whole world."""
    findings = []
    # A port the policy opens to `any` is meant for the world (a proxy in front
    # of Ollama): a wildcard listener there is the set-up, not a finding.
    public = {(s.proto, port): s.name for s in policy.services if s.allow_any
              for port in s.ports}
    for proto in ("tcp", "udp"):
        ports = sorted({port for p, port in policy.guarded() if p == proto})
        if not ports:
            continue
        try:
            found = env.listeners(ports, proto)
        except OSError as exc:
            return findings + [warn("listener", f"cannot list listening sockets ({exc})",
                                    "run `policyd doctor` as root so sock_diag answers")]
        owners = env.socket_owners({l.inode for l in found}) if found else {}
        for port in ports:
            here = sorted({(str(l.address), l.inode) for l in found if l.port == port})
            if not here:
                findings.append(ok("listener", f"{proto}/{port}: nothing listens"))
                continue
            for address, inode in here:
                if (proto, port) in public:
                    findings.append(_public_listener_finding(
                        port, ipaddress.ip_address(address), owners.get(inode, ()), proto,
                        public[(proto, port)]))
                    continue
                findings.append(_listener_finding(port, ipaddress.ip_address(address),
                                                  owners.get(inode, ()), table, guard_loaded,
                                                  proto))
    return findings


def _listener_finding(port, address, owners, table, guard_loaded, proto="tcp"):
    who = ", ".join(f"{name} (pid {pid})" for pid, name in owners) or "a socket"
    shown = f"[{address}]" if address.version == 6 else str(address)
    if address.is_loopback:
        return ok("listener", f"{proto}/{port}: {who} listens on {shown}:{port} (this host only)")
    if not address.is_unspecified:
        return ok("listener", f"{proto}/{port}: {who} listens on {shown}:{port} only")
    if guard_loaded:
        # Sharing a port with a LAN needs a wildcard listener (loopback clients
        # too); with the table loaded that is the set-up, and table/drift say
        # when it is not. The advice stays in the message.
        return ok("listener", f"{proto}/{port}: {who} listens on {shown}:{port}; policyd's "
                  f"table {FAMILY} {table} (loaded) admits only the allow list (bind it to "
                  "127.0.0.1 if only this host needs it)")
    if guard_loaded is None:
        guard = "whether policyd's table is loaded could not be read"
    else:
        guard = (f"policyd's table {FAMILY} {table} is NOT loaded: nothing stands "
                 "between it and the network")
    scope = ("every IPv4 address" if address.version == 4
             else "every IPv6 address, and IPv4 too unless it is IPV6_V6ONLY")
    return warn("listener", f"{proto}/{port}: {who} listens on {shown}:{port}, {scope}; {guard}",
                _listener_fix(port, {name for _pid, name in owners}))


def _public_listener_finding(port, address, owners, proto, service):
    who = ", ".join(f"{name} (pid {pid})" for pid, name in owners) or "a socket"
    shown = f"[{address}]" if address.version == 6 else str(address)
    return ok("listener", f"{proto}/{port}: {who} listens on {shown}:{port}; service {service} "
              "allows any source there (bans still apply)")


def _listener_fix(port, names):
    if "docker-proxy" in names:
        return (f"publish the port on loopback only (`-p 127.0.0.1:{port}:{port}`, or "
                f"\"127.0.0.1:{port}:{port}\" under ports: in compose) if only this host's "
                "proxy needs it; otherwise keep policyd's table loaded")
    if "ollama" in names:
        return (f"`systemctl edit ollama` and set Environment=OLLAMA_HOST=127.0.0.1:{port} "
                "if only this host's proxy talks to it; otherwise keep policyd's table loaded")
    return (f"bind it to 127.0.0.1:{port} (or the one address its clients use) if other "
            "hosts need not reach it; otherwise keep policyd's table loaded")


# --- interfaces ----------------------------------------------------------

def check_interfaces(policy, env):
    """Every `iface:` allow names an interface that exists (a `wg*` pattern: any match)."""
    named = sorted({(iface, s.name) for s in policy.services for iface in s.allow_interfaces})
    if not named:
        return []
    try:
        present = set(env.interfaces())
    except OSError as exc:
        return [warn("interface", f"cannot list network interfaces ({exc})",
                     "run `policyd doctor` on the host itself, as root")]
    findings = []
    for iface, service in named:
        if iface.endswith("*"):
            exists = any(name.startswith(iface[:-1]) for name in present)
        else:
            exists = iface in present
        if exists:
            findings.append(ok("interface", f"{iface} (service {service}) exists"))
        else:
            findings.append(warn(
                "interface", f"{iface} (service {service}) does not exist: its allow "
                "matches nothing until it does",
                f"fix the name in services.{service}.allow (present: "
                f"{', '.join(sorted(present)) or 'none'}) or bring the interface up"))
    return findings


# --- logs and filters ----------------------------------------------------

def check_logs(policy, env):
    """Each log in bans.logs exists, root can read it, and the daemon's unit can see it."""
    findings = []
    for index, source in enumerate(policy.bans.logs):
        if source.journal:
            findings.append(check_journal(source, index, env))
            continue
        key = f"bans.logs[{index}].path"
        try:
            env.open_log(source.path)
        except FileNotFoundError:
            findings.append(warn(
                "log", f"{source.path} does not exist: the daemon waits for it and bans "
                "nothing from it until it appears",
                f"point {key} at the file the proxy writes (its access_log / log "
                "setting), or make the proxy log there"))
            continue
        except OSError as exc:
            findings.append(fail(
                "log", f"{source.path} cannot be read ({exc.strerror or exc})",
                f"make it a readable regular file (ls -l {source.path}) or fix {key}"))
            continue
        if source.path.startswith(HIDDEN_FROM_DAEMON):
            findings.append(warn(
                "log", f"{source.path} is readable here, but the packaged unit hides it "
                "from the daemon (ProtectHome=yes, PrivateTmp=yes)",
                "have the proxy log under /var/log, or add ReadOnlyPaths= for it with "
                "`systemctl edit policyd`"))
            continue
        findings.append(ok("log", f"file {source.path} is readable (filter {source.filter})"))
    return findings


def check_journal(source, index, env):
    """A `journal: UNIT` source: the journal can be read and holds entries of that unit."""
    from policyd.journal import probe
    where = f" in {source.journal_dir}" if source.journal_dir else ""
    state = getattr(env, "journal_probe", probe)(source.journal, source.journal_dir)
    name = f"journal {source.journal}{where}"
    if not state["readable"]:
        return fail("log", f"{name} cannot be read ({state['error']})",
                    "run as root; for a journal outside /var/log/journal and /run/log/journal "
                    f"set bans.logs[{index}].journal_dir")
    if not state["entries"]:
        return warn("log", f"{name} is readable but holds no entry of that unit yet",
                    f"check the unit name with `journalctl -u {source.journal}` (Debian's "
                    "OpenSSH unit is ssh.service; policyd matches _SYSTEMD_UNIT, not aliases)")
    age = max(0, round(env.now() - state["last"]))
    return ok("log", f"{name} is readable, last entry {age}s ago (filter {source.filter})")


def check_filters(policy, env):
    """Each filter named in bans.logs loads; a daemon with a broken filter will not start."""
    findings = []
    for name in sorted({source.filter for source in policy.bans.logs}):
        try:
            env.load_filter(name)
        except InputError as exc:
            findings.append(fail(
                "filter", f"filter {name!r} does not load: {exc}",
                "name a shipped filter (see /usr/share/policyd/filters) in "
                "bans.logs[].filter, or fix the filter file"))
        else:
            findings.append(ok("filter", f"filter {name!r} loads"))
    return findings


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


def check_daemon_logs(env):
    """Logs the running daemon reports it cannot follow (a filter that stopped loading,
    a path that cannot be read), from its own status; nothing when no daemon answers."""
    status = env.daemon_status()
    if not status:
        return []
    return [fail("log", f"the daemon does not follow {entry.get('path')}: {entry['error']}",
                 "fix the filter or the path, then `policyd apply` (or `systemctl reload "
                 "policyd` if the policy itself did not change)")
            for entry in status.get("logs", []) if entry.get("error")]


def policy_or_committed(path, store, explicit):
    """The Policy doctor diagnoses and any finding about the file itself.

    Without a policy file at the default path the committed policy is what runs:
    diagnose that and say so, rather than refuse (exit 2) on a host that works.
    A POLICY named on the command line must exist.
    """
    from policyd import policy as policy_mod
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


def check_nftables_service(env):
    links = env.nftables_service_links()
    if not links:
        return [ok("nftables-service", "nftables.service is not enabled")]
    return [warn(
        "nftables-service", f"Debian's nftables.service is enabled ({links[0]}): stopping "
        "it flushes the whole ruleset, and the stock /etc/nftables.conf's `flush ruleset` "
        "does the same on every start and reload; the daemon puts its tables and bans "
        "back, but there is a short gap without them",
        "keep policyd's unit After=nftables.service (the packaged one is) and, in "
        "/etc/nftables.conf, replace `flush ruleset` by deleting only your own tables "
        "(`table inet filter` then `delete table inet filter`); or, if that file holds "
        "nothing you need, `systemctl disable nftables` (without --now: a stop flushes)")]


def check_kernel(features):
    """What the feature probe found (Nft.features): informational, policyd handles both."""
    how = {True: "DESTROYSETELEM present", False: "no DESTROYSETELEM (Linux < 6.3)",
           None: "DESTROYSETELEM unknown (no CAP_NET_ADMIN)"}[features["destroy_set_element"]]
    return [ok("kernel", f"Linux {features['kernel']}: {how}; a re-ban sets its new "
               f"timeout by {features['reban']} in one transaction")]


def check_daemon(env):
    path = env.control_socket_path()
    state = env.control_socket_state()
    if state == "listening":
        return [ok("daemon", f"the daemon answers on {path}")]
    if state == "denied":
        return [warn("daemon", f"cannot tell whether the daemon runs: {path} is root's",
                     "run `policyd doctor` as root")]
    if state == "stale":
        return [warn("daemon", f"{path} exists but nothing listens on it: the daemon died",
                     "`systemctl restart policyd`; `journalctl -u policyd` says why it stopped")]
    return [warn("daemon", f"the daemon is not running (no {path}): nothing bans, and "
                 "nothing restores the tables after a flush",
                 "`systemctl enable --now policyd`")]


def check_fleet(policy):
    """Redis reachable with this node's credentials, and its ACL as the README sets it."""
    if policy.fleet is None:
        return []
    from policyd.fleet_redis import doctor_findings
    return [Finding(level, "fleet", message, fix)
            for level, message, fix in doctor_findings(policy.fleet)]
