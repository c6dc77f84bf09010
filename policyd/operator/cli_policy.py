"""The policy's commands: check, show, explain, apply (plain or on trial),
confirm, rollback and restore. Each parses its arguments, calls the module that
decides (policy, compile, trial, explain) and prints the outcome.
"""
import os
import select
import shlex
import sys
import time

import click

from policyd.operator.cli_common import (Duration, ask_daemon, compile_policy, explain_mod, format_time,
                                handle_errors, policy_argument, policy_mod, policystore,
                                preflight, render, tell_daemon, trial)
from policyd.errors import InputError, KernelError, PolicydError
from policyd.operator.gcpause import collector_paused


@click.command()
@policy_argument
@click.pass_obj
@handle_errors
def check(obj, policy_path):
    """Validate and compile POLICY, load its filters; print nothing but errors."""
    policy = policy_mod.load(policy_path)
    preflight.check_log_sources(policy)
    document = compile_policy(policy).document()
    try:
        nft = obj.nft()
    except (ImportError, OSError):
        return  # no libnftables here: the compile above is as far as we can prove
    try:
        nft.check(document)
    except KernelError as exc:
        if "Operation not permitted" in str(exc):
            return  # a non-root check validates everything but the kernel's say
        raise InputError(f"the kernel would refuse it: {exc}", policy_path) from None


@click.command()
@policy_argument
@handle_errors
def show(policy_path):
    """Print the nftables ruleset that apply would load."""
    click.echo(render.to_text(compile_policy(policy_mod.load(policy_path))), nl=False)


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="[POLICY] SRC PORT")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--iface", help="The interface the connection arrives on.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: verdict, rule.")
@click.pass_obj
@handle_errors
def explain(obj, args, proto, iface, as_json):
    """Say allow, drop, reject or banned for SRC connecting to PORT, and which rule decides."""
    from policyd.addr import parse_host
    if len(args) == 2 and parse_host(args[0]) is None and parse_host(args[1]) is not None:
        # `explain policy.yaml 203.0.113.66`: the port was forgotten, not the address.
        raise InputError(f"missing after {args[1]}: which port? "
                         "(usage: policyd explain [POLICY] SRC PORT)", key="PORT")
    if len(args) == 2:
        policy_path, (src, port_text) = policy_mod.DEFAULT_POLICY, args
    elif len(args) == 3:
        policy_path, src, port_text = args
    else:
        raise InputError("usage: policyd explain [POLICY] SRC PORT", key="arguments")
    address = parse_host(src)
    if address is None:
        raise InputError(f"{src!r} is not an IP address", key="SRC")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InputError(f"{port_text!r} is not a port", key="PORT")
    policy = policy_mod.load(policy_path)
    decision = explain_mod.decide(policy, address, int(port_text), proto, iface,
                                  _live_bans(obj, policy, address))
    if as_json:
        import json
        click.echo(json.dumps({"verdict": decision.verdict, "rule": decision.rule}))
    else:
        click.echo(f"{decision.verdict}\t{decision.rule}")


def _live_bans(obj, policy, address=None):
    """The kernel's bans, or none where the kernel cannot be asked. With `address`,
    one element lookup first: listing 100k bans for an address not banned costs
    seconds (policyd.operator.explain_bans)."""
    from policyd.operator import explain_bans
    if address is not None:
        found = explain_bans.lookup(policy, address)
        if found is not explain_bans.UNKNOWN:
            return found
    try:
        from policyd.kernel.nft import BanTable
        return list(BanTable(obj.nft(), policy.bans_table, policy.bans.ipv6_prefix)
                    .list_bans().items())
    except (ImportError, OSError, KernelError):
        return []


@click.command()
@policy_argument
@click.option("--confirm-timeout", type=Duration(1, 86400), metavar="DURATION",
              help="Load on trial: unless `policyd confirm` runs within DURATION (120, "
                   "90s, 2m, 1h), the kernel puts the previous policy back by itself.")
@click.option("--wait", is_flag=True,
              help="With --confirm-timeout: stay, ask to keep the policy, roll back "
                   "on anything but y or at the deadline.")
@click.option("--force", is_flag=True,
              help="Apply even if the policy would cut your SSH session or an "
                   "established connection on a guarded port.")
