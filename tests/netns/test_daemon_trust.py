"""The daemon says what it does: a broken filter costs one log, not the daemon; the
first start never silently cuts a connected client; a second daemon refuses before
it touches anything; missing logs and bans are each one key=value line."""
import json
import time

from policyd_lab.netlab import REPO, PolicydDaemon, wait_for
from policyd_lab.nginxlog import nginx_failure
from policyd_lab.policies import ban_policy, log_file
from policyd_lab.world import SERVER_V4, SERVER_WAN_V4, STRANGER_V4, TRUSTED_V4

TWO_LOGS = """\
    version: 1
    services:
      ollama:
        ports: [11434]
        allow: [127.0.0.0/8, "::1", 192.0.2.0/24]
      proxy:
        ports: [8080]
        allow: [any]
    bans:
      maxretry: 3
      logs:
        - path: {good}
          filter: nginx-auth
        - path: {other}
          filter: {filter}
"""


def _two_logs(world):
    good, other = world.lab.tmp / "good.log", world.lab.tmp / "other.log"
    good.write_text("")
    other.write_text("")
    own_filter = world.lab.tmp / "mine.yaml"
    own_filter.write_text((REPO / "filters" / "nginx-auth.yaml").read_text())
    world.server.listen(8080)
    world.server.listen(11434)
    return good, other, own_filter, world.policy(TWO_LOGS.format(good=good, other=other,
                                                                 filter=own_filter))


def test_a_filter_broken_after_apply_costs_its_log_only(world):
    good, other, own_filter, policy = _two_logs(world)
    assert world.server.policyd("apply", policy, "--force").returncode == 0
    own_filter.write_text("rules: [{regex: 'unanchored (?P<host>x)'}]\n")
    daemon = PolicydDaemon(world.server, policy, "--metrics-listen", "127.0.0.1:9611").start()
    try:
        status = json.loads(world.server.policyd("status", "--json").stdout)
        by_path = {entry["path"]: entry for entry in status["logs"]}
        assert by_path[str(good)]["error"] is None
        assert "does not load" in by_path[str(other)]["error"]
        assert "NOT FOLLOWED" in world.server.policyd("status").stdout
        metrics = world.server.policyd("metrics").stdout
        assert f'policyd_log_errors{{log="{other}"}} 1' in metrics
        assert f'policyd_log_errors{{log="{good}"}} 0' in metrics
        doctor = world.server.policyd("doctor", policy)
        assert doctor.returncode == 1
        assert f"the daemon does not follow {other}" in doctor.stdout
        # The daemon still bans from the log whose filter loads.
        with good.open("a") as out:
            out.write(nginx_failure(STRANGER_V4) * 3)
        assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 3)
        assert daemon.proc.poll() is None
    finally:
        err = daemon.stop_and_read()
    assert f"log not followed log={other}" in err


def test_the_first_start_does_not_cut_a_connected_client_and_says_so(world):
    log = world.lab.tmp / "error.log"
    log.write_text("")
    world.server.listen(11434)
    # The shipped default: 11434 for loopback only. A LAN client already uses Ollama.
    policy = world.policy("""\
        version: 1
        services:
          ollama:
            ports: [11434]
            allow: [127.0.0.0/8, "::1"]
        """)
    client = world.trusted.connect(SERVER_V4, 11434)
    assert client is not None
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert world.trusted.can_connect(SERVER_V4, 11434), "the install cut a working client"
        assert "policyd" not in world.server.nft("list", "tables").stdout
        status = world.server.policyd("status")
        assert "NOT ENFORCED" in status.stdout and TRUSTED_V4 in status.stdout
        held = json.loads(world.server.policyd("status", "--json").stdout)["policy"]
        assert held["committed"] is None and TRUSTED_V4 in held["held_back"]["reason"]
        doctor = world.server.policyd("doctor", policy)
        assert doctor.returncode == 1 and "NOT ENFORCED" in doctor.stdout
        assert "policyd_enforcing 0" in world.server.policyd("metrics").stdout
        # A restart (or a reboot) with nobody connected to lint for does not enforce
        # behind the operator's back either: only an apply does.
        client.close()
        first_err = daemon.stop_and_read()
        daemon = PolicydDaemon(world.server, policy).start()
        assert world.trusted.can_connect(SERVER_V4, 11434)
        assert "NOT ENFORCED" in world.server.policyd("status").stdout
        # The operator decides: an apply (here forced) and the daemon enforces at once.
        assert world.server.policyd("apply", policy, "--force").returncode == 0
        assert wait_for(lambda: "policyd_enforcing 1" in world.server.policyd("metrics").stdout, 5)
        assert not world.trusted.can_connect(SERVER_V4, 11434, 0.3)
        assert json.loads(world.server.policyd("status", "--json").stdout)[
            "policy"]["held_back"] is None
    finally:
        err = daemon.stop_and_read()
    assert "NOT ENFORCING" in first_err and TRUSTED_V4 in first_err
    assert "NOT ENFORCING" in err and "held back since" in err


