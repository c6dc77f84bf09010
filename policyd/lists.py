"""List files: one address or network a line, `#` and `;` comments.

Owns reading and strict validation of the files a policy's `allow` and `deny`
name (FireHOL netsets and Spamhaus DROP read as they are). Entries are kept as
integers, not ipaddress objects: lists run to 100k lines and must load fast.
A bad line refuses the whole list with file:line.
"""
import hashlib
import ipaddress
import logging
import socket
from dataclasses import dataclass

from policyd.errors import InputError
from policyd.systemd import kv

log = logging.getLogger("policyd.lists")

_FAMILY = {4: (socket.AF_INET, 32), 6: (socket.AF_INET6, 128)}


@dataclass(frozen=True, eq=False)
class NetList:
    """One list file as read: entries (first address as int, prefix length, line) per family."""
    path: str
    sha256: str
    v4: tuple = ()
    v6: tuple = ()

    def __eq__(self, other):
        return isinstance(other, NetList) and (self.path, self.sha256) == (other.path, other.sha256)

    def __hash__(self):
        return hash((self.path, self.sha256))

    def __len__(self):
        return len(self.v4) + len(self.v6)

    def entries(self, version):
        return self.v4 if version == 4 else self.v6

    def find(self, address):
        """(network text, line) of the first entry that holds `address`, or None."""
        number, bits = int(address), _FAMILY[address.version][1]
        for first, prefixlen, line in self.entries(address.version):
            if first <= number < first + (1 << (bits - prefixlen)):
                return network_text(address.version, first, prefixlen), line
        return None


# The daemon sets this: a list file that turns bad then keeps its last good
# version (an empty one if it never had one) instead of failing the policy,
# so a cron job's broken download never stops the daemon.
keep_last_good = False
_last_good = {}


def read(path, key=None):
    """Read and validate the list file at `path` (absolute); InputError names file:line."""
    try:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise InputError(f"list file: {exc.strerror or exc}", path, key=key) from None
        netlist = parse(data, path)
    except InputError as exc:
        if not keep_last_good:
            raise
        log.error("list refused, keeping what is loaded %s", kv(list=path, error=exc))
        return _last_good.get(path) or NetList(path, "")
    if keep_last_good:
        _last_good[path] = netlist
    return netlist


def strip(raw):
    """The entry on one line with comments and blanks removed (b"" if none)."""
    for mark in (b"#", b";"):
        cut = raw.find(mark)
        if cut >= 0:
            raw = raw[:cut]
    return raw.strip()


def parse(data, path):
    v4, v6 = [], []
    pton, from_bytes, inet, inet6 = socket.inet_pton, int.from_bytes, socket.AF_INET, socket.AF_INET6
    for number, raw in enumerate(data.split(b"\n"), 1):
        if b"#" in raw or b";" in raw:
            raw = strip(raw)
        else:
            raw = raw.strip()
        if not raw:
            continue
        # The common shapes inline (100k lines must load in a blink); parse_entry
        # settles everything else and says what is wrong.
        text = raw.decode("ascii", "replace")
        address, _, length = text.partition("/")
        try:
            if ":" in address:
                first, bits, entries = from_bytes(pton(inet6, address), "big"), 128, v6
            else:
                first, bits, entries = from_bytes(pton(inet, address), "big"), 32, v4
        except OSError:
            first = None
        if (first is not None and (not length or length.isdigit() and len(length) <= 3)
                and (prefixlen := int(length) if length else bits) <= bits
                and not first & ((1 << (bits - prefixlen)) - 1)
                and (bits == 32 or first >> 32 != 0xFFFF)):
            entries.append((first, prefixlen, number))
            continue
        version, first, prefixlen = parse_entry(raw, path, number)
        (v4 if version == 4 else v6).append((first, prefixlen, number))
    return NetList(path, hashlib.sha256(data).hexdigest(), tuple(v4), tuple(v6))


def parse_entry(text, path="<list>", line=None):
    """b"192.0.2.0/24" -> (4, first address as int, 24); strict: host bits are an error."""
    try:
        address, slash, length = text.decode("ascii").partition("/")
    except UnicodeDecodeError:
        raise InputError("not an address or network (non-ASCII)", path, line) from None
    version = 6 if ":" in address else 4
    family, bits = _FAMILY[version]
    try:
        first = int.from_bytes(socket.inet_pton(family, address), "big")
    except OSError:
        raise InputError(f"{text.decode('ascii')!r} is not an address or network",
                         path, line) from None
    prefixlen = bits
    if slash:
        if not length.isdigit() or len(length) > 3 or int(length) > bits:
            raise InputError(f"{text.decode('ascii')!r} has a bad prefix length", path, line)
        prefixlen = int(length)
    if first & ((1 << (bits - prefixlen)) - 1):
        raise InputError(f"{text.decode('ascii')!r} has host bits set", path, line)
    if version == 6 and first >> 32 == 0xFFFF:  # as addr.parse_network reads it
        if prefixlen != 128:
            raise InputError(f"{text.decode('ascii')!r} is an IPv4-mapped network; "
                             "write it as IPv4", path, line)
        return 4, first & 0xFFFFFFFF, 32
    return version, first, prefixlen


def network_text(version, first, prefixlen):
    family, bits = _FAMILY[version]
    text = socket.inet_ntop(family, first.to_bytes(bits // 8, "big"))
    return text if prefixlen == bits else f"{text}/{prefixlen}"


def as_network(version, first, prefixlen):
    return (ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((first, prefixlen))


class Elements(list):
    """An interval set's JSON elements, carrying the same intervals as integers
    ((first, last) pairs) so the netlink encoder need not parse 100k texts back."""
    intervals = None


def disjoint_networks(version, networks=(), netlists=()):
    """Sorted (first, prefix length) of every network, nested ones dropped.

    Networks nest or are disjoint, so one sweep in address order that skips
    whatever starts inside the last kept one leaves no overlap (nft and the
    kernel refuse overlapping intervals).
    """
    bits = _FAMILY[version][1]
    entries = [(int(n.network_address), n.prefixlen, 0) for n in networks]
    for netlist in netlists:
        entries.extend(netlist.entries(version))
    entries.sort()  # lists come sorted mostly: timsort makes this nearly free
    out, end = [], -1
    for first, prefixlen, _line in entries:
        if first <= end:
            continue
        out.append((first, prefixlen))
        end = first + (1 << (bits - prefixlen)) - 1
    return out


def set_elements(version, disjoint):
    """JSON interval-set elements of disjoint (first, prefix length) networks."""
    family, bits = _FAMILY[version]
    size, ntop = bits // 8, socket.inet_ntop
    out = Elements(ntop(family, first.to_bytes(size, "big")) if prefixlen == bits else
                   {"prefix": {"addr": ntop(family, first.to_bytes(size, "big")), "len": prefixlen}}
                   for first, prefixlen in disjoint)
    out.intervals = [(first, first + (1 << (bits - prefixlen)) - 1) for first, prefixlen in disjoint]
    return out
