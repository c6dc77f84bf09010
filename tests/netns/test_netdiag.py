"""policyd.operator.netdiag against a real kernel: the established connections the
anti-lockout lint must see (all of them, however many answers the dump takes),
the listeners doctor reports, and the interface a reply leaves by."""
import ipaddress
import socket

from policyd_lab.netlab import in_namespace
from policyd_lab.world import SERVER_V4, SERVER_V6, TRUSTED_V4, TRUSTED_V6


def _in_order(connection):
    address, *ports = connection
    return address.version, int(address), *ports


def test_every_established_connection_is_seen_with_its_peer(world):
    """400 connections, IPv4 and IPv6: the dump comes in many netlink answers, and
    a connection the lint missed is one it would let an apply cut."""
    world.server.listen(11434)
    world.server.listen(2222)
    clients = []
    try:
        for i in range(400):
            family, server = (socket.AF_INET, SERVER_V4) if i % 2 else (socket.AF_INET6, SERVER_V6)
            client = world.trusted.socket(family)
            client.connect((server, 11434 if i % 5 else 2222))
            clients.append(client)
        expected = sorted(((ipaddress.ip_address(c.getsockname()[0]), c.getsockname()[1],
                            c.getpeername()[1]) for c in clients if c.getpeername()[1] == 11434),
                          key=_in_order)

        def seen():
            from policyd.operator import netdiag
            return sorted(((conn.peer_address, conn.peer_port, conn.local_port)
                           for conn in netdiag.established_peers([11434])), key=_in_order)

        assert in_namespace(world.server.name, seen) == expected
        assert len(expected) == 320
    finally:
        for client in clients:
            client.close()


def test_listeners_and_the_interface_towards_a_peer(world):
    world.server.listen(11434)
    world.server.listen(5353, proto="udp")

    def ask():
        from policyd.operator import netdiag
        return ([(str(l.address), l.port, l.proto) for l in netdiag.listeners([11434, 80])],
                [(str(l.address), l.port, l.proto) for l in netdiag.listeners([5353], "udp")],
                [netdiag.interface_towards(address)
                 for address in (TRUSTED_V4, TRUSTED_V6, "127.0.0.1", "203.0.113.9", "2001:db8:ffff::9")])

    tcp, udp, interfaces = in_namespace(world.server.name, ask)
    assert tcp == [("::", 11434, "tcp")] and udp == [("::", 5353, "udp")]
    # The lab's server has routes only to its own two links: no default route.
    assert interfaces == ["lan0", "lan0", "lo", None, None]
