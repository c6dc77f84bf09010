"""The ban path's network key, (version, first address as int, prefix length), and
its conversions: to and from ipaddress networks, the state file's blob, its text.
Building, hashing and comparing ipaddress objects costs microseconds each, and the
failure path runs for every matched log line: ipaddress objects exist only at the edges.
"""
import ipaddress
import itertools
import math
import socket
from typing import NamedTuple

from policyd import addr
from policyd.errors import InputError

BITS = {4: 32, 6: 128}
MASKS = {(version, prefixlen): ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)
         for version, bits in BITS.items() for prefixlen in range(bits + 1)}
_NETWORK_TYPES = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}


def key(network):
    return (network.version, int(network.network_address), network.prefixlen)


def network(key):
    version, number, prefixlen = key
    return _NETWORK_TYPES[version]((number, prefixlen))


def text(key):
    """str(network(key)), without building the network: a flood writes 100k of them."""
    version, number, prefixlen = key
    if version == 4:
        return f"{socket.inet_ntop(socket.AF_INET, number.to_bytes(4, 'big'))}/{prefixlen}"
    spelled = socket.inet_ntop(socket.AF_INET6, number.to_bytes(16, "big"))
    # glibc writes an embedded IPv4 (::1.2.3.4) where ipaddress writes hex.
    return f"{spelled}/{prefixlen}" if "." not in spelled else str(network(key))


def key_range(key):
    """(version, first, last address) as ints."""
    version, number, prefixlen = key
    return (version, number, number | (MASKS[version, prefixlen] ^ MASKS[version, BITS[version]]))


def blob(key):
    """The State key: packed address (4 or 16 bytes, so the version) + prefix length."""
    version, number, prefixlen = key
    return number.to_bytes(4 if version == 4 else 16, "big") + _PREFIX_BYTE[prefixlen]


_PREFIX_BYTE = {prefixlen: bytes((prefixlen,)) for prefixlen in range(129)}  # a flood writes 200k blobs


def key_from_blob(data):
    return (4 if len(data) == 5 else 6, int.from_bytes(data[:-1], "big"), data[-1])


class BanElements(NamedTuple):
    """Bans for the kernel to take in the transaction of a whole load: the ban
    table, its IPv6 prefix (which keys go to the hash sets) and [(key, seconds left)]."""
    table: str
    ipv6_prefix: int
    items: list


def timeout(expires_at, now):
    """Whole seconds for the kernel, rounded up so the kernel never lifts a ban early."""
    return max(1, math.ceil(expires_at - now))


def sample(networks, limit=5):
    """A log-sized list: a burst of 100k bans must not become a 2 MB log line."""
    head = list(itertools.islice(networks, limit + 1))
    spelled = " ".join(str(item) for item in head[:limit])
    return spelled + (" ..." if len(head) > limit else "")


def as_network(value):
    """An address, a network, or their text; a bare address means exactly that host."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        if value.version == 6 and value.ipv4_mapped is not None:
            value = value.ipv4_mapped
        return ipaddress.ip_network(value)
    try:
        return addr.parse_network(str(value).strip())
    except ValueError as error:
        raise InputError(f"not an address or network: {value!r} ({error})", key="address") from None
