"""Five policyd nodes share bans over a real redis-server, each in its own namespace.

One lab (module scope) serves every test: a bridge, Redis, an attacker and five
daemons; n1 runs real nginx with basic auth, n4 has the attacker's main address
on its ignore list. Each test bans its own attacker address so they do not mix.
"""
import os
import shutil
import signal
import time

import pytest

from policyd_lab.fleetlab import ATTACKER_EXTRA, ATTACKER_V4, STREAM_PREFIX, FleetLab
from policyd_lab.netlab import Lab, leftover_namespaces, wait_for
from policyd_lab.proxies import start_nginx, start_ollama_standin
from policyd_lab.webclient import http_get, syn_answered

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server (make setup installs it)")
BAD = ("ollama", "wrong")
PROPAGATION = 10  # seconds: generous on a loaded 2-core machine; the bench measures ms


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("fleet"))
    world = None
    try:
        world = FleetLab(lab)
        world.start_redis()
        n1 = world.nodes[0]
        start_ollama_standin(n1)
        world.nginx = start_nginx(n1, lab.tmp / "nginx", error_log_level="error")
        for host in world.nodes[1:]:
            host.listen(8080)
        policies = {}
        for host in world.nodes:
            logs = (f"{{path: {world.nginx.error_log}, filter: nginx-auth}}"
                    if host is n1 else "")
            ignore = [ATTACKER_V4] if host.role == "n4" else []
            policies[host] = world.policy(host, ignore=ignore, logs=logs)
        world.policies = policies
        world.start_daemons(policies)
        yield world
    finally:
        if world is not None:
            world.stop_all()
        lab.close()
        assert not leftover_namespaces(lab.prefix)


def answers(world, host, source, timeout=0.3):
    return syn_answered(world.attacker, host.address, 8080, timeout, source=source)


def dropped_by(world, hosts, source):
    return all(not answers(world, host, source) for host in hosts)


def open_to(world, hosts, source):
    return all(answers(world, host, source, timeout=1.0) for host in hosts)


def node(world, role):
    return next(host for host in world.nodes if host.role == role)


def test_nginx_failures_on_one_node_ban_the_attacker_on_every_node_but_the_one_ignoring_it(fleet):
    n1 = fleet.nodes[0]
    url = f"http://{n1.address}:8080/api/tags"
    assert open_to(fleet, fleet.nodes, ATTACKER_V4)
    for _ in range(3):
        http_get(fleet.attacker, url, auth=BAD, source=ATTACKER_V4)
    others = [host for host in fleet.nodes if host.role != "n4"]
    assert wait_for(lambda: dropped_by(fleet, others, ATTACKER_V4), PROPAGATION)
    # n4 lists the attacker in its ignore list: it refuses the ban from n1.
    n4 = node(fleet, "n4")
    assert wait_for(lambda: fleet.status(n4)["fleet"]["rejected"]["protected"] >= 1, PROPAGATION)
    assert answers(fleet, n4, ATTACKER_V4, timeout=1.0)
    assert ATTACKER_V4 not in fleet.kernel_bans(n4)
    # The kernel holds each received ban with a timeout near n1's own (server clock).
    origin = fleet.kernel_bans(n1)[ATTACKER_V4]
    for host in others[1:]:
        left = fleet.kernel_bans(host)[ATTACKER_V4]
        assert abs(left - origin) <= 30, (host.role, left, origin)
    status = fleet.status(node(fleet, "n2"))["fleet"]
    assert status["connected"] and status["node"] == "n2"
    assert status["peers"]["n1"]["applied"] >= 1
    assert fleet.status(n1)["fleet"]["published"] >= 1
    text = node(fleet, "n3").policyd("status").stdout
    assert "fleet:     node n3 connected to redis://n3@" in text and "4 peers seen" in text
    metrics = node(fleet, "n3").policyd("metrics").stdout
    assert 'policyd_fleet_received_total{node="n1"}' in metrics
    assert "policyd_fleet_latency_seconds_count" in metrics
    assert 'policyd_fleet_applied_total{op="ban"}' in metrics


