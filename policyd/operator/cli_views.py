"""The daemon's commands and the operator's views of it: run, status, bans, ban,
unban, metrics and doctor. Each asks a running daemon first and, where that
makes sense, answers without one from the state dir and the kernel.
"""
import ipaddress
import sys

import click

from policyd.operator.cli_common import (ask_daemon, format_time, handle_errors, policy_argument,
                                policystore)
from policyd.errors import HostError, Refused


@click.command()
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
    from policyd import logfmt
    from policyd.daemon import core as daemon
    from policyd.operator import metrics
    if metrics_listen is not None:
        metrics.parse_listen(metrics_listen)  # refused before anything is touched
    logfmt.setup_logging(log_level.upper())
    daemon.run(policy_path, obj.state_dir, obj.run_dir, metrics_listen)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (see README).")
@click.pass_obj
@handle_errors
def status(obj, as_json):
    """Committed policy, trial and seconds left, bans, and each log's state."""
    from policyd.operator import statusview
    result = ask_daemon(obj, "status")
    if result is None:
        result = statusview.without_daemon(obj)
    if as_json:
        import json
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        click.echo(statusview.to_text(result))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON list (see README).")
@click.option("--kernel", is_flag=True,
              help="List the kernel's ban elements, not the ban book (slow with many "
                   "bans: the kernel walks its whole set to list it).")
@click.pass_obj
@handle_errors
def bans(obj, as_json, kernel):
    """Current bans: source, expiry, failure count, filter.

    From the running daemon, or without one from the state file (what the daemon
    restores when it starts); --kernel lists what the kernel holds instead."""
    from policyd.operator import bansview  # policyd.__main__ runs its plain forms without click
    bansview.run(obj.state_dir, obj.run_dir, as_json, kernel)


@click.command()
@click.argument("address")
@click.option("--for", "duration", metavar="DURATION",
              help="30s, 10m, 1h, 2d, 1w (default: bantime, escalated).")
@click.pass_obj
@handle_errors
def ban(obj, address, duration):
    """Ban ADDR from the guarded ports now."""
    result = ask_daemon(obj, "ban", address=address, duration=duration)
    if result is None:
        result = _offline_bans(obj, lambda d: d.manual_ban(address, duration))
    click.echo(f"banned {result['network']} until {format_time(result['expires_at'])}")


@click.command()
@click.argument("address")
@click.pass_obj
@handle_errors
def unban(obj, address):
    """Lift the ban on ADDR."""
    result = ask_daemon(obj, "unban", address=address)
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
    from policyd.operator import bandesk
    return bandesk.offline(obj.state_dir, action)


@click.command()
@click.pass_obj
@handle_errors
def metrics(obj):
    """Print the daemon's metrics in Prometheus text format."""
    result = ask_daemon(obj, "metrics")
    if result is None:
        raise HostError("the daemon is not running")
    click.echo(result, nl=False)


@click.command()
@policy_argument
@click.option("--json", "as_json", is_flag=True, help="One JSON object: ok, findings.")
@click.pass_obj
@handle_errors
def doctor(obj, policy_path, as_json):
    """Check the host for POLICY: listeners, interfaces, logs, tables, trial, daemon.

    One line per finding (ok, warn or fail, with a fix); exit 1 if any needs attention.
    """
    from policyd.operator import doctor as doctor_mod
    from policyd.operator import hostenv
    explicit = (click.get_current_context().get_parameter_source("policy_path")
                is not click.core.ParameterSource.DEFAULT)
    policy, about_file = doctor_mod.policy_or_committed(
        policy_path, policystore.PolicyStore(obj.state_dir), explicit)
    findings = about_file + doctor_mod.diagnose(
        policy, hostenv.HostEnvironment(obj.state_dir, obj.run_dir, obj.nft))
    click.echo(doctor_mod.to_json(findings) if as_json else doctor_mod.to_text(findings))
    sys.exit(doctor_mod.exit_code(findings))


COMMANDS = (run, status, bans, ban, unban, metrics, doctor)