def test_the_first_start_enforces_when_nobody_would_be_cut(world):
    world.server.listen(11434)
    policy = world.policy("""\
        version: 1
        services:
          ollama:
            ports: [11434]
            allow: [127.0.0.0/8, "::1"]
        """)
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert not world.trusted.can_connect(SERVER_V4, 11434, 0.3)
        assert json.loads(world.server.policyd("status", "--json").stdout)[
            "policy"]["committed"] is not None
    finally:
        daemon.stop_and_read()


def test_a_second_daemon_refuses_before_it_restores_any_ban(world):
    log = world.lab.tmp / "error.log"
    log.write_text("")
    world.server.listen(8080)
    policy = world.policy(ban_policy(log_file(log)))
    first = PolicydDaemon(world.server, policy).start()
    try:
        assert world.server.policyd("ban", STRANGER_V4, "--for", "1h").returncode == 0
        assert not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.3)
        # Someone lifts the ban by hand; only a (wrongly) restoring daemon would put it back
        # before the first daemon's next reconcile, which is minutes away.
        world.server.nft("flush", "set", "inet", "policyd_bans", "ban4")
        assert world.stranger.can_connect(SERVER_WAN_V4, 8080)
        second = PolicydDaemon(world.server, policy)
        second.start(ready=False)
        assert second.proc.wait(timeout=30) == 1  # the host, not the input: exit 1
        err = second.stop_and_read()
        assert "another policyd is listening" in err
        assert world.stranger.can_connect(SERVER_WAN_V4, 8080), "the refused daemon restored bans"
    finally:
        first.stop_and_read()


def test_a_missing_log_is_one_line_and_each_ban_is_logged_once(world):
    missing = world.lab.tmp / "not-yet" / "error.log"
    world.server.listen(8080)
    policy = world.policy(f"""\
        version: 1
        services:
          proxy: {{ports: [8080], allow: [any]}}
        bans:
          maxretry: 3
          logs: [{{path: {missing}, filter: nginx-auth}}]
        """)
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        missing.parent.mkdir()
        missing.write_text(nginx_failure(STRANGER_V4) * 3)
        assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 5)
        time.sleep(0.5)
    finally:
        err = daemon.stop_and_read()
    assert f"log missing log={missing}" in err
    ban_lines = [line for line in err.splitlines() if STRANGER_V4 in line]
    assert len(ban_lines) == 1, err
    assert f"ban addr={STRANGER_V4}/32 filter=nginx-auth failures=3" in ban_lines[0]


def test_a_plain_apply_to_another_table_leaves_no_old_table_and_keeps_bans(world):
    world.server.listen(8080)
    world.server.listen(11434)
    text = """\
        version: 1
        table: {table}
        services:
          ollama: {{ports: [11434], allow: [127.0.0.0/8]}}
          proxy: {{ports: [8080], allow: [any]}}
        """
    first = world.policy(text.format(table="policyd"), "first.yaml")
    moved = world.policy(text.format(table="guard"), "moved.yaml")
    assert world.server.policyd("apply", first, "--force").returncode == 0
    assert world.server.policyd("ban", STRANGER_V4, "--for", "1h").returncode == 0
    result = world.server.policyd("apply", moved, "--force")
    assert result.returncode == 0, result.stderr
    tables = world.server.nft("list", "tables").stdout
    assert "inet policyd" not in tables and "inet policyd_bans" not in tables
    assert "inet guard" in tables and "inet guard_bans" in tables
    assert not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.3), "the ban lapsed"
    bans = json.loads(world.server.policyd("bans", "--json").stdout)
    assert [b["network"] for b in bans] == [f"{STRANGER_V4}/32"]


def test_a_log_path_that_turns_into_a_directory_is_reported_not_fatal(world):
    log = world.lab.tmp / "error.log"
    log.write_text("")
    world.server.listen(8080)
    policy = world.policy(ban_policy(log_file(log)))
    assert world.server.policyd("apply", policy, "--force").returncode == 0
    log.unlink()
    log.mkdir()
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert wait_for(lambda: json.loads(world.server.policyd("status", "--json").stdout)[
            "logs"][0]["error"], 5)
        assert wait_for(lambda: f'policyd_log_errors{{log="{log}"}} 1' in
                        world.server.policyd("metrics").stdout, 5)
        assert f"the daemon does not follow {log}" in world.server.policyd("doctor",
                                                                          policy).stdout
        assert daemon.proc.poll() is None
    finally:
        daemon.stop_and_read()
