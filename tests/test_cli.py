"""The command line without root: what `check`, `explain`, `apply`'s options, `run`'s
options, `status` and `--version` say, and with which exit code."""
import json
import textwrap

import pytest
from click.testing import CliRunner

from policyd import __version__
from policyd.kernel import lockout, trial
from policyd.operator import cli
from policyd.policy import store as policystore

GOOD = """\
version: 1
services:
  ollama:
    ports: [11434]
    allow: [127.0.0.0/8]
"""


def write(tmp_path, text, name="policy.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def invoke(tmp_path, *args):
    runner = CliRunner(mix_stderr=False)
    return runner.invoke(cli.main, ["--state-dir", str(tmp_path / "state"),
                                    "--run-dir", str(tmp_path / "run"), *map(str, args)])


def test_version():
    result = CliRunner().invoke(cli.main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"policyd {__version__}"


def test_a_filter_typo_is_an_error_at_check_naming_file_line_and_key(tmp_path):
    path = write(tmp_path, """\
        version: 1
        services:
          proxy:
            ports: [8080]
            allow: [any]
        bans:
          logs:
            - path: /var/log/nginx/error.log
              filter: ngnix-auth
        """)
    result = invoke(tmp_path, "check", path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"policyd: {path}:9: bans.logs[0].filter: "
                                    "filter 'ngnix-auth' does not load")
    assert len(result.stderr.splitlines()) == 1


def test_a_filter_file_that_does_not_load_is_an_error_at_check(tmp_path):
    broken = write(tmp_path, "rules: [{regex: 'no anchor (?P<host>x)'}]\n", "broken.yaml")
    path = write(tmp_path, f"""\
        version: 1
        services:
          proxy: {{ports: [8080], allow: [any]}}
        bans:
          logs:
            - path: /var/log/x.log
              filter: {broken}
        """)
    result = invoke(tmp_path, "check", path)
    assert result.exit_code == 2
    assert f"{path}:7: bans.logs[0].filter" in result.stderr
    assert "anchored" in result.stderr


def test_a_log_path_that_is_a_directory_is_an_error_at_check(tmp_path):
    (tmp_path / "logs").mkdir()
    path = write(tmp_path, f"""\
        version: 1
        services:
          proxy: {{ports: [8080], allow: [any]}}
        bans:
          logs:
            - filter: nginx-auth
              path: {tmp_path / "logs"}
        """)
    result = invoke(tmp_path, "check", path)
    assert result.exit_code == 2
    assert f"{path}:7: bans.logs[0].path" in result.stderr
    assert "is a directory" in result.stderr


def test_a_missing_log_is_fine_at_check(tmp_path):
    path = write(tmp_path, f"""\
        version: 1
        services:
          proxy: {{ports: [8080], allow: [any]}}
        bans:
          logs:
            - {{path: {tmp_path / "not-yet.log"}, filter: nginx-auth}}
        """)
    result = invoke(tmp_path, "check", path)
    assert result.exit_code == 0, result.stderr


def test_apply_refuses_a_filter_typo_before_the_kernel(tmp_path, monkeypatch):
    path = write(tmp_path, """\
        version: 1
        services:
          proxy: {ports: [8080], allow: [any]}
        bans:
          logs:
            - {path: /var/log/x.log, filter: ngnix-auth}
        """)

    class NoKernel:
        def load(self, document):
            raise AssertionError("the kernel must not be asked")

    monkeypatch.setattr(cli.Context, "nft", lambda self: NoKernel())
    for extra in ((), ("--confirm-timeout", "60")):
        result = invoke(tmp_path, "apply", path, "--force", *extra)
        assert result.exit_code == 2, result.output
        assert f"{path}:6: bans.logs[0].filter" in result.stderr


def test_explain_without_a_port_blames_the_missing_port_not_the_address(tmp_path):
    path = write(tmp_path, GOOD)
    result = invoke(tmp_path, "explain", path, "203.0.113.66")
    assert result.exit_code == 2
    assert result.stderr.startswith("policyd: PORT: missing after 203.0.113.66")
    assert "not an IP address" not in result.stderr


@pytest.mark.parametrize("given, seconds", [("120", 120), ("2m", 120), ("90s", 90),
                                            ("1h", 3600)])
def test_confirm_timeout_takes_durations_like_the_policy(tmp_path, monkeypatch, given, seconds):
    path = write(tmp_path, GOOD)
    seen = {}

    def fake_start(nft, store, policy_path, timeout, force=False):
        seen["seconds"] = timeout
        return policystore.Pending(b"", policy_path, "0" * 64, 0.0, 0.0 + timeout, timeout, None)

    monkeypatch.setattr(cli.Context, "nft", lambda self: None)
    monkeypatch.setattr(trial, "start_trial", fake_start)
    result = invoke(tmp_path, "apply", path, "--confirm-timeout", given)
    assert result.exit_code == 0, result.output + result.stderr
    assert seen["seconds"] == seconds


@pytest.mark.parametrize("given", ["0", "2x", "2d", "-5"])
def test_confirm_timeout_refuses_nonsense_and_more_than_a_day(tmp_path, given):
    result = invoke(tmp_path, "apply", write(tmp_path, GOOD), "--confirm-timeout", given)
    assert result.exit_code == 2


@pytest.mark.parametrize("listen", ["0.0.0.0:9611", "[::]:9611", "192.0.2.1:9611"])
def test_run_refuses_a_metrics_listener_beyond_loopback_before_starting(tmp_path, listen,
                                                                       monkeypatch):
    from policyd.daemon import core as daemon
    monkeypatch.setattr(daemon, "run", lambda *a, **k: pytest.fail("the daemon started"))
    result = invoke(tmp_path, "run", write(tmp_path, GOOD), "--metrics-listen", listen)
    assert result.exit_code == 2
    assert "policyd: --metrics-listen: " in result.stderr
    assert "not a loopback address" in result.stderr


def test_confirm_and_rollback_without_a_trial_both_exit_1(tmp_path):
    for command in ("confirm", "rollback"):
        result = invoke(tmp_path, command)
        assert result.exit_code == 1, (command, result.output, result.stderr)
        assert "no trial" in result.stderr
    assert not (tmp_path / "state").exists()


def _expired_trial(tmp_path):
    store = policystore.PolicyStore(tmp_path / "state")
    data = GOOD.encode()
    policy = trial.policy_mod.loads(data, "/etc/policyd/policy.yaml")
    store.commit(data, policy, now=1000.0)
    store.set_pending(policystore.Pending(data, "/tmp/candidate.yaml", policy.digest, 1000.0,
                                    1060.0, 60, policy.digest))


def test_status_without_a_daemon_shows_an_expired_trial_as_ended(tmp_path, monkeypatch):
    _expired_trial(tmp_path)
    monkeypatch.setattr(cli.Context, "nft_or_none", lambda obj: None)
    result = invoke(tmp_path, "status")
    assert result.exit_code == 0, result.stderr
    assert "left" not in result.output
    assert "ended unconfirmed" in result.output
    result = invoke(tmp_path, "status", "--json")
    report = json.loads(result.output)
    assert report["policy"]["trial"] is None
    assert report["policy"]["ended_trial"]["source"] == "/tmp/candidate.yaml"


def test_status_says_plainly_when_the_first_policy_was_held_back(tmp_path, monkeypatch):
    store = policystore.PolicyStore(tmp_path / "state")
    store.hold_back("/etc/policyd/policy.yaml", "refusing: 192.0.2.7 on tcp port 11434 "
                    "(an established connection) would be cut", 1000.0)
    monkeypatch.setattr(cli.Context, "nft_or_none", lambda obj: None)
    result = invoke(tmp_path, "status")
    assert "NOT ENFORCED" in result.output and "192.0.2.7" in result.output
    report = json.loads(invoke(tmp_path, "status", "--json").output)
    assert report["policy"]["held_back"]["reason"].startswith("refusing: 192.0.2.7")
    # The first commit ends it.
    policy = trial.policy_mod.loads(GOOD.encode(), "/etc/policyd/policy.yaml")
    store.commit(GOOD.encode(), policy)
    report = json.loads(invoke(tmp_path, "status", "--json").output)
    assert report["policy"]["held_back"] is None


def test_ban_refusals_name_the_argument_the_operator_typed(tmp_path):
    from policyd.banning.bans import BanManager
    from policyd.operator.bandesk import BanDesk
    from policyd.errors import InputError
    from policyd.policy.model import BanSettings
    from policyd.banning.state import State

    class Kernel:
        def add_bans(self, bans):
            pass

        def remove_bans(self, networks):
            pass

    state = State(tmp_path / "state.db")
    try:
        desk = BanDesk(BanManager(BanSettings(ports=(8080,)), state, Kernel()))
        for address, duration in (("127.0.0.1", None), ("not-an-address", None),
                                  ("192.0.2.7", "0s")):
            with pytest.raises(InputError) as caught:
                desk.manual_ban(address, duration)
            assert caught.value.key in ("ADDR", "--for"), (address, caught.value.key)
            assert str(caught.value).startswith(f"{caught.value.key}: ")
    finally:
        state.close()


def test_explain_names_its_arguments_like_the_usage(tmp_path):
    path = write(tmp_path, GOOD)
    assert invoke(tmp_path, "explain", path, "nonsense", "11434").stderr.startswith(
        "policyd: SRC: ")
    assert invoke(tmp_path, "explain", path, "192.0.2.7", "99999").stderr.startswith(
        "policyd: PORT: ")


def test_every_operator_error_class_carries_the_exit_code_spec_gives_it():
    from policyd.errors import HostError, InputError, KernelError, PolicydError, Refused
    assert InputError("x").exit_code == 2
    for refusal in (HostError("x"), KernelError("x"), Refused("x"), trial.TooLate("x"),
                    lockout.LockoutRisk("x")):
        assert isinstance(refusal, PolicydError) and refusal.exit_code == 1
    assert KernelError("no such table").for_operator() == "the kernel refused: no such table"


def test_a_foreign_state_database_is_the_hosts_fault_not_the_input(tmp_path):
    import sqlite3

    from policyd.policy import reader as policy
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with sqlite3.connect(state_dir / "state.db") as db:
        db.execute("CREATE TABLE photos (id INTEGER)")
    policy_file = write(tmp_path, GOOD)
    policystore.PolicyStore(state_dir).commit(policy_file.read_bytes(), policy.load(policy_file))
    result = invoke(tmp_path, "unban", "192.0.2.7")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"policyd: {state_dir / 'state.db'}: not a policyd state database")
    assert result.stderr.count("\n") == 1


def test_banning_without_a_daemon_does_not_import_the_daemon():
    import subprocess
    import sys
    program = ("import sys, policyd.operator.bandesk, policyd.operator.cli; "
               "print('policyd.daemon.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_without_a_daemon_bans_and_status_read_the_state_file_and_say_so(tmp_path, monkeypatch):
    from policyd.banning.bans import BanManager
    from policyd.banning.state import State
    from fakes import FakeBanKernel, FakeClock, Settings
    monkeypatch.setattr(cli.Context, "nft_or_none", lambda obj: None)
    assert invoke(tmp_path, "bans").output == ""  # nothing committed: nothing banned
    store = policystore.PolicyStore(tmp_path / "state")
    store.commit(GOOD.encode(), trial.policy_mod.loads(GOOD.encode(), "/etc/policyd/policy.yaml"))
    clock = FakeClock(__import__("time").time())
    with State(tmp_path / "state" / "state.db") as state:
        manager = BanManager(Settings(), state, FakeBanKernel(clock), clock=clock)
        manager.ban("192.0.2.7", 600)
        manager.ban("2001:db8:1::/64", 60)
        manager.flush()
    result = invoke(tmp_path, "bans")
    assert result.exit_code == 0, result.stderr
    lines = result.output.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["2001:db8:1::/64", "192.0.2.7/32"]
    assert lines[1].endswith("\tfailures=0 reason=manual")
    listed = json.loads(invoke(tmp_path, "bans", "--json").output)
    assert [ban["reason"] for ban in listed] == ["manual", "manual"]
    report = json.loads(invoke(tmp_path, "status", "--json").output)
    assert report["bans"] == {"active": 2, "total": None, "source": "state"}
    assert "bans:      2 active (as the state file records them" in invoke(tmp_path, "status").output


def test_a_reader_that_stops_early_ends_the_listing_quietly():
    """`policyd bans | head`: the rest of the list has nowhere to go; no traceback."""
    import subprocess
    import sys
    program = ("from policyd.operator.bansview import write_out\n"
               "for _ in range(50):\n"
               "    write_out('192.0.2.7/32\\t60.0s left\\treason=manual\\n' * 20000)\n")
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(100)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_apply_writes_the_list_cache_after_the_kernel_has_the_policy(tmp_path, monkeypatch):
    import gc
    from fakes import FakeClock, FakeNft
    networks = tmp_path / "allow.txt"
    networks.write_text("# bench\n192.0.2.0/24\n2001:db8::/48\n")
    path = write(tmp_path, f"version: 1\nservices:\n  proxy:\n    ports: [8080]\n"
                           f"    allow:\n      - file: {networks}\n")
    cache = tmp_path / "state" / "lists"
    kernel, cached_at_load = FakeNft(FakeClock()), []
    kernel.before_load = lambda document: cached_at_load.append(
        sorted(cache.glob("*")) if cache.exists() else [])
    monkeypatch.setenv("POLICYD_LIST_CACHE", "")  # the CLI sets it; restored after
    monkeypatch.setattr(cli.Context, "nft", lambda self: kernel)
    result = invoke(tmp_path, "apply", path, "--force")
    assert result.exit_code == 0, result.stderr
    assert cached_at_load == [[]]
    assert len(list(cache.glob("*"))) == 1
    assert gc.isenabled(), "the collector is back after the command"
    # The next command reads the list from the cache: same networks as parsed.
    assert invoke(tmp_path, "show", path).stdout == cli_show_uncached(tmp_path, path)


def cli_show_uncached(tmp_path, path):
    from policyd.policy import lists
    lists._last_good.clear()
    state = tmp_path / "other-state"
    runner = CliRunner(mix_stderr=False)
    return runner.invoke(cli.main, ["--state-dir", str(state), "show", str(path)]).stdout


def test_status_reads_a_damaged_commit_record_without_a_traceback(tmp_path, monkeypatch):
    """committed.json is policyd's own, written whole; one a hand or a bad disk
    changed into other JSON is shown as far as it goes, never a traceback."""
    store = policystore.PolicyStore(tmp_path / "state")
    policy = trial.policy_mod.loads(GOOD.encode(), "/etc/policyd/policy.yaml")
    store.commit(GOOD.encode(), policy, now=1000.0)
    monkeypatch.setattr(cli.Context, "nft_or_none", lambda obj: None)

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")

    for record in (b'{"generation": 1}', b'{"sha256": 7, "source": null, "committed_at": "x"}',
                   b"[1, 2]", b'"text"', b"null", b'{"committed_at": 1e300}',
                   b'{"committed_at": NaN, "sha256": ""}'):
        (tmp_path / "state" / policystore.COMMITTED_META).write_bytes(record)
        result = invoke(tmp_path, "status")
        assert result.exit_code == 0 and result.exception is None, (record, result.output)
        assert "policy:" in result.output, record
        assert json.loads(invoke(tmp_path, "status", "--json").output, parse_constant=strict)["policy"]
