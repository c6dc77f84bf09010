"""Command line: parse arguments, call the owning module, print the result.

Kept thin on purpose; every decision lives in the modules it calls. Exit codes:
0 success, 1 the operation ran and said no, 2 the input is wrong.
"""
import functools
import importlib
import ipaddress
import json
import os
import select
import shlex
import sys
import time

import click

from policyd import __version__
from policyd.addr import parse_host
from policyd.errors import HostError, InputError, KernelError, PolicydError, Refused


class _OnFirstUse:
    """A module imported when a command first uses it: start-up is part of every
    command's time, and `policyd test-filter` needs no policy compiler or trials."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self._name), attribute)


explain_mod = _OnFirstUse("policyd.explain")
policy_mod = _OnFirstUse("policyd.policy")
preflight = _OnFirstUse("policyd.preflight")
render = _OnFirstUse("policyd.render")
trial = _OnFirstUse("policyd.trial")
policystore = _OnFirstUse("policyd.policystore")


def compile_policy(*args, **kwargs):
    from policyd.compile import compile_policy as compile_  # on first use, as above
    return compile_(*args, **kwargs)


class Context:
    def __init__(self, state_dir, run_dir):
        self.state_dir = state_dir
        self.run_dir = run_dir

    def nft(self):
        from policyd.nft import Nft  # libnftables only where the kernel is needed
        return Nft()


def handle_errors(func):
    """Every error meant for the operator: one line on stderr, and its exit code."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PolicydError as exc:
            click.echo(f"policyd: {exc.for_operator()}", err=True)
            sys.exit(exc.exit_code)
    return wrapper


policy_argument = click.argument("policy_path", metavar="[POLICY]", required=False,
                                 default=lambda: policy_mod.DEFAULT_POLICY)


class Duration(click.ParamType):
    """30s, 10m, 1h, 2d, 1w or bare seconds, as in the policy file, within [low, high]."""
    name = "duration"

    def __init__(self, low, high):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            seconds = value
        else:
            try:
                seconds = policy_mod.parse_duration(value)
            except InputError as exc:
                self.fail(exc.message, param, ctx)
        if not self.low <= seconds <= self.high:
            self.fail(f"{value} is not between {self.low}s and {self.high}s", param, ctx)
        return seconds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="policyd",
                      message="%(prog)s %(version)s")
@click.option("--state-dir", envvar="POLICYD_STATE_DIR", default="/var/lib/policyd",
              show_default=True, help="Committed policy, bans and log positions.")
@click.option("--run-dir", envvar="POLICYD_RUN_DIR", default="/run/policyd",
              show_default=True, help="Control socket and pid of the running daemon.")
@click.pass_context
def main(ctx, state_dir, run_dir):
    """policyd: guard Ollama's port with an nftables allowlist and bans."""
    ctx.obj = Context(state_dir, run_dir)
    # Parsed list files, by content (policyd.lists reads it when it first needs it;
    # importing that module here would slow every command's start).
    os.environ["POLICYD_LIST_CACHE"] = os.path.join(state_dir, "lists")


@main.command()
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


@main.command()
@policy_argument
@handle_errors
def show(policy_path):
    """Print the nftables ruleset that apply would load."""
    click.echo(render.to_text(compile_policy(policy_mod.load(policy_path))), nl=False)


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="[POLICY] SRC PORT")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--iface", help="The interface the connection arrives on.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: verdict, rule.")
@click.pass_obj
@handle_errors
def explain(obj, args, proto, iface, as_json):
    """Say allow, drop, reject or banned for SRC connecting to PORT, and which rule decides."""
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
        click.echo(json.dumps({"verdict": decision.verdict, "rule": decision.rule}))
    else:
        click.echo(f"{decision.verdict}\t{decision.rule}")


def _live_bans(obj, policy, address=None):
    """The kernel's bans, or none where the kernel cannot be asked. With `address`,
    one element lookup first: listing 100k bans for an address not banned costs
    seconds (policyd.explain_bans)."""
    from policyd import explain_bans
    if address is not None:
        found = explain_bans.lookup(policy, address)
        if found is not explain_bans.UNKNOWN:
            return found
    try:
        from policyd.nft import BanTable
        return list(BanTable(obj.nft(), policy.bans_table, policy.bans.ipv6_prefix)
                    .list_bans().items())
    except (ImportError, OSError, KernelError):
        return []