@click.pass_obj
@handle_errors
@collector_paused
def apply(obj, policy_path, confirm_timeout, wait, force):
    """Load POLICY atomically and make it the committed policy (or try it, on a timer)."""
    nft, store = obj.nft(), policystore.PolicyStore(obj.state_dir)
    if confirm_timeout is None:
        if wait:
            raise InputError("needs --confirm-timeout", key="--wait")
        from policyd.policy import lists
        with lists.stored_later():  # the list cache after the kernel has the policy
            policy, previous = trial.apply_tables(nft, store, policy_path, force=force)
        tell_daemon(obj, "plain")
        if previous is not None and previous[1] != policy.bans_table:
            _move_bans(obj, nft, previous[1])
        click.echo(f"applied {policy.source} (sha256 {policy.digest[:12]})")
        return
    pending = trial.start_trial(nft, store, policy_path, confirm_timeout, force=force)
    tell_daemon(obj, "trial")
    click.echo(f"on trial: {pending.source} (sha256 {pending.sha256[:12]}) until "
               f"{format_time(pending.deadline)} ({pending.seconds}s); "
               "unconfirmed, the previous policy comes back by itself")
    if not wait:
        click.echo(f"keep it:  {_policyd_command(obj, 'confirm')}")
        click.echo(f"undo now: {_policyd_command(obj, 'rollback')}")
        return
    answer = _ask_until("Keep this policy? [y/N] ", pending.deadline)
    if answer is not None and answer.strip().lower() in ("y", "yes"):
        policy = trial.confirm(nft, store)
        tell_daemon(obj, "confirm")
        click.echo(f"confirmed: {policy.source} (sha256 {policy.digest[:12]}) is committed")
        return
    trial.rollback(nft, store)
    tell_daemon(obj, "rollback")
    reason = "no answer before the deadline" if answer is None else "not confirmed"
    raise trial.TrialRefused(f"{reason}: rolled back to the committed policy")


def _move_bans(obj, nft, old_bans_table):
    """After `table:` changed: a running daemon moves the bans itself when it reloads;
    without one, put them into the new ban table here, then retire the old one."""
    if ask_daemon(obj, "reload") is not None:
        return
    from policyd.operator import bandesk
    bandesk.offline(obj.state_dir, lambda desk: desk.bans.restore())
    trial.retire_table(nft, old_bans_table)


def _policyd_command(obj, command):
    """The command line an operator types next, with this run's --state-dir if it is not
    the default, so that copying it reaches the same trial."""
    words = ["policyd"]
    if obj.state_dir != "/var/lib/policyd":
        words += ["--state-dir", obj.state_dir]
    return shlex.join(words + [command])


def _ask_until(prompt, deadline):
    """One line from stdin, "" at end of input, None if the deadline came first.

    A hung-up terminal sends SIGHUP and ends this process: the kernel's timer
    then does the rollback, which is the point of keeping the timer there.
    """
    click.echo(prompt, nl=False)
    fd, line = sys.stdin.fileno(), b""
    while True:
        left = deadline - time.time()
        if left <= 0:
            click.echo()
            return None
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            return ""
        line += chunk
        if not chunk or b"\n" in line:
            return line.decode("utf-8", "replace")


@click.command()
@click.pass_obj
@handle_errors
@collector_paused
def confirm(obj):
    """Keep the policy on trial: it becomes the committed policy."""
    policy = trial.confirm(obj.nft(), policystore.PolicyStore(obj.state_dir))
    tell_daemon(obj, "confirm")
    click.echo(f"confirmed: {policy.source} (sha256 {policy.digest[:12]}) is committed")


@click.command()
@click.pass_obj
@handle_errors
@collector_paused
def rollback(obj):
    """End the trial now: reload the committed policy."""
    store = policystore.PolicyStore(obj.state_dir)
    ended = trial.rollback(obj.nft(), store)
    tell_daemon(obj, "rollback")
    committed = store.committed()
    kept = (f"{committed.source} (sha256 {committed.digest[:12]})" if committed
            else "nothing committed, nothing guarded")
    what = (f"ended the trial of {ended.source}" if ended
            else "ended the kernel's trial (its record was lost)")
    click.echo(f"rolled back: {what}; loaded {kept}")


@click.command()
@click.pass_obj
@handle_errors
def restore(obj):
    """Load the committed policy and the recorded bans if policyd's tables are gone.

    At boot, before the network: a reboot is a rollback, and bans are enforced
    before the first packet arrives rather than when the daemon is up.
    When the tables are there (a service restart, not a boot) the kernel keeps
    what it has, a trial included; only a trial past its deadline is ended.
    """
    nft, store = obj.nft(), policystore.PolicyStore(obj.state_dir)
    committed = store.committed()
    if committed is not None and {committed.table, committed.bans_table} <= set(nft.tables()):
        trial.enforce(nft, store)
        kept = "the trial" if store.pending() else "the committed policy"
        click.echo(f"tables in place: kept {kept}")
        return
    if committed is None:
        trial.restore_committed(nft, store)  # a first trial's candidate goes
        tell_daemon(obj, "restore")
        click.echo("nothing committed: no policy loaded")
        return
    from policyd.operator import bandesk

    def with_bans(desk):
        # The recorded bans go in the transaction that loads the tables: never
        # a ban table without its bans, not even for a moment.
        in_force = desk.bans.in_force_now()
        return trial.restore_committed(nft, store, lambda: in_force), len(in_force)

    try:
        policy, bans = bandesk.offline(obj.state_dir, with_bans)
    except PolicydError:
        # No bans to read (a damaged state file): the policy goes in all the same.
        trial.restore_committed(nft, store)
        raise
    finally:
        tell_daemon(obj, "restore")
    click.echo(f"restored {policy.source} (sha256 {policy.digest[:12]}) and {bans} bans")


COMMANDS = (check, show, explain, apply, confirm, rollback, restore)
