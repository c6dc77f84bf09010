"""`policyd doctor` in a real namespace: wildcard listeners, the tables policyd
loads and what happens when they go or change, interfaces, logs, a trial, and a
host where everything is in order."""
import json
import os
import socket

import pytest

LOCAL_POLICY = """\
    version: 1
    services:
      ollama:
        ports: [11434]
        allow: [127.0.0.0/8, "::1", 192.0.2.0/24, "2001:db8:1::/64", {iface: lan0}]
"""


def doctor(world, policy):
    """Run `policyd doctor --json` on the server: (exit code, findings)."""
    result = world.server.policyd("doctor", "--json", policy)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, report["findings"]


def findings_of(findings, check, level=None):
    return [f for f in findings if f["check"] == check and level in (None, f["level"])]


def listen_on(world, family, address, port, v6only=False):
    """A listening socket in the server's namespace, owned by this test process."""
    sock = world.server.socket(family)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(8)
    return sock


@pytest.fixture
def control_socket(world):
    """A listening unix socket where the daemon's would be: doctor's daemon check passes."""
    run_dir = world.lab.tmp / "srv" / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(run_dir / "control.sock"))
    sock.listen(1)
    yield sock
    sock.close()


def test_listeners_on_every_address_are_warned_about_by_address(world):
    policy = world.policy(LOCAL_POLICY)
    v4 = listen_on(world, socket.AF_INET, "0.0.0.0", 11434)
    v6 = listen_on(world, socket.AF_INET6, "::", 11434, v6only=True)
    try:
        code, findings = doctor(world, policy)
    finally:
        v4.close()
        v6.close()
    assert code == 1
    warnings = findings_of(findings, "listener", "warn")
    messages = " | ".join(w["message"] for w in warnings)
    assert len(warnings) == 2, messages
    assert "0.0.0.0:11434" in messages and "[::]:11434" in messages
    assert f"(pid {os.getpid()})" in messages  # the owner, found through /proc
    assert "NOT loaded" in messages  # nothing applied yet
    assert all(w["fix"] for w in warnings)


def test_tables_loaded_then_deleted_then_changed(world):
    policy = world.policy(LOCAL_POLICY)
    world.server.listen(11434)  # dual-stack, on [::]
    assert world.server.policyd("apply", policy).returncode == 0, "apply failed"
    code, findings = doctor(world, policy)
    assert [f["level"] for f in findings_of(findings, "table")] == ["ok", "ok"]
    assert findings_of(findings, "drift")[0]["level"] == "ok"
    # Behind the loaded table a wildcard listener is the LAN set-up, not a finding.
    listener, = findings_of(findings, "listener", "ok")
    assert "[::]:11434" in listener["message"] and "(loaded)" in listener["message"]

    world.server.nft("add", "element", "inet", "policyd", "committed_ollama_v4",
                     "{ 203.0.113.0/24 }")
    code, findings = doctor(world, policy)
    drift, = findings_of(findings, "drift", "fail")
    assert "203.0.113.0/24" in drift["message"] and code == 1

    world.server.nft("delete", "table", "inet", "policyd")
    code, findings = doctor(world, policy)
    assert code == 1
    guard, bans = findings_of(findings, "table")
    assert guard["level"] == "fail" and "inet policyd is missing" in guard["message"]
    assert bans["level"] == "ok"
    assert findings_of(findings, "drift") == []


def test_a_trial_is_reported_as_a_trial_not_as_drift(world):
    policy = world.policy(LOCAL_POLICY)
    candidate = world.policy(LOCAL_POLICY.replace("{iface: lan0}", "198.51.100.0/24"),
                             name="candidate.yaml")
    assert world.server.policyd("apply", policy).returncode == 0
    result = world.server.policyd("apply", "--confirm-timeout", "300", candidate)
    assert result.returncode == 0, result.stderr
    code, findings = doctor(world, policy)
    trial, = findings_of(findings, "trial")
    assert trial["level"] == "warn" and "s left" in trial["message"]
    assert findings_of(findings, "drift")[0]["level"] == "ok"
    assert code == 1


def test_missing_interface_and_missing_log_are_warnings(world):
    policy = world.policy("""\
        version: 1
        services:
          ollama:
            ports: [11434]
            allow: [{iface: lan0}, {iface: nosuch0}]
        bans:
          logs:
            - {path: /var/log/policyd-doctor-test/nowhere.log, filter: nginx-auth}
    """)
    code, findings = doctor(world, policy)
    assert code == 1
    interfaces = {f["message"].split()[0]: f["level"]
                  for f in findings_of(findings, "interface")}
    assert interfaces == {"lan0": "ok", "nosuch0": "warn"}
    log, = findings_of(findings, "log")
    assert log["level"] == "warn" and "nowhere.log does not exist" in log["message"]
    assert findings_of(findings, "filter")[0]["level"] == "ok"


def test_a_host_in_order_exits_0(world, control_socket):
    policy = world.policy(LOCAL_POLICY)
    local = listen_on(world, socket.AF_INET, "127.0.0.1", 11434)
    try:
        assert world.server.policyd("apply", policy).returncode == 0
        result = world.server.policyd("doctor", policy)
    finally:
        local.close()
    lines = result.stdout.splitlines()
    # The machine's own systemd setup is outside the namespace; only it may warn.
    attention = [l for l in lines if not l.startswith("ok ")]
    host_service = [l for l in attention if l.startswith("warn nftables-service:")]
    assert attention == host_service, result.stdout
    assert result.returncode == (1 if host_service else 0)
    assert any(l.startswith("ok   listener: tcp/11434:") and "127.0.0.1:11434" in l
               for l in lines)
    assert any(l.startswith("ok   daemon:") for l in lines)
