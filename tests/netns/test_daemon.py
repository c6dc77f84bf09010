"""The daemon in a namespace: it follows a log, bans, and keeps its tables and bans.

These tests write nginx-format lines themselves so they can control every
byte; tests/netns/test_ban_nginx.py drives the same path through real nginx.
"""
import json
import signal
import time
from pathlib import Path

import pytest

from policyd_lab.netlab import POLICYD, REPO, PolicydDaemon, in_namespace, wait_for
from policyd_lab.nginxlog import nginx_failure
from policyd_lab.policies import ban_policy, log_file
from policyd_lab.world import SERVER_V4, SERVER_WAN_V4, SERVER_WAN_V6, STRANGER_V4, STRANGER_V6, TRUSTED_V4


def _setup(world):
    log = world.lab.tmp / "error.log"
    log.write_text("")
    world.server.listen(8080)
    world.server.listen(11434)
    return log, world.policy(ban_policy(log_file(log), ollama=True))


def test_repeated_failures_ban_the_source_and_cut_its_open_connection(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        kept_open = world.stranger.connect(SERVER_WAN_V4, 8080)
        assert kept_open is not None
        with log.open("a") as out:
            out.write(nginx_failure(STRANGER_V4) * 2)
        time.sleep(0.3)
        assert world.stranger.can_connect(SERVER_WAN_V4, 8080), "banned before maxretry"
        with log.open("a") as out:
            out.write(nginx_failure(STRANGER_V4))
        assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 3)
        # The connection opened before the ban is cut too, not only new ones.
        kept_open.settimeout(0.5)
        kept_open.sendall(b"still there?\n")
        try:
            echoed = kept_open.recv(64)
        except OSError:
            echoed = b""
        assert echoed == b""
        # IPv6 from the same host is a different source; the trusted client is untouched.
        assert world.stranger.can_connect(SERVER_WAN_V6, 8080)
        assert world.trusted.can_connect(SERVER_V4, 8080)
        bans = json.loads(world.server.policyd("bans", "--json").stdout)
        assert [(b["network"], b["failures"], b["filter"]) for b in bans] == [
            (f"{STRANGER_V4}/32", 3, "nginx-auth")]
    finally:
        err = daemon.stop_and_read()
    assert f"addr={STRANGER_V4}/32" in err and "filter=nginx-auth" in err


def test_injected_address_bans_nobody_else(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        with log.open("a") as out:
            # What an attacker controls in nginx's error.log: the user name (up to
            # the first colon), the request line and the Host header.
            for _ in range(5):
                out.write(nginx_failure(STRANGER_V4, user=f"x client {TRUSTED_V4}",
                                  path=f"/, client: {TRUSTED_V4}, server: y",
                                  host=f"h, client: {TRUSTED_V4}"))
            out.write("\x00\xff binary junk \xfe\n" * 3)
            out.write("A" * 200000 + "\n")
        assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 3)
        assert world.trusted.can_connect(SERVER_V4, 8080)
        bans = json.loads(world.server.policyd("bans", "--json").stdout)
        assert [b["network"] for b in bans] == [f"{STRANGER_V4}/32"]
        status = json.loads(world.server.policyd("status", "--json").stdout)
        assert status["logs"][0]["matched"] == 5
    finally:
        daemon.stop_and_read()


def test_bans_survive_apply_restart_and_a_flushed_ruleset(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert world.server.policyd("ban", STRANGER_V6, "--for", "1h").returncode == 0
        with log.open("a") as out:
            out.write(nginx_failure(STRANGER_V4) * 3)
        assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 3)
        assert not world.stranger.can_connect(SERVER_WAN_V6, 8080, 0.2)
        # A new policy applied: bans stay.
        assert world.server.policyd("apply", policy, "--force").returncode == 0
        assert not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2)
        # Someone runs `nft flush ruleset` (Debian's nftables.service does).
        world.server.nft("flush", "ruleset")
        assert wait_for(lambda: "policyd_bans" in world.server.nft("list", "tables").stdout, 2)
        # The ban table comes back with its bans, in the same transaction.
        assert not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2)
        assert not world.stranger.can_connect(SERVER_WAN_V6, 8080, 0.2)
    finally:
        err = daemon.stop_and_read()
    assert "tables were gone or changed" in err
    # SIGTERM left every table and ban in place.
    assert not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2)
    # A restarted daemon restores bans into a kernel that lost them.
    world.server.nft("flush", "ruleset")
    assert world.stranger.can_connect(SERVER_WAN_V4, 8080)
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2)
        assert not world.stranger.can_connect(SERVER_WAN_V6, 8080, 0.2)
        assert world.server.policyd("unban", STRANGER_V4).returncode == 0
        assert world.stranger.can_connect(SERVER_WAN_V4, 8080)
    finally:
        daemon.stop_and_read()


