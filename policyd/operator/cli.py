"""Command line: parse arguments, call the owning module, print the result.

Kept thin on purpose; every decision lives in the modules it calls. The commands
live by group in policyd.operator.cli_policy (the policy and its trials) and
policyd.operator.cli_views (the daemon and what it holds); this module wires them to one
click group. Exit codes: 0 success, 1 the operation ran and said no, 2 the input
is wrong.
"""
import os

import click

from policyd import __version__
from policyd.operator import cli_policy, cli_views
from policyd.operator.cli_common import Context, handle_errors

__all__ = ["main", "Context"]


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
    # Parsed list files, by content (policyd.policy.lists reads it when it first needs it;
    # importing that module here would slow every command's start).
    os.environ["POLICYD_LIST_CACHE"] = os.path.join(state_dir, "lists")


for _command in cli_policy.COMMANDS + cli_views.COMMANDS:
    main.add_command(_command)


@main.command("test-filter")
@click.argument("filter_name", metavar="FILTER")
@click.argument("logfile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object (see README).")
@click.option("--mode", help="fail2ban filters: the jail's mode (normal, aggressive, ...).")
@handle_errors
def test_filter(filter_name, logfile, as_json, mode):
    """Run FILTER over LOGFILE offline: lines, matches, hosts, time.

    FILTER is a policyd filter name or file, or fail2ban:NAME (filter.d/NAME.conf)."""
    from policyd.operator import testfilter  # policyd.__main__ runs its plain forms without click
    testfilter.run(filter_name, logfile, as_json, mode, click.echo)


@main.command("import-fail2ban")
@click.option("--config-dir", default="/etc/fail2ban", show_default=True,
              help="fail2ban's configuration: jail.conf, jail.local, jail.d/, filter.d/.")
@handle_errors
def import_fail2ban(config_dir):
    """Print policy YAML (bans:) for the enabled fail2ban jails policyd can express.

    Jails it cannot express are named in comments with the reason."""
    from policyd.logs.fail2ban import jails
    click.echo(jails.to_yaml(jails.import_jails(config_dir)), nl=False)
