"""What every command module of the CLI shares: the context (state and run dirs),
the one-line error handling with SPEC's exit codes, argument types, and the
two ways to reach a running daemon. Imports nothing a command may not need.
"""
import functools
import importlib
import sys
import time

import click

from policyd.errors import InputError, PolicydError


class _OnFirstUse:
    """A module imported when a command first uses it: start-up is part of every
    command's time, and `policyd test-filter` needs no policy compiler or trials."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self._name), attribute)


explain_mod = _OnFirstUse("policyd.operator.explain")
policy_mod = _OnFirstUse("policyd.policy.reader")
preflight = _OnFirstUse("policyd.policy.preflight")
render = _OnFirstUse("policyd.rules.render")
trial = _OnFirstUse("policyd.kernel.trial")
policystore = _OnFirstUse("policyd.policy.store")


def compile_policy(*args, **kwargs):
    from policyd.rules.compile import compile_policy as compile_  # on first use, as above
    return compile_(*args, **kwargs)


class Context:
    def __init__(self, state_dir, run_dir):
        self.state_dir = state_dir
        self.run_dir = run_dir

    def nft(self):
        from policyd.kernel.nft import Nft  # libnftables only where the kernel is needed
        return Nft()

    def nft_or_none(self):
        try:
            return self.nft()
        except (ImportError, OSError):
            return None


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


def ask_daemon(obj, command, **args):
    """The daemon's answer, or None when no daemon runs here."""
    from policyd.operator import control
    try:
        return control.request(obj.run_dir, command, **args)
    except control.DaemonUnavailable:
        return None


def tell_daemon(obj, kind):
    """Let a running daemon count the change; the change itself is done already."""
    from policyd.operator import control
    try:
        control.request(obj.run_dir, "applied", kind=kind)
    except (control.DaemonUnavailable, control.ControlError):
        pass


def format_time(timestamp):
    """Local time as every command prints it (policyd.kernel.trial's format, without
    importing the policy compiler that trial needs for `status`); "?" for a time
    no clock can show (a state file changed by hand)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return "?"