def test_manual_ban_and_unban_from_other_nodes(fleet):
    source = ATTACKER_EXTRA[0]
    n3, n5 = node(fleet, "n3"), node(fleet, "n5")
    assert n3.policyd("ban", source, "--for", "10m").returncode == 0
    assert wait_for(lambda: dropped_by(fleet, fleet.nodes, source), PROPAGATION)
    bans = fleet.status(n5)
    assert bans["fleet"]["peers"]["n3"]["applied"] >= 1
    out = n5.policyd("bans", "--json").stdout
    assert '"filter": "fleet:n3"' in out
    # Unbanned on another node than the one that banned it: lifted everywhere.
    assert n5.policyd("unban", source).returncode == 0
    assert wait_for(lambda: open_to(fleet, fleet.nodes, source), PROPAGATION)


def test_an_ipv6_ban_travels_exactly_as_wide_as_it_was_made(fleet):
    n1, n4 = fleet.nodes[0], node(fleet, "n4")
    assert n1.policyd("ban", "2001:db8:9:1::5", "--for", "10m").returncode == 0

    def ban6(host):
        # A single IPv6 address is banned as itself: the range set, not the /64s.
        return host.nft("list", "set", "inet", "policyd_bans", "ban6_range", check=False).stdout
    assert wait_for(lambda: all("2001:db8:9:1::5" in ban6(host) for host in fleet.nodes),
                    PROPAGATION)
    assert n4.policyd("unban", "2001:db8:9:1::5").returncode == 0
    assert wait_for(lambda: all("2001:db8:9:1::5" not in ban6(host) for host in fleet.nodes),
                    PROPAGATION)


def test_a_node_cannot_write_another_nodes_stream_and_doctor_says_the_acl_works(fleet):
    import redis
    n1, n2 = fleet.nodes[0], fleet.nodes[1]
    password = fleet.passwords["n1"]
    own = fleet.as_user(n1, "n1", password,
                        lambda c: c.xtrim(STREAM_PREFIX + "n1", minid=0))
    assert own == 0
    for forged in (lambda c: c.xadd(STREAM_PREFIX + "n2", {"v": "1", "op": "unban",
                                                           "net": ATTACKER_V4}),
                   lambda c: c.delete(STREAM_PREFIX + "n2"),
                   lambda c: c.xadd("policyd:{bans}:n9", {"v": "1", "op": "hello"}),
                   lambda c: c.set("policyd:{bans}:n2", "x"),
                   lambda c: c.flushall()):
        with pytest.raises(redis.ResponseError, match="NOPERM|no permissions"):
            fleet.as_user(n1, "n1", password, forged)
    # Reading the others is allowed: that is how bans travel.
    assert fleet.as_user(n1, "n1", password, lambda c: c.xrange(STREAM_PREFIX + "n2", count=1)) \
        is not None
    doctor = n2.policyd("doctor", str(fleet.policies[n2]))
    fleet_lines = [line for line in doctor.stdout.splitlines() if " fleet: " in line]
    assert len(fleet_lines) == 4, doctor.stdout
    assert all(line.startswith("ok") for line in fleet_lines), doctor.stdout
    # A node user whose ACL lets it write every stream: doctor says so.
    fleet.admin(lambda c: c.acl_setuser("n6", enabled=True, passwords=["+pw-n6"],
                                        commands=["+@all"], keys=["policyd:{bans}:*"]))
    secret = fleet.tmp / "n6.secret"
    secret.write_text("pw-n6\n")
    os.chmod(secret, 0o600)
    wide = fleet.tmp / "n6.yaml"
    wide.write_text(fleet.policies[n2].read_text().replace("n2@", "n6@")
                    .replace("node: n2", "node: n6")
                    .replace(str(fleet.tmp / "n2.secret"), str(secret)))
    doctor = n2.policyd("doctor", str(wide))
    assert "fail fleet: this node may write other nodes' streams" in doctor.stdout, doctor.stdout
    assert doctor.returncode == 1