@main.command()
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
def apply(obj, policy_path, confirm_timeout, wait, force):
    """Load POLICY atomically and make it the committed policy (or try it, on a timer)."""
    nft, store = obj.nft(), policystore.PolicyStore(obj.state_dir)
    if confirm_timeout is None:
        if wait:
            raise InputError("needs --confirm-timeout", key="--wait")
        previous = store.committed()
        policy = trial.apply(nft, store, policy_path, force=force)
        _tell_daemon(obj, "plain")
        if previous is not None and previous.bans_table != policy.bans_table:
            _move_bans(obj, nft, previous.bans_table)
        click.echo(f"applied {policy.source} (sha256 {policy.digest[:12]})")
        return
    pending = trial.start_trial(nft, store, policy_path, confirm_timeout, force=force)
    _tell_daemon(obj, "trial")
    click.echo(f"on trial: {pending.source} (sha256 {pending.sha256[:12]}) until "
               f"{trial.format_time(pending.deadline)} ({pending.seconds}s); "
               "unconfirmed, the previous policy comes back by itself")
    if not wait:
        click.echo(f"keep it:  {_policyd_command(obj, 'confirm')}")
        click.echo(f"undo now: {_policyd_command(obj, 'rollback')}")
        return
    answer = _ask_until("Keep this policy? [y/N] ", pending.deadline)
    if answer is not None and answer.strip().lower() in ("y", "yes"):
        policy = trial.confirm(nft, store)
        _tell_daemon(obj, "confirm")
        click.echo(f"confirmed: {policy.source} (sha256 {policy.digest[:12]}) is committed")
        return
    trial.rollback(nft, store)
    _tell_daemon(obj, "rollback")
    reason = "no answer before the deadline" if answer is None else "not confirmed"
    raise trial.TrialRefused(f"{reason}: rolled back to the committed policy")


def _move_bans(obj, nft, old_bans_table):
    """After `table:` changed: a running daemon moves the bans itself when it reloads;
    without one, put them into the new ban table here, then retire the old one."""
    if _ask_daemon(obj, "reload") is not None:
        return
    from policyd import bandesk
    bandesk.offline(obj.state_dir, lambda desk: desk.bans.restore())
    trial.retire_table(nft, old_bans_table)


def _tell_daemon(obj, kind):
    """Let a running daemon count the change; the change itself is done already."""
    from policyd import control
    try:
        control.request(obj.run_dir, "applied", kind=kind)
    except (control.DaemonUnavailable, control.ControlError):
        pass


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


@main.command()
@click.pass_obj
@handle_errors
def confirm(obj):
    """Keep the policy on trial: it becomes the committed policy."""
    policy = trial.confirm(obj.nft(), policystore.PolicyStore(obj.state_dir))
    _tell_daemon(obj, "confirm")
    click.echo(f"confirmed: {policy.source} (sha256 {policy.digest[:12]}) is committed")


@main.command()
@click.pass_obj
@handle_errors
def rollback(obj):
    """End the trial now: reload the committed policy."""
    store = policystore.PolicyStore(obj.state_dir)
    ended = trial.rollback(obj.nft(), store)
    _tell_daemon(obj, "rollback")
    committed = store.committed()
    kept = (f"{committed.source} (sha256 {committed.digest[:12]})" if committed
            else "nothing committed, nothing guarded")
    what = (f"ended the trial of {ended.source}" if ended
            else "ended the kernel's trial (its record was lost)")
    click.echo(f"rolled back: {what}; loaded {kept}")


@main.command()
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
    policy = trial.restore_committed(nft, store)
    _tell_daemon(obj, "restore")
    if policy is None:
        click.echo("nothing committed: no policy loaded")
        return
    from policyd import bandesk
    bans = bandesk.offline(obj.state_dir, lambda desk: desk.bans.restore())
    click.echo(f"restored {policy.source} (sha256 {policy.digest[:12]}) and {bans} bans")


# ---------------------------------------------------------------- the daemon and its views

@main.command()
@policy_argument
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="Also serve Prometheus metrics over HTTP here: 127.0.0.1:PORT or "
                   "[::1]:PORT (loopback only; anything else is refused). Off by default.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info",
              show_default=True)
@click.pass_obj
@handle_errors
def run(obj, policy_path, metrics_listen, log_level):
    """The daemon: follow the logs, ban, keep the tables in place (systemd Type=notify).

    It always runs the COMMITTED policy (the one `policyd apply` or `confirm`
    last made committed); POLICY is not loaded over it. Only when nothing is
    committed yet (a fresh install) is POLICY (default /etc/policyd/policy.yaml)
    applied, as `policyd apply POLICY` would: after the anti-lockout lint. If it would cut a connected client, or
    does not load, nothing is enforced; status and doctor say why, and the
    daemon takes the first policy an operator applies. An edited POLICY takes
    effect only through `policyd apply`.
    """
    from policyd import daemon, logfmt, metrics
    if metrics_listen is not None:
        metrics.parse_listen(metrics_listen)  # refused before anything is touched
    logfmt.setup_logging(log_level.upper())
    daemon.run(policy_path, obj.state_dir, obj.run_dir, metrics_listen)


