"""Who is connected to, and who listens on, this host's ports: read from sock_diag.

Owns the netlink queries (sock_diag for TCP and UDP, IPv4 and IPv6; rtnetlink
for the route towards an address) that the anti-lockout lint and `policyd
doctor` use. Results are plain tuples of ipaddress objects; the queries see
the network namespace the process runs in.

The messages are a few fixed structs (linux/inet_diag.h, linux/rtnetlink.h),
read here with struct: pyroute2, which did it before, takes ~250 ms to import
(its package imports its IPRoute, NDB and console modules), a quarter of
`policyd doctor` with a 100k list and most of the lint's share of an apply.
"""
import errno
import socket
import struct
from dataclasses import dataclass

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


NETLINK_ROUTE, NETLINK_SOCK_DIAG = 0, 4
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
SOCK_DIAG_BY_FAMILY = 20
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTA_DST, RTA_OIF = 1, 4
_HEADER = struct.Struct("=IHHII")        # struct nlmsghdr
_DIAG_REQUEST = struct.Struct("=BBBxI48x")  # struct inet_diag_req_v2, any socket id
_DIAG_MESSAGE_BYTES = 72                 # struct inet_diag_msg
_ROUTE_REQUEST = struct.Struct("=BBBBBBBBI")  # struct rtmsg
_ATTRIBUTE = struct.Struct("=HH")        # struct rtattr
_ADDRESS_BYTES = {socket.AF_INET: 4, socket.AF_INET6: 16}


def _ask(protocol, kind, flags, body):
    """The netlink messages (type, payload) answering one request, up to DONE (a
    dump) or the first answer; OSError for the kernel's error."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol) as sock:
        sock.bind((0, 0))
        sock.send(_HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | flags, 1, 0) + body)
        answers = []
        while True:
            data = sock.recv(1 << 16)
            at = 0
            while at + _HEADER.size <= len(data):
                length, message_type, _flags, _seq, _pid = _HEADER.unpack_from(data, at)
                if length < _HEADER.size or at + length > len(data):
                    raise OSError(errno.EPROTO, "a netlink answer cut short")
                payload = data[at + _HEADER.size:at + length]
                at += (length + 3) & ~3
                if message_type == NLMSG_DONE:
                    return answers
                if message_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise OSError(-code, f"netlink: {errno.errorcode.get(-code, -code)}")
                    return answers   # an acknowledgement
                answers.append((message_type, payload))
            if not flags & NLM_F_DUMP and answers:
                return answers


def _sockets(state, protocol=socket.IPPROTO_TCP):
    """(family, source port, source address text, destination port, destination
    address text, uid, inode) of every TCP (or UDP) socket in `state`; OSError if
    the kernel will not say."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        size = _ADDRESS_BYTES[family]
        for message_type, body in _ask(NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_DUMP,
                                       _DIAG_REQUEST.pack(family, protocol, 0, 1 << state)):
            if message_type != SOCK_DIAG_BY_FAMILY or len(body) < _DIAG_MESSAGE_BYTES:
                continue
            # u8 family, state, timer, retrans; the socket id (big-endian ports, then
            # the two addresses in 16 bytes each); expires, queues, uid, inode.
            sport, dport = struct.unpack_from(">HH", body, 4)
            uid, inode = struct.unpack_from("=II", body, 64)
            found.append((family, sport, socket.inet_ntop(family, body[8:8 + size]),
                          dport, socket.inet_ntop(family, body[24:24 + size]), uid, inode))
    return found


def established_peers(ports):
    """Established TCP connections whose local port is one of `ports`.

    IPv4 clients of a dual-stack socket (::ffff:a.b.c.d) come back as IPv4.
    """
    wanted = set(ports)
    found = []
    for _family, sport, source, dport, destination, _uid, _inode in _sockets(TCP_ESTABLISHED):
        if sport not in wanted:
            continue
        local, peer = parse_host(source), parse_host(destination)
        if local is None or peer is None:
            continue
        found.append(Connection(local, sport, peer, dport))
    return found


def listeners(ports, proto="tcp"):
    """Sockets that accept traffic on any of `ports`, IPv4 and IPv6: listening TCP
    sockets, or for proto="udp" bound UDP sockets that are not connected."""
    wanted = set(ports)
    found = []
    query = (TCP_LISTEN, socket.IPPROTO_TCP) if proto == "tcp" else (TCP_CLOSE,
                                                                       socket.IPPROTO_UDP)
    for _family, sport, source, _dport, _destination, uid, inode in _sockets(*query):
        if sport not in wanted:
            continue
        address = parse_host(source)
        if address is None:
            continue
        found.append(Listener(address, sport, uid, inode, proto))
    return found


def interface_towards(address):
    """Name of the interface this host routes `address` through, or None.

    A reply leaves by the interface a client's packets usually arrive on, so
    this is the best guess for an `allow: iface` rule without a packet to look at.
    """
    family = socket.AF_INET6 if ":" in str(address) else socket.AF_INET
    packed = socket.inet_pton(family, str(address))
    request = (_ROUTE_REQUEST.pack(family, 8 * len(packed), 0, 0, 0, 0, 0, 0, 0)
               + _ATTRIBUTE.pack(_ATTRIBUTE.size + len(packed), RTA_DST) + packed)
    try:
        answers = _ask(NETLINK_ROUTE, RTM_GETROUTE, 0, request)
        for message_type, body in answers:
            if message_type != RTM_NEWROUTE:
                continue
            at = _ROUTE_REQUEST.size
            while at + _ATTRIBUTE.size <= len(body):
                length, kind = _ATTRIBUTE.unpack_from(body, at)
                if length < _ATTRIBUTE.size:
                    break
                if kind == RTA_OIF and length >= _ATTRIBUTE.size + 4:
                    (index,) = struct.unpack_from("=I", body, at + _ATTRIBUTE.size)
                    return socket.if_indextoname(index)
                at += (length + 3) & ~3
        return None
    except OSError:
        return None  # no route back: no interface rule can match it either