def test_garbage_in_the_streams_is_skipped_and_counted(fleet):
    n2, n3 = fleet.nodes[1], fleet.nodes[2]
    source = ATTACKER_EXTRA[1]
    before = fleet.status(n3)["fleet"]["rejected"]["malformed"]
    future_ms = int(time.time() * 1000) + 86400 * 1000
    garbage = [
        {"v": "1", "op": "ban", "net": "0.0.0.0/0", "ttl": "99", "reason": "auto", "x": "y"},
        {"v": "1", "op": "ban", "net": "192.0.2.1/24", "ttl": "1000", "reason": "auto"},
        {"v": "1", "op": "ban", "net": source, "ttl": "-5", "reason": "auto"},
        {"v": "1", "op": "ban", "net": source, "ttl": "1e9", "reason": "auto"},
        {"v": "1", "op": "ban", "net": source, "ttl": "1000", "reason": "evil"},
        {"v": "2", "op": "ban", "net": source},
        {"v": "1", "op": "nuke"},
        {"v": "1", "op": "ban", "net": "x" * 5000, "ttl": "1000", "reason": "auto"},
        {b"v": b"1", b"op": b"\xff\xfe", b"net": source},
        {"junk": "1"},
    ]

    def write(client):
        for fields in garbage:
            client.xadd(STREAM_PREFIX + "n2", fields)
        # An explicit id one day ahead: n2's later ids would follow it and sort
        # its bans after everyone's unbans; n2 starts its stream again, and
        # the readers, whose cursors are a day ahead, read it from the start.
        client.xadd(STREAM_PREFIX + "n2", {"v": "1", "op": "hello"}, id=f"{future_ms}-0")
        client.xadd(STREAM_PREFIX + "evil node", {"v": "1", "op": "hello"})
        client.set(STREAM_PREFIX + "n7", "not a stream")
    fleet.admin(write)
    assert wait_for(lambda: fleet.status(n3)["fleet"]["rejected"]["malformed"]
                    >= before + len(garbage), PROPAGATION)
    # Every daemon lives on and a real ban still travels.
    assert all(fleet.status(host) is not None for host in fleet.nodes)
    assert n2.policyd("ban", source, "--for", "10m").returncode == 0
    assert wait_for(lambda: dropped_by(fleet, fleet.nodes, source), PROPAGATION)
    left = fleet.kernel_bans(n3)[source]
    assert left <= 600, left  # the future id bought no extra time

    def n2_stream_is_back_in_the_present():
        last = fleet.admin(lambda c: c.xinfo_stream(STREAM_PREFIX + "n2")["last-generated-id"])
        return int(last.split(b"-")[0]) < future_ms - 3600 * 1000
    assert wait_for(n2_stream_is_back_in_the_present, PROPAGATION)
    # Its bans are in the restarted stream again, and still enforced everywhere.
    assert wait_for(lambda: any(fields.get(b"net") == f"{source}/32".encode() for _id, fields
                                in fleet.admin(lambda c: c.xrange(STREAM_PREFIX + "n2"))),
                    PROPAGATION)
    assert dropped_by(fleet, fleet.nodes, source)


