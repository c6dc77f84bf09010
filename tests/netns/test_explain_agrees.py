"""explain says what the kernel does (issue 11): every source kind (allowed, denied,
banned, arriving on an allowed interface) x port kind (guarded, banned-only,
unguarded) x protocol (tcp, udp), each answer checked against a real packet.

test_bans_agree.py covers the kinds of ban (extents, IPv6 units); this covers
the rest of the ruleset that explain walks.
"""
import errno
import json
import socket
import textwrap

import pytest

from policyd_lab.netlab import TIME_SCALE

POLICY = """\
    version: 1
    services:
      api:
        ports: [8443]
        action: reject
        allow: [198.51.100.0/24, {iface: "wg*"}]
      dns:
        ports: [5353]
        proto: udp
        allow: [198.51.100.0/24, {iface: "wg*"}]
    bans:
      ports: [8443, 5353, 2222]
"""
SOURCES = {  # kind -> (client address, server address it talks to, interface on the server)
    "allowed": ("198.51.100.10", "198.51.100.1", "wan0"),
    "denied": ("203.0.113.20", "203.0.113.1", "wan0"),
    "banned": ("203.0.113.30", "203.0.113.1", "wan0"),
    "allowed interface": ("192.0.2.50", "192.0.2.1", "wg0"),
}
PORTS = {"guarded": {"tcp": 8443, "udp": 5353}, "banned-only": {"tcp": 2222, "udp": 2222},
         "unguarded": {"tcp": 9999, "udp": 9999}}
KERNEL_WORD = {"allow": "allow", "drop": "drop", "reject": "reject", "banned": "drop"}
DROP_WAIT = 0.5 * TIME_SCALE


def what_the_kernel_does(host, source, server, port, proto):
    """allow, reject (a reset or ICMP unreachable came back) or drop (nothing did)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = host.socket(socket.AF_INET, kind)
    sock.settimeout(DROP_WAIT)
    try:
        sock.bind((source, 0))
        sock.connect((server, port))
        if proto == "udp":
            sock.send(b"ping")
        return "allow" if sock.recv(16) in (b"hello\n", b"ping") else "drop"
    except ConnectionRefusedError:
        return "reject"
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
            return "reject"
        return "drop"  # socket.timeout
    finally:
        sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from policyd_lab.netlab import Lab
    lab = Lab(tmp_path_factory.mktemp("explain"))
    try:
        server, client, vpn = lab.host("srv"), lab.host("cli"), lab.host("vpn")
        lab.link(server, client, ["198.51.100.1/24", "203.0.113.1/24"],
                 ["198.51.100.10/24", "203.0.113.20/24", "203.0.113.30/24"],
                 a_ifname="wan0", b_ifname="eth0")
        lab.link(server, vpn, ["192.0.2.1/24"], ["192.0.2.50/24"], a_ifname="wg0",
                 b_ifname="eth0")
        for port in (8443, 5353, 2222, 9999):
            server.listen(port)
            server.listen(port, "udp")
        policy = lab.tmp / "policy.yaml"
        policy.write_text(textwrap.dedent(POLICY))
        assert server.policyd("apply", str(policy), "--force").returncode == 0
        banned = server.policyd("ban", SOURCES["banned"][0])
        assert banned.returncode == 0, banned.stderr
        yield lab, server, {"allowed interface": vpn}, client, policy
    finally:
        lab.close()


@pytest.mark.netns
@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("port_kind", list(PORTS))
@pytest.mark.parametrize("source_kind", list(SOURCES))
def test_explain_agrees_with_a_real_packet(world, source_kind, port_kind, proto):
    _lab, server, other_hosts, client, policy = world
    source, server_address, iface = SOURCES[source_kind]
    port = PORTS[port_kind][proto]
    host = other_hosts.get(source_kind, client)
    out = server.policyd("explain", str(policy), source, str(port), "--proto", proto,
                         "--iface", iface, "--json")
    assert out.returncode == 0, out.stderr
    said = json.loads(out.stdout)
    done = what_the_kernel_does(host, source, server_address, port, proto)
    assert KERNEL_WORD[said["verdict"]] == done, (
        f"explain {source} {port}/{proto} on {iface}: {said}, the kernel: {done}")