def _ask_daemon(obj, command, **args):
    """The daemon's answer, or None when no daemon runs here."""
    from policyd import control
    try:
        return control.request(obj.run_dir, command, **args)
    except control.DaemonUnavailable:
        return None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (see README).")
@click.pass_obj
@handle_errors
def status(obj, as_json):
    """Committed policy, trial and seconds left, bans, and each log's state."""
    result = _daemon_or(obj, "status", _status_without_daemon)
    click.echo(_as_json(result) if as_json else _format_status(result))


def _daemon_or(obj, command, without):
    """The daemon's answer to `command`, or without(obj) when no daemon runs here."""
    result = _ask_daemon(obj, command)
    return without(obj) if result is None else result


def _as_json(result):
    return json.dumps(result, indent=2, sort_keys=True)


def _status_without_daemon(obj):
    store = policystore.PolicyStore(obj.state_dir)
    nft = _nft_or_none(obj)
    result = {"daemon": None, "policy": trial.status(store, nft=nft), "bans": None, "logs": [],
              "fleet": None}
    committed = store.committed()
    if committed is not None and nft is not None:
        from policyd.nft import BanTable
        bans = BanTable(nft, committed.bans_table, committed.bans.ipv6_prefix).list_ban_keys()
        result["bans"] = {"active": len(bans), "total": None}
    if nft is not None:
        result["kernel"] = nft.features()
    return result


def _nft_or_none(obj):
    try:
        return obj.nft()
    except (ImportError, OSError):
        return None


def _policy_lines(policy):
    committed, held_back = policy["committed"], policy.get("held_back")
    if committed:
        return [f"policy:    {committed['source']} (sha256 {committed['sha256'][:12]}, "
                f"committed {trial.format_time(committed['committed_at'])})"]
    if not held_back:
        return ["policy:    nothing committed"]
    return [f"policy:    NOT ENFORCED: {held_back['source']} was not loaded: {held_back['reason']}",
            "           nothing is guarded and nobody is banned until you fix it and "
            "`policyd apply --confirm-timeout 120`"]


def _trial_line(policy):
    pending, ended = policy["trial"], policy.get("ended_trial")
    if pending:
        return (f"trial:     {pending['source']} (sha256 {pending['candidate_sha256'][:12]}), "
                f"{pending['seconds_left']}s left; policyd confirm | policyd rollback")
    if ended:
        return (f"trial:     none; the trial of {ended['source']} ended unconfirmed at "
                f"{trial.format_time(ended['deadline'])} and the committed policy is back")
    return "trial:     none"


def _format_status(result):
    lines = []
    daemon = result.get("daemon")
    lines.append(f"daemon:    running, pid {daemon['pid']}, up {daemon['uptime']}s"
                 if daemon else "daemon:    not running")
    for problem in (daemon or {}).get("problems", []):
        lines.append(f"problem:   {problem} (still enforcing what the kernel holds)")
    lines += _policy_lines(result["policy"])
    lines.append(_trial_line(result["policy"]))
    bans = result.get("bans")
    if bans:
        total = f", {bans['total']} since start" if bans.get("total") is not None else ""
        lines.append(f"bans:      {bans['active']} active{total}")
    kernel = result.get("kernel")
    if kernel:
        lines.append(f"kernel:    {kernel['kernel']}, re-ban by {kernel['reban']}")
    for entry in result.get("logs", []):
        state = "ok" if entry.get("exists") and not entry.get("error") else (
            f"NOT FOLLOWED: {entry['error']}" if entry.get("error") else "missing")
        lines.append(f"log:       {entry['path']} [{entry['filter']}] {state}, "
                     f"{entry['lines']} lines, {entry['matched']} failures, "
                     f"{entry['malformed']} malformed, {entry['rotations']} rotations")
    if result.get("fleet"):
        from policyd.fleet import status_line
        lines.append(status_line(result["fleet"]))
    for entry in result.get("lists", []):
        state = f"refused: {entry['error']}" if entry.get("error") else "ok"
        lines.append(f"list:      {entry['path']} {entry['entries']} entries, {state}")
    return "\n".join(lines)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON list (see README).")
@click.pass_obj
@handle_errors
def bans(obj, as_json):
    """Current bans: source, expiry, failure count, filter."""
    result = _daemon_or(obj, "bans", _bans_from_kernel)
    if as_json:
        click.echo(_as_json(result))
        return
    lines = []  # one write: 100k bans through click.echo one by one take seconds
    for ban in result:
        failures, name, reason = ban.get("failures"), ban.get("filter"), ban.get("reason")
        details = " ".join(part for part in (
            None if failures is None else f"failures={failures}",
            None if name is None else f"filter={name}",
            None if reason is None else f"reason={reason}") if part)
        lines.append(f"{ban['network']}\t{ban['seconds_left']}s left\t{details}\n")
    click.echo("".join(lines), nl=False)