def test_a_compromised_node_flooding_its_own_stream_is_held_to_the_rate_limit(fleet):
    n2, n3 = fleet.nodes[1], fleet.nodes[2]
    flood = [f"203.0.113.{n}/32" for n in range(1, 255)] + [f"198.51.100.{n}/32" for n in range(1, 255)]

    def write(client):
        pipe = client.pipeline(transaction=False)
        for network in flood:
            pipe.xadd(STREAM_PREFIX + "n2", {"v": "1", "op": "ban", "net": network,
                                             "ttl": "600000", "reason": "auto"})
        # Loopback and n3's own neighbours are this node's business, not n2's.
        pipe.xadd(STREAM_PREFIX + "n2", {"v": "1", "op": "ban", "net": "127.0.0.1/32",
                                         "ttl": "600000", "reason": "auto"})
        pipe.execute()
    fleet.as_user(n2, "n2", fleet.passwords["n2"], write)  # n2's own credentials
    assert wait_for(lambda: fleet.status(n3)["fleet"]["rejected"]["rate"] > 0, PROPAGATION)
    status = fleet.status(n3)
    flooded = [b for b in fleet.kernel_bans(n3) if b.startswith(("203.0.113.", "198.51.100."))]
    # Burst 200 (2 x 100/second) plus what the seconds of writing refilled; never all 508.
    assert 0 < len(flooded) < len(flood), len(flooded)
    assert "127.0.0.1" not in fleet.kernel_bans(n3)
    assert status["fleet"]["connected"]


def test_a_restarted_node_catches_up_before_it_is_ready(fleet):
    n2, n5 = fleet.nodes[1], node(fleet, "n5")
    banned, lifted, unbanned_here = ATTACKER_EXTRA[2], ATTACKER_EXTRA[3], ATTACKER_EXTRA[6]
    for source in (lifted, unbanned_here):
        assert n2.policyd("ban", source, "--for", "10m").returncode == 0
    assert wait_for(lambda: {lifted, unbanned_here} <= set(fleet.kernel_bans(n5)), PROPAGATION)
    # n5's own unban outranks n2's older ban when n5 reads n2's stream again.
    assert n5.policyd("unban", unbanned_here).returncode == 0
    assert wait_for(lambda: unbanned_here not in fleet.kernel_bans(n2), PROPAGATION)
    err = fleet.stop_daemon(n5)
    assert "Traceback" not in err
    assert n2.policyd("ban", banned, "--for", "10m").returncode == 0
    assert n2.policyd("unban", lifted).returncode == 0
    fleet.start_daemon(n5, fleet.policies[n5])
    # Ready means caught up: the kernel has what happened while it was away.
    kernel = fleet.kernel_bans(n5)
    assert banned in kernel and lifted not in kernel and unbanned_here not in kernel
    assert not answers(fleet, n5, banned)


def test_a_new_node_starts_with_every_active_ban(fleet):
    n5 = node(fleet, "n5")
    expected = {ip for ip in fleet.kernel_bans(fleet.nodes[1]) if ip.startswith("192.0.2.")}
    assert ATTACKER_V4 in expected
    fleet.stop_daemon(n5)
    # A new box: no state, no tables; only its policy and the fleet's streams.
    shutil.rmtree(fleet.lab.tmp / "n5" / "state")
    n5.nft("flush", "ruleset")
    fleet.start_daemon(n5, fleet.policies[n5])
    assert expected <= set(fleet.kernel_bans(n5))
    assert not answers(fleet, n5, ATTACKER_V4)


def test_a_ban_made_without_a_daemon_is_published_when_it_starts(fleet):
    n3 = node(fleet, "n3")
    source = ATTACKER_EXTRA[7]
    fleet.stop_daemon(n3)
    out = n3.policyd("ban", source, "--for", "10m")
    assert out.returncode == 0, out.stderr
    fleet.start_daemon(n3, fleet.policies[n3])
    assert wait_for(lambda: dropped_by(fleet, fleet.nodes, source), PROPAGATION)


def test_a_new_fleet_block_takes_effect_on_apply_and_caps_received_bans(fleet):
    n2, n5 = fleet.nodes[1], node(fleet, "n5")
    capped = fleet.policy(n5, extra="  accept:\n    max_duration: 2m\n")
    out = n5.policyd("apply", str(capped), "--force")
    assert out.returncode == 0, out.stderr
    fleet.policies[n5] = capped
    # The daemon takes the committed policy in its next housekeeping round.
    assert wait_for(lambda: fleet.status(n5)["fleet"]["accept"]["max_duration"] == 120, 10)
    assert wait_for(lambda: fleet.status(n5)["fleet"]["connected"], PROPAGATION)
    source = ATTACKER_EXTRA[8]
    assert n2.policyd("ban", source, "--for", "1h").returncode == 0
    assert wait_for(lambda: source in fleet.kernel_bans(n5), PROPAGATION)
    assert fleet.kernel_bans(n5)[source] <= 120
    assert fleet.kernel_bans(n2)[source] > 3000


