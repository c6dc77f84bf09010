"""`policyd bans`: its work, and the lean start that runs it without click.

The command is defined in policyd.operator.cli_views (options, help, errors); run()
is its body. quick() runs the same body for `bans` with its own options only
(`--json`, `--kernel`) before click is imported: with 100k bans start-up is a
third of the command's time. Anything else (help, a mistake, global options,
shell completion) goes to policyd.operator.cli, as do the errors the body raises
(they are printed by the click command's own handler).
"""
import errno
import json
import os
import sys
import time

from policyd.operator.gcpause import collector_paused

STATE_DIR, RUN_DIR = "/var/lib/policyd", "/run/policyd"  # policyd.operator.cli's defaults
COMMITTED_META = "committed.json"  # policyd.policy.store's (a test holds them together)
_OPTIONS = {"--json": 0, "--kernel": 1}


# A listing makes an object or two per ban and no cycles (2% of the command
# with 100k bans, collected for nothing).
@collector_paused
def run(state_dir, run_dir, as_json, kernel):
    """Print the bans: from the running daemon, else from the state file (or the
    kernel's when there is none); --kernel: the kernel's."""
    from policyd.operator import banprint, control
    if kernel:
        result = _from_kernel(state_dir)
    else:
        from policyd.operator.banlist import WIRE
        try:
            result, parts = control.request_parts(run_dir, "bans", form=WIRE)
        except control.DaemonUnavailable:
            result, parts = _without_daemon(state_dir, as_json), None
        if parts is not None:
            banprint.write_parts(map(_columns, parts), as_json, write_out)
            return
        if not isinstance(result, list):  # the state file's columns
            banprint.write_columns(result, as_json, write_out)
            return
    # A kernel listing, the state file's bans, or a daemon from before the columns.
    write_out(banprint.as_json(result) + "\n" if as_json else banprint.text(result))


def _columns(part):
    from policyd.operator import banlist, control
    try:
        return banlist.BanColumns.from_wire(part)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise control.ControlError(f"the daemon sent an unreadable ban list: {exc}") from None


def _committed(state_dir):
    """Whether a policy was committed: policyd.policy.store.PolicyStore.meta() is
    not None (importing that module, with dataclasses and tempfile, costs 25 ms)."""
    try:
        with open(os.path.join(state_dir, COMMITTED_META), "rb") as meta:
            return isinstance(json.loads(meta.read().decode()), dict)
    except (OSError, ValueError):
        return False


def _without_daemon(state_dir, as_json):
    """BanColumns of the state file, what the daemon restores when it starts; the
    kernel's rows if there is no state file; none if nothing is committed."""
    from policyd.operator import banstate
    if not _committed(state_dir):
        return []
    columns = banstate.from_state(state_dir, time.time(), banned_at=as_json)
    if columns is None:
        return _from_kernel(state_dir)
    if sys.stderr.isatty():
        sys.stderr.write("policyd: no daemon runs: bans as the state file records them "
                         "(`policyd bans --kernel` lists the kernel's)\n")
        sys.stderr.flush()
    return columns


def _from_kernel(state_dir):
    """What the kernel enforces, as rows with network and seconds left only."""
    from policyd.errors import KernelError
    from policyd.policy.store import PolicyStore
    committed = PolicyStore(state_dir).committed()
    if committed is None:
        return []
    from policyd.kernel.nft import BanTable, Nft
    kernel = BanTable(Nft(), committed.bans_table, committed.bans.ipv6_prefix)
    try:
        listed = kernel.list_bans()
    except OSError as exc:
        raise KernelError(f"cannot list the bans: {exc.strerror or exc}") from None
    return [{"network": str(network), "seconds_left": left, "expires_at": None,
             "failures": None, "filter": None, "reason": None, "banned_at": None}
            for network, left in sorted(listed.items(), key=lambda kv: kv[1])]


def write_out(text):
    """`text` to stdout in one write, now: 100k lines through click.echo one by
    one take seconds. A reader that stopped (`policyd bans | head`) ends the
    command quietly, as it ends `cat`."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would flush stdout again at exit and complain; point it nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def parse(argv, environ=os.environ):
    """(as_json, kernel) for `bans` with only its own flags, each any number of
    times in any order (as click reads them), else None."""
    if not argv or argv[0] != "bans" or any(
            name.startswith("_") and name.endswith("_COMPLETE") and value
            for name, value in environ.items()):  # click's shell completion
        return None
    flags = [False, False]
    for arg in argv[1:]:
        if arg not in _OPTIONS:
            return None
        flags[_OPTIONS[arg]] = True
    return tuple(flags)


def quick(argv):
    """Run a plain `bans` command line; False if policyd.operator.cli must parse it."""
    parsed = parse(argv)
    if parsed is None:
        return False
    # policyd.operator.cli's group: --state-dir/--run-dir from the environment
    # (click takes an empty variable as unset), and where list files are cached.
    state_dir = os.environ.get("POLICYD_STATE_DIR") or STATE_DIR
    run_dir = os.environ.get("POLICYD_RUN_DIR") or RUN_DIR
    os.environ["POLICYD_LIST_CACHE"] = os.path.join(state_dir, "lists")
    from policyd.errors import PolicydError
    try:
        run(state_dir, run_dir, *parsed)
    except PolicydError as exc:
        _as_click_does(exc)
    except (EOFError, KeyboardInterrupt):
        _as_click_does(None)
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        _as_click_does(exc)
    return True


def _as_click_does(exc):
    """End as the click command ends (click.BaseCommand.main, standalone): on a
    PolicydError as its handler prints it, with its exit code; on an interrupt
    (exc None) with "Aborted!" and 1; on a broken pipe quietly with 1."""
    import click

    from policyd.operator.cli_common import handle_errors
    if exc is None:
        click.echo(file=sys.stderr)
        click.echo("Aborted!", file=sys.stderr)
        sys.exit(1)
    if isinstance(exc, OSError):
        sys.stdout = click.utils.PacifyFlushWrapper(sys.stdout)
        sys.stderr = click.utils.PacifyFlushWrapper(sys.stderr)
        sys.exit(1)

    @handle_errors
    def again():
        raise exc
    again()