def _bans_from_kernel(obj):
    """Without a daemon: what the kernel enforces, which is what matters."""
    committed = policystore.PolicyStore(obj.state_dir).committed()
    if committed is None:
        return []
    from policyd.nft import BanTable
    kernel = BanTable(obj.nft(), committed.bans_table, committed.bans.ipv6_prefix)
    return [{"network": str(network), "seconds_left": left, "expires_at": None,
             "failures": None, "filter": None, "reason": None, "banned_at": None}
            for network, left in sorted(kernel.list_bans().items(), key=lambda kv: kv[1])]


@main.command()
@click.argument("address")
@click.option("--for", "duration", metavar="DURATION", help="30s, 10m, 1h, 2d, 1w (default: bantime, escalated).")
@click.pass_obj
@handle_errors
def ban(obj, address, duration):
    """Ban ADDR from the guarded ports now."""
    result = _ask_daemon(obj, "ban", address=address, duration=duration)
    if result is None:
        result = _offline_bans(obj, lambda d: d.manual_ban(address, duration))
    click.echo(f"banned {result['network']} until {trial.format_time(result['expires_at'])}")


@main.command()
@click.argument("address")
@click.pass_obj
@handle_errors
def unban(obj, address):
    """Lift the ban on ADDR."""
    result = _ask_daemon(obj, "unban", address=address)
    if result is None:
        result = _offline_bans(obj, lambda d: d.manual_unban(address))
    if not result["unbanned"]:
        raise Refused(f"{address} is not banned")
    lifted = result.get("network") or address
    click.echo(f"unbanned {lifted}" + ("" if _same_network(address, lifted)
                                       else f" (covering {address})"))


def _same_network(asked, lifted):
    try:
        return ipaddress.ip_network(asked, strict=False) == ipaddress.ip_network(lifted)
    except ValueError:
        return False


def _offline_bans(obj, action):
    """No daemon runs: change the state file and the kernel directly, then close."""
    from policyd import bandesk
    return bandesk.offline(obj.state_dir, action)


@main.command()
@click.pass_obj
@handle_errors
def metrics(obj):
    """Print the daemon's metrics in Prometheus text format."""
    result = _ask_daemon(obj, "metrics")
    if result is None:
        raise HostError("the daemon is not running")
    click.echo(result, nl=False)


@main.command("test-filter")
@click.argument("filter_name", metavar="FILTER")
@click.argument("logfile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object (see README).")
@click.option("--mode", help="fail2ban filters: the jail's mode (normal, aggressive, ...).")
@handle_errors
def test_filter(filter_name, logfile, as_json, mode):
    """Run FILTER over LOGFILE offline: lines, matches, hosts, time.

    FILTER is a policyd filter name or file, or fail2ban:NAME (filter.d/NAME.conf)."""
    from policyd import testfilter  # policyd.__main__ runs its plain forms without click
    testfilter.run(filter_name, logfile, as_json, mode, click.echo)


@main.command("import-fail2ban")
@click.option("--config-dir", default="/etc/fail2ban", show_default=True,
              help="fail2ban's configuration: jail.conf, jail.local, jail.d/, filter.d/.")
@handle_errors
def import_fail2ban(config_dir):
    """Print policy YAML (bans:) for the enabled fail2ban jails policyd can express.

    Jails it cannot express are named in comments with the reason."""
    from policyd.fail2ban import jails
    click.echo(jails.to_yaml(jails.import_jails(config_dir)), nl=False)


@main.command()
@policy_argument
@click.option("--json", "as_json", is_flag=True, help="One JSON object: ok, findings.")
@click.pass_obj
@handle_errors
def doctor(obj, policy_path, as_json):
    """Check the host for POLICY: listeners, interfaces, logs, tables, trial, daemon.

    One line per finding (ok, warn or fail, with a fix); exit 1 if any needs attention.
    """
    from policyd import doctor as doctor_mod
    from policyd import hostenv
    explicit = (click.get_current_context().get_parameter_source("policy_path")
                is not click.core.ParameterSource.DEFAULT)
    policy, about_file = doctor_mod.policy_or_committed(
        policy_path, policystore.PolicyStore(obj.state_dir), explicit)
    findings = about_file + doctor_mod.diagnose(
        policy, hostenv.HostEnvironment(obj.state_dir, obj.run_dir, obj.nft))
    click.echo(doctor_mod.to_json(findings) if as_json else doctor_mod.to_text(findings))
    sys.exit(doctor_mod.exit_code(findings))