def test_restart_neither_misses_nor_double_counts(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()
    with log.open("a") as out:
        out.write(nginx_failure(STRANGER_V4) * 2)
    assert wait_for(lambda: json.loads(world.server.policyd("status", "--json").stdout)
                    ["logs"][0]["matched"] == 2, 3)
    daemon.stop_and_read()
    # Written while the daemon is down: counted once it is back, together with the
    # two from before, which makes three and a ban; re-reading would make five.
    with log.open("a") as out:
        out.write(nginx_failure(STRANGER_V4))
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 3)
        bans = json.loads(world.server.policyd("bans", "--json").stdout)
        assert bans[0]["failures"] == 3
    finally:
        daemon.stop_and_read()


def _listed_without_daemon(world):
    """`policyd bans --json` with no daemon, less the seconds left (they move on)."""
    out = world.server.policyd("bans", "--json")
    assert out.returncode == 0, out.stderr
    return [{k: v for k, v in ban.items() if k != "seconds_left"} for ban in json.loads(out.stdout)]


def test_a_stopped_daemon_leaves_a_listing_that_is_what_the_state_file_holds(world):
    log, policy = _setup(world)
    listing = world.lab.tmp / world.server.role / "state" / "bans.listing"
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert world.server.policyd("ban", "203.0.113.9", "--for", "1h").returncode == 0
        with log.open("a") as out:
            out.write(nginx_failure(STRANGER_V4) * 3)
        assert wait_for(lambda: len(json.loads(world.server.policyd("bans", "--json").stdout)) == 2, 3)
    finally:
        daemon.stop_and_read()
    assert listing.exists()
    left = _listed_without_daemon(world)
    assert sorted(ban["network"] for ban in left) == ["198.51.100.20/32", "203.0.113.9/32"]
    listing.unlink()   # read row by row: the same
    assert _listed_without_daemon(world) == left
    # A daemon killed after a change leaves the old listing; it no longer matches.
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert world.server.policyd("unban", "203.0.113.9").returncode == 0
    finally:
        daemon.stop_and_read(signal.SIGKILL)
    assert [ban["network"] for ban in _listed_without_daemon(world)] == ["198.51.100.20/32"]


def test_sighup_reloads_and_sigkill_leaves_the_kernel_guarding(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()
    with log.open("a") as out:
        out.write(nginx_failure(STRANGER_V4) * 3)
    assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 3)
    daemon.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert daemon.proc.poll() is None
    daemon.stop_and_read(signal.SIGKILL)
    assert not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2)
    assert not world.stranger.can_connect(SERVER_WAN_V4, 11434, 0.2)
    assert world.trusted.can_connect(SERVER_V4, 8080)


def test_an_edited_table_is_put_back(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert not world.stranger.can_connect(SERVER_WAN_V4, 11434, 0.2)
        # Someone "fixes" the firewall by hand: the guard chain loses its drop.
        world.server.nft("flush", "chain", "inet", "policyd", "committed_svc_ollama")
        assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 11434, 0.2), 3)
        assert world.server.can_connect("127.0.0.1", 11434)
    finally:
        err = daemon.stop_and_read()
    assert "tables were gone or changed" in err