def test_a_node_cut_off_from_redis_catches_up_both_ways(fleet):
    n1, n2 = fleet.nodes[0], fleet.nodes[1]
    from_n1, from_n2 = ATTACKER_EXTRA[9], ATTACKER_EXTRA[10]
    n1.ip("link", "set", "eth0", "down")
    try:
        assert n1.policyd("ban", from_n1, "--for", "10m").returncode == 0
        assert n2.policyd("ban", from_n2, "--for", "10m").returncode == 0
        assert from_n1 in fleet.kernel_bans(n1)
        assert wait_for(lambda: from_n2 in fleet.kernel_bans(fleet.nodes[2]), PROPAGATION)
        assert from_n2 not in fleet.kernel_bans(n1) and from_n1 not in fleet.kernel_bans(n2)
        time.sleep(fleet_socket_timeout() + 1)  # long enough for n1's links to notice
        assert not fleet.status(n1)["fleet"]["connected"]
    finally:
        n1.ip("link", "set", "eth0", "up")
    assert wait_for(lambda: from_n2 in fleet.kernel_bans(n1), 3 * PROPAGATION)
    assert wait_for(lambda: all(from_n1 in fleet.kernel_bans(host) for host in fleet.nodes[1:]),
                    3 * PROPAGATION)


def fleet_socket_timeout():
    from policyd.fleet.transport import SOCKET_TIMEOUT
    return SOCKET_TIMEOUT


def test_redis_down_then_back_empty(fleet):
    n1, n2, n3 = fleet.nodes[:3]
    during = ATTACKER_EXTRA[4]
    fleet.kill_redis()
    assert wait_for(lambda: not fleet.status(n1)["fleet"]["connected"], PROPAGATION)
    # Local banning goes on at once; the ban waits in n1's outbox.
    started = time.monotonic()
    assert n1.policyd("ban", during, "--for", "10m").returncode == 0
    assert not answers(fleet, n1, during)
    assert time.monotonic() - started < 30
    assert fleet.status(n1)["fleet"]["outbox"] >= 1
    # n1 dies (SIGKILL) while Redis is away: the outbox is in its state, not in memory.
    fleet.stop_daemon(n1, signal.SIGKILL)
    fleet.start_daemon(n1, fleet.policies[n1])
    assert fleet.status(n1)["fleet"]["outbox"] >= 1
    fleet.start_redis()  # empty: no persistence
    assert wait_for(lambda: dropped_by(fleet, fleet.nodes, during), 3 * PROPAGATION)
    assert wait_for(lambda: fleet.status(n1)["fleet"]["outbox"] == 0, PROPAGATION)
    # Every node refilled its stream with what it still bans.

    def stream_networks(role):
        return fleet.admin(lambda c: {fields.get(b"net") for _id, fields
                                      in c.xrange(STREAM_PREFIX + role)})
    assert wait_for(lambda: f"{ATTACKER_V4}/32".encode() in stream_networks("n1"), PROPAGATION)
    assert wait_for(lambda: f"{ATTACKER_EXTRA[1]}/32".encode() in stream_networks("n2"), PROPAGATION)
    # n2's cursor on other nodes had been pushed a day ahead; new bans still arrive.
    after = ATTACKER_EXTRA[5]
    assert n2.policyd("ban", after, "--for", "10m").returncode == 0
    assert wait_for(lambda: dropped_by(fleet, fleet.nodes, after), PROPAGATION)
    assert fleet.status(n3)["fleet"]["connected"]
