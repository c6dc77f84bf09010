"""Who is connected to, and who listens on, this host's ports: read from sock_diag.

Owns the pyroute2 queries (TCP and UDP, IPv4 and IPv6) that the anti-lockout
lint and `policyd doctor` use. Results are plain tuples of ipaddress objects; the
queries see the network namespace the process runs in.
"""
import socket
from dataclasses import dataclass

from pyroute2 import DiagSocket, IPRoute, NetlinkError

from policyd.addr import parse_host

# Kernel TCP states (include/net/tcp_states.h).
TCP_ESTABLISHED = 1
TCP_CLOSE = 7  # what sock_diag reports for a bound, unconnected UDP socket
TCP_LISTEN = 10


@dataclass(frozen=True)
class Connection:
    """One established TCP connection seen from this host's side."""
    local_address: object
    local_port: int
    peer_address: object
    peer_port: int


@dataclass(frozen=True)
class Listener:
    """One listening socket: its bound address (0.0.0.0 / :: for all) and port."""
    address: object
    port: int
    uid: int
    inode: int
    proto: str = "tcp"


def _sockets(state, protocol=socket.IPPROTO_TCP):
    """Every TCP (or UDP) socket in `state`; OSError if the kernel will not say."""
    try:
        with DiagSocket() as diag:
            diag.bind()
            found = []
            for family in (socket.AF_INET, socket.AF_INET6):
                found += diag.get_sock_stats(family=family, states=1 << state,
                                             protocol=protocol)
            return found
    except NetlinkError as exc:
        raise OSError(exc.code, f"sock_diag: {exc}") from None


def established_peers(ports):
    """Established TCP connections whose local port is one of `ports`.

    IPv4 clients of a dual-stack socket (::ffff:a.b.c.d) come back as IPv4.
    """
    wanted = set(ports)
    found = []
    for msg in _sockets(TCP_ESTABLISHED):
        if msg["idiag_sport"] not in wanted:
            continue
        local, peer = parse_host(msg["idiag_src"]), parse_host(msg["idiag_dst"])
        if local is None or peer is None:
            continue
        found.append(Connection(local, msg["idiag_sport"], peer, msg["idiag_dport"]))
    return found


def listeners(ports, proto="tcp"):
    """Sockets that accept traffic on any of `ports`, IPv4 and IPv6: listening TCP
    sockets, or for proto="udp" bound UDP sockets that are not connected."""
    wanted = set(ports)
    found = []
    query = (TCP_LISTEN, socket.IPPROTO_TCP) if proto == "tcp" else (TCP_CLOSE,
                                                                       socket.IPPROTO_UDP)
    for msg in _sockets(*query):
        if msg["idiag_sport"] not in wanted:
            continue
        address = parse_host(msg["idiag_src"])
        if address is None:
            continue
        found.append(Listener(address, msg["idiag_sport"], msg["idiag_uid"],
                              msg["idiag_inode"], proto))
    return found


def interface_towards(address):
    """Name of the interface this host routes `address` through, or None.

    A reply leaves by the interface a client's packets usually arrive on, so
    this is the best guess for an `allow: iface` rule without a packet to look at.
    """
    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=str(address))
            if not routes:
                return None
            index = routes[0].get_attr("RTA_OIF")
            if index is None:
                return None
            links = ipr.get_links(index)
            return links[0].get_attr("IFLA_IFNAME") if links else None
    except (OSError, NetlinkError):
        return None  # no route back: no interface rule can match it either
