"""`policyd bans` through its lean start (policyd.__main__ -> policyd.operator.bansview.quick)
and through the click command: the same stdout, stderr and exit code for every
set of options, from a daemon, from the state file and for errors; and what the
lean start leaves to click (help, mistakes, global options, completion)."""
import json
import os
import pty
import re
import sqlite3
import subprocess
import sys

import pytest

from fakes import FakeBanKernel, FakeClock, Settings
from policyd.banning.bans import BanManager
from policyd.banning.state import State
from policyd.operator import banlist, bansview, control
from policyd.operator.control_server import ControlServer
from policyd.policy import store as policystore
from policyd.policy.lists import cidr_text

POLICY = b"version: 1\nservices:\n  ollama:\n    ports: [11434]\n    allow: [127.0.0.0/8]\n"
LEAN = [sys.executable, "-m", "policyd"]
# The click command, as policyd.__main__ ran it before the lean start.
CLICK = [sys.executable, "-c", "from policyd.operator.cli import main; "
         "main(prog_name='python -m policyd')"]
OPTION_SETS = [[], ["--json"], ["--kernel"], ["--json", "--kernel"], ["--kernel", "--json"],
               ["--json", "--json"]]
# What the lean start must leave to click: it parses, helps and refuses these.
CLICKS_OWN = [["--help"], ["-h"], ["--jso"], ["--json=1"], ["extra"], ["--", "--json"],
              ["--json", "-h"], ["--kernel", "--nope"]]


def run(command, tmp_path, *args, env=None, stderr=subprocess.PIPE):
    environ = dict(os.environ, POLICYD_STATE_DIR=str(tmp_path / "state"),
                   POLICYD_RUN_DIR=str(tmp_path / "run"))
    environ.update(env or {})
    return subprocess.run([*command, *args], capture_output=stderr is subprocess.PIPE,
                          stdout=None if stderr is subprocess.PIPE else subprocess.PIPE,
                          stderr=None if stderr is subprocess.PIPE else stderr,
                          text=True, env=environ, timeout=60)


def same(tmp_path, *args, env=None, timed=False):
    """Run `bans ARGS` both ways; the lean one's result, once both agree. timed:
    the bans' seconds left are the clock's (the state file's), read a moment apart."""
    lean, click = (run(command, tmp_path, "bans", *args, env=env) for command in (LEAN, CLICK))
    spelled = untimed if timed else str
    assert (lean.returncode, spelled(lean.stdout), lean.stderr) == (
        click.returncode, spelled(click.stdout), click.stderr), args
    return lean


def untimed(text):
    return re.sub(r'("seconds_left": )?[0-9]+\.[0-9](s left)?', "T", text)


def commit(tmp_path):
    from policyd.policy import reader
    policystore.PolicyStore(tmp_path / "state").commit(
        POLICY, reader.loads(POLICY, "/etc/policyd/policy.yaml"))


def record_bans(tmp_path, causes=1):
    clock = FakeClock(__import__("time").time())
    with State(tmp_path / "state" / "state.db") as state:
        manager = BanManager(Settings(), state, FakeBanKernel(clock), clock=clock)
        for i in range(40):
            manager.ban(f"192.0.2.{i + 1}" if i % 2 else f"2001:db8:{i}::/64", 60 + 7 * (i % 5))
        if causes > 1:
            manager.record_failures([(__import__("ipaddress").ip_address("198.51.100.9"),
                                      "nginx-auth", None)] * 5)
        manager.flush()


@pytest.mark.parametrize("args", OPTION_SETS)
def test_nothing_committed_prints_the_same_both_ways(tmp_path, args):
    out = same(tmp_path, *args)
    assert out.returncode == 0 and out.stdout in ("", "[]\n")


@pytest.mark.parametrize("causes", [1, 2])
@pytest.mark.parametrize("args", [[], ["--json"], ["--json", "--json"]])
def test_the_state_file_prints_the_same_both_ways(tmp_path, args, causes):
    commit(tmp_path)
    record_bans(tmp_path, causes)
    out = same(tmp_path, *args, timed=True)
    assert out.returncode == 0 and len(out.stdout.splitlines()) >= 40


def test_a_listing_runs_without_the_collector_and_gives_it_back(tmp_path, monkeypatch, capsys):
    import gc

    from policyd.operator import banprint
    commit(tmp_path)
    record_bans(tmp_path)
    collecting, write_columns = [], banprint.write_columns
    monkeypatch.setattr(banprint, "write_columns", lambda *args: (
        collecting.append(gc.isenabled()), write_columns(*args)))
    bansview.run(tmp_path / "state", tmp_path / "run", False, False)
    assert collecting == [False] and gc.isenabled()
    assert len(capsys.readouterr().out.splitlines()) == 40


def test_a_foreign_state_file_is_refused_the_same_both_ways(tmp_path):
    commit(tmp_path)
    foreign = sqlite3.connect(tmp_path / "state" / "state.db")
    foreign.execute("CREATE TABLE bans (x)")
    foreign.commit()
    foreign.close()
    out = same(tmp_path)
    assert out.returncode == 1 and out.stderr.startswith("policyd: ") and "foreign" in out.stderr


@pytest.mark.parametrize("args", CLICKS_OWN)
def test_help_and_mistakes_are_clicks(tmp_path, args):
    assert bansview.parse(["bans", *args]) is None
    out = same(tmp_path, *args)
    assert out.returncode in (0, 2)