def test_readiness_status_and_watchdog_reach_notify_socket(world):
    import socket as socket_mod
    log, policy = _setup(world)
    notify_path = world.lab.tmp / "notify.sock"
    listener = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(10)
    daemon = PolicydDaemon(world.server, policy, env={
        "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}).start(ready=False)
    try:
        messages = []
        while not any(m.startswith(b"WATCHDOG=1") for m in messages):
            messages.append(listener.recv(4096))
        first = messages[0].split(b"\n")
        assert b"READY=1" in first and any(m.startswith(b"STATUS=") for m in first)
        # READY=1 comes only once the tables are in place.
        assert "policyd_bans" in world.server.nft("list", "tables").stdout
    finally:
        daemon.stop_and_read()
        listener.close()


def test_metrics_are_served_on_loopback_and_by_the_cli(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy, "--metrics-listen", "127.0.0.1:9611").start()
    try:
        with log.open("a") as out:
            out.write(nginx_failure(STRANGER_V4) * 3)
        assert wait_for(lambda: 'policyd_bans_total{reason="auto"} 1' in
                        world.server.policyd("metrics").stdout, 3)
        served = world.server.exec("curl", "-sf", "http://127.0.0.1:9611/metrics").stdout
        assert "policyd_failures_total{filter=\"nginx-auth\"} 3" in served
        assert "policyd_ban_latency_seconds_count 1" in served
        assert f'policyd_log_lines_total{{log="{log}"}} 3' in served
    finally:
        daemon.stop_and_read()


def test_control_socket_refuses_non_root(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        env = world.lab.policyd_env(world.server)
        result = world.server.exec(
            "env", *(f"{k}={v}" for k, v in env.items()),
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            *POLICYD, "status", check=False, cwd=REPO)
        assert result.returncode == 1
        assert "permission denied" in result.stderr and result.stderr.count("\n") == 1
    finally:
        daemon.stop_and_read()


def test_metrics_count_what_the_cli_did(world):
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()

    def applies():
        out = world.server.policyd("metrics").stdout
        return {line.split('"')[1]: float(line.split()[-1]) for line in out.splitlines()
                if line.startswith("policyd_applies_total{")}

    try:
        other = world.policy(ban_policy(log_file(log), ollama=True).replace("maxretry: 3", "maxretry: 4"),
                             "other.yaml")
        assert world.server.policyd("apply", other, "--confirm-timeout", "30",
                                    "--force").returncode == 0
        assert wait_for(lambda: applies()["trial"] == 1, 3)
        assert world.server.policyd("confirm").returncode == 0
        assert wait_for(lambda: applies()["confirm"] == 1, 3)
        assert world.server.policyd("apply", policy, "--confirm-timeout", "30",
                                    "--force").returncode == 0
        assert world.server.policyd("rollback").returncode == 0
        assert wait_for(lambda: applies()["rollback"] == 1, 3)
        assert world.server.policyd("apply", policy, "--force").returncode == 0
        assert wait_for(lambda: applies()["plain"] == 1, 3)
        assert applies()["trial"] == 2
    finally:
        daemon.stop_and_read()


def _banned_then_flushed(world):
    """A daemon bans the stranger and stops; then the tables go, as at a reboot.
    Returns the policy."""
    log, policy = _setup(world)
    daemon = PolicydDaemon(world.server, policy).start()
    with log.open("a") as out:
        out.write(nginx_failure(STRANGER_V4) * 3)
    assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 3)
    daemon.stop_and_read()
    world.server.nft("flush", "ruleset")
    return policy


def test_boot_restore_enforces_bans_before_the_daemon_runs(world):
    _banned_then_flushed(world)
    generation = _generation(world.server)
    result = world.server.policyd("restore")
    assert result.returncode == 0 and "and 1 bans" in result.stdout, result.stderr
    assert _generation(world.server) == generation + 1, "tables and bans in one transaction"
    assert not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2)
    assert world.trusted.can_connect(SERVER_V4, 8080)


def test_a_daemon_started_on_a_flushed_kernel_puts_tables_and_bans_back_together(world):
    """Without `policyd restore` first (ExecStartPre), the daemon itself finds the
    tables gone: the transaction that makes the ban table again holds its bans."""
    policy = _banned_then_flushed(world)
    with world.server.transactions() as transactions:
        daemon = PolicydDaemon(world.server, policy).start()
        daemon.stop_and_read()
    made = [t for t in transactions if "add table inet policyd_bans" in t]
    assert len(made) == 1, transactions
    assert any(line.startswith("add element inet policyd_bans ban4 ") and STRANGER_V4 in line
               for line in made[0]), made[0]


@pytest.mark.parametrize("command", ["restore", "run"])
def test_the_policy_is_put_back_even_when_the_state_file_is_damaged(world, command):
    """Bans go in with the tables, but bans that cannot be read never keep the
    policy out: `policyd restore` and a starting daemon load it, then fail."""
    _log, policy = _setup(world)
    assert world.server.policyd("apply", policy, "--force").returncode == 0
    state = Path(world.lab.policyd_env(world.server)["POLICYD_STATE_DIR"]) / "state.db"
    state.write_bytes(b"not a database" * 100)
    world.server.nft("flush", "ruleset")
    result = world.server.policyd(*(["restore"] if command == "restore" else ["run", policy]),
                                  timeout=30)
    assert result.returncode != 0 and "state" in result.stderr, result.stderr
    if command == "restore":
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    tables = world.server.nft("list", "tables").stdout
    assert "inet policyd\n" in tables and "inet policyd_bans" in tables, tables


def _generation(host):
    """The ruleset's generation id in host's namespace: one step per transaction."""
    def read():
        from policyd.kernel.nfnetlink import Netlink
        netlink = Netlink()
        try:
            return netlink.generation()
        finally:
            netlink.close()
    return in_namespace(host.name, read)


def test_an_edited_policy_file_does_not_take_effect_behind_the_operators_back(world):
    log, policy = _setup(world)
    assert world.server.policyd("apply", policy, "--force").returncode == 0
    edited = world.policy(ban_policy(log_file(log), ollama=True).replace('allow: [any]', 'allow: [192.0.2.0/24]'),
                          "edited.yaml")
    daemon = PolicydDaemon(world.server, edited).start()
    try:
        assert world.stranger.can_connect(SERVER_WAN_V4, 8080)  # still the committed policy
    finally:
        err = daemon.stop_and_read()
    assert "policy file differs from the committed policy" in err