def test_global_options_and_completion_go_to_click(tmp_path):
    assert bansview.parse(["--state-dir", str(tmp_path), "bans"]) is None
    assert bansview.parse(["bans"], environ={"_POLICYD_COMPLETE": "bash_complete"}) is None
    assert bansview.parse(["bans"], environ={"_POLICYD_COMPLETE": ""}) == (False, False)
    assert bansview.parse(["bans", "--kernel", "--json", "--kernel"]) == (True, True)
    commit(tmp_path)
    record_bans(tmp_path)
    lean = run(LEAN, tmp_path, "--state-dir", str(tmp_path / "state"), "bans")
    assert lean.returncode == 0 and untimed(lean.stdout) == untimed(run(LEAN, tmp_path, "bans").stdout)


def test_an_empty_environment_variable_is_the_default_as_click_takes_it(tmp_path):
    # Both read /var/lib/policyd and /run/policyd then (absent in the test host, or not).
    out = same(tmp_path, env={"POLICYD_STATE_DIR": "", "POLICYD_RUN_DIR": str(tmp_path / "run")})
    assert out.returncode in (0, 1)


def test_the_note_on_a_terminal_is_the_same_both_ways(tmp_path):
    commit(tmp_path)
    record_bans(tmp_path)
    seen = []
    for command in (LEAN, CLICK):
        primary, secondary = pty.openpty()
        try:
            out = run(command, tmp_path, "bans", stderr=secondary)
            os.close(secondary)
            secondary = None
            note = b""
            while True:
                try:
                    chunk = os.read(primary, 4096)
                except OSError:  # EIO: the other end is closed
                    break
                if not chunk:
                    break
                note += chunk
        finally:
            os.close(primary)
            if secondary is not None:
                os.close(secondary)
        seen.append((out.returncode, untimed(out.stdout), note))
    assert seen[0] == seen[1]
    assert b"no daemon runs" in seen[0][2]


def test_the_committed_meta_is_read_as_the_policy_store_reads_it(tmp_path):
    assert bansview.COMMITTED_META == policystore.COMMITTED_META
    store = policystore.PolicyStore(tmp_path)
    for content in (None, b"", b"null", b"{}", b"[", b"\xff", b'{"sha256": "x"}', b"0",
                    "{}".encode("utf-16")):
        if content is not None:
            (tmp_path / policystore.COMMITTED_META).write_bytes(content)
        assert bansview._committed(tmp_path) == (store.meta() is not None), content


@pytest.fixture
def daemon(tmp_path):
    """A control socket answering `bans` as the daemon does (policyd.daemon.control)."""
    clock = FakeClock(__import__("time").time())
    state = State(tmp_path / "daemon.db")
    manager = BanManager(Settings(), state, FakeBanKernel(clock), clock=clock)
    for i in range(300):
        manager.ban(f"2001:db8:{i}::/64" if i % 3 else f"203.0.113.{i % 250}/32", 30 + i % 17)
    manager.record_failures([(__import__("ipaddress").ip_address("198.51.100.9"),
                              "nginx-auth", None)] * 5)
    manager.flush()
    answers = {"refuse": False}

    def handler(command, args):
        if answers["refuse"]:
            raise control.ControlError("the daemon is busy; nothing was done")
        book = dict(manager.book.active)
        if args.get("form") == banlist.WIRE:
            return control.Stream(banlist.parts_from_snapshot(
                book, clock(), cidr_text, chunk=64, stamp=manager.book.stamp), {"form": banlist.WIRE})
        return banlist.rows_from_snapshot(list(book.items()), clock(), cidr_text)
    server = ControlServer(control.socket_path(tmp_path / "run"), handler)
    server.start()
    try:
        yield answers
    finally:
        server.stop()
        state.close()


@pytest.mark.parametrize("args", [[], ["--json"], ["--json", "--json"]])
def test_a_daemons_list_prints_the_same_both_ways(tmp_path, daemon, args):
    out = same(tmp_path, *args)
    assert out.returncode == 0 and out.stdout.count("2001:db8:") >= 199
    if args:
        assert len(json.loads(out.stdout)) == 301


def test_a_daemons_refusal_is_the_same_both_ways(tmp_path, daemon):
    daemon["refuse"] = True
    out = same(tmp_path)
    assert out.returncode == 1 and out.stderr == "policyd: the daemon is busy; nothing was done\n"


def test_a_reader_that_stops_early_ends_both_quietly(tmp_path, daemon):
    results = []
    for command in (LEAN, CLICK):
        environ = dict(os.environ, POLICYD_STATE_DIR=str(tmp_path / "state"),
                       POLICYD_RUN_DIR=str(tmp_path / "run"))
        proc = subprocess.Popen([*command, "bans", "--json"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=environ)
        proc.stdout.read(10)
        proc.stdout.close()
        results.append((proc.wait(timeout=60), proc.stderr.read()))
        proc.stderr.close()
    assert results[0] == results[1] == (0, b"")


def test_the_lean_start_imports_no_click(tmp_path):
    program = ("import sys, runpy; sys.argv = ['policyd', 'bans']; "
               "runpy.run_module('policyd', run_name='__main__')"
               "; print('click' in sys.modules, file=sys.stderr)")
    out = run([sys.executable, "-c", program], tmp_path)
    assert out.returncode == 0 and out.stderr.strip() == "False"
