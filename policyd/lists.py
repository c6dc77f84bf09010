"""List files: one address or network a line, `#` and `;` comments.

Owns reading and strict validation of the files a policy's `allow` and `deny`
name (FireHOL netsets and Spamhaus DROP read as they are). Entries are kept as
integers, not ipaddress objects: lists run to 100k lines and must load fast.
A bad line refuses the whole list with file:line.
"""
import array
import bisect
import hashlib
import ipaddress
import logging
import marshal
import os
import socket
from pathlib import Path

from policyd.errors import InputError
from policyd.logfmt import kv

log = logging.getLogger(__name__)

_FAMILY = {4: (socket.AF_INET, 32), 6: (socket.AF_INET6, 128)}


class NetList:
    """One list file as read: entries (first address as int, prefix length, line) per
    family, in file order when parsed, in address order when loaded from the cache.

    From the cache, entries are built only when asked for (compile needs them);
    find() answers from the cache's sorted records with a few bisections, so
    `explain` never builds 100k tuples.
    """

    def __init__(self, path, sha256, v4=(), v6=(), index=None):
        self.path = path
        self.sha256 = sha256
        self._entries = {4: v4, 6: v6} if index is None else {}
        self._index = index  # {version: _Records}

    def __eq__(self, other):
        return isinstance(other, NetList) and (self.path, self.sha256) == (other.path, other.sha256)

    def __hash__(self):
        return hash((self.path, self.sha256))

    def __repr__(self):
        return f"NetList({self.path!r}, {self.sha256[:12]!r})"

    def __len__(self):
        return len(self.v4) + len(self.v6)

    @property
    def v4(self):
        return self.entries(4)

    @property
    def v6(self):
        return self.entries(6)

    def entries(self, version):
        if version not in self._entries:
            # Built from the cache's records each time, not kept: a daemon would
            # otherwise hold 100k tuples it reads once per compile.
            return self._index[version].entries()
        return self._entries[version]

    def count(self, version):
        """How many entries of one family, without building them."""
        if version in self._entries:
            return len(self._entries[version])
        return len(self._index[version])

    def records(self, version):
        """The sorted _Records of one family (built from the entries if need be)."""
        if self._index is None:
            self._index = {v: _Records.build(v, self._entries[v]) for v in (4, 6)}
        return self._index[version]

    def find(self, address):
        """(network text, line) of the entry on the lowest line that holds `address`,
        or None."""
        if self._index is None and len(self.entries(address.version)) > 64:
            self.records(address.version)  # sorted once: apply's lint asks for every peer
        if self._index is None:
            number, bits = int(address), _FAMILY[address.version][1]
            for first, prefixlen, line in self.entries(address.version):
                if first <= number < first + (1 << (bits - prefixlen)):
                    return network_text(address.version, first, prefixlen), line
            return None
        found = self._index[address.version].find(int(address))
        if found is None:
            return None
        first, prefixlen, line = found
        return network_text(address.version, first, prefixlen), line


class _Records:
    """One family's entries sorted as fixed-size big-endian records (address,
    prefix length), so bytes order is address order and bisect finds a network
    in microseconds; line numbers alongside in an array."""

    def __init__(self, version, records, lines):
        self.version = version
        self.size = 5 if version == 4 else 17
        self.records = records
        self.lines = lines

    @classmethod
    def build(cls, version, entries):
        length = 4 if version == 4 else 16
        ordered = sorted(entries)
        return cls(version,
                   b"".join(first.to_bytes(length, "big") + bytes([prefixlen])
                            for first, prefixlen, _line in ordered),
                   array.array("I", [line for _first, _prefixlen, line in ordered]))

    def __len__(self):
        return len(self.records) // self.size

    def __getitem__(self, i):
        return self.records[i * self.size:(i + 1) * self.size]

    def entries(self):
        length = self.size - 1
        records, lines = self.records, self.lines
        return tuple((int.from_bytes(records[i * self.size:i * self.size + length], "big"),
                      records[i * self.size + length], lines[i]) for i in range(len(self)))

    def find(self, number):
        bits = 32 if self.version == 4 else 128
        best = None
        for prefixlen in range(bits + 1):
            first = number & (((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1))
            key = first.to_bytes(bits // 8, "big") + bytes([prefixlen])
            i = bisect.bisect_left(self, key)
            if i < len(self) and self[i] == key and (best is None or self.lines[i] < best[2]):
                best = (first, prefixlen, self.lines[i])
        return best


# The daemon sets this: a list file that turns bad then keeps its last good
# version (an empty one if it never had one) instead of failing the policy,
# so a cron job's broken download never stops the daemon.
keep_last_good = False
_last_good = {}


# <state dir>/lists, which the CLI puts in POLICYD_LIST_CACHE for every command
# (cache_dir, if set, wins). Parsed lists are kept there by content hash, so the
# next command that reads an unchanged 100k-line list loads it in milliseconds
# instead of parsing it again.
cache_dir = None


def _cache_root():
    return cache_dir or os.environ.get("POLICYD_LIST_CACHE")


CACHE_VERSION = b"policyd-list-2\n"


def read(path, key=None):
    """Read and validate the list file at `path` (absolute); InputError names file:line."""
    try:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise InputError(f"list file: {exc.strerror or exc}", path, key=key) from None
        sha256 = hashlib.sha256(data).hexdigest()
        netlist = _cached(path, sha256)
        if netlist is None:
            netlist = parse(data, path)
            _store(netlist)
    except InputError as exc:
        if not keep_last_good:
            raise
        log.error("list refused, keeping what is loaded %s", kv(list=path, error=exc))
        return _last_good.get(path) or NetList(path, "")
    if keep_last_good:
        _last_good[path] = netlist
    return netlist


def _cache_path(path, sha256):
    return Path(_cache_root()) / f"{hashlib.sha256(path.encode()).hexdigest()[:16]}-{sha256}"


def _cached(path, sha256):
    """The list as parsed before with this exact content, or None."""
    if _cache_root() is None:
        return None
    try:
        raw = _cache_path(path, sha256).read_bytes()
        if not raw.startswith(CACHE_VERSION):
            return None
        v4, lines4, v6, lines6 = marshal.loads(raw[len(CACHE_VERSION):])
        index = {4: _Records(4, v4, array.array("I", lines4)),
                 6: _Records(6, v6, array.array("I", lines6))}
    except (OSError, ValueError, EOFError, TypeError):
        return None
    if any(len(r.records) % r.size or len(r.lines) != len(r) for r in index.values()):
        return None
    return NetList(path, sha256, index=index)


def _store(netlist):
    """Keep a parsed list for the next command; the previous version of it goes.

    The cache lives in the state dir (root's, 0700): whoever can write there can
    change the committed policy anyway. Failing to write it costs only time."""
    if _cache_root() is None:
        return
    target = _cache_path(netlist.path, netlist.sha256)
    try:
        Path(_cache_root()).mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        v4, v6 = netlist.records(4), netlist.records(6)
        tmp.write_bytes(CACHE_VERSION + marshal.dumps((v4.records, v4.lines.tobytes(),
                                                       v6.records, v6.lines.tobytes())))
        tmp.replace(target)
        for old in Path(_cache_root()).glob(target.name.split("-")[0] + "-*"):
            if old != target:
                old.unlink(missing_ok=True)
    except OSError:
        pass


def strip(raw):
    """The entry on one line with comments and blanks removed (b"" if none)."""
    for mark in (b"#", b";"):
        cut = raw.find(mark)
        if cut >= 0:
            raw = raw[:cut]
    return raw.strip()


def parse(data, path):
    """The NetList of a list file's bytes; InputError names the first bad line."""
    v4, v6 = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = strip(raw) if b"#" in raw or b";" in raw else raw.strip()
        if not raw:
            continue
        # parse_text takes the common shapes fast; parse_entry settles the rest
        # and says what is wrong.
        entry = parse_text(raw.decode("ascii", "replace")) or parse_entry(raw, path, number)
        (v4 if entry[0] == 4 else v6).append((entry[1], entry[2], number))
    return NetList(path, hashlib.sha256(data).hexdigest(), tuple(v4), tuple(v6))


def parse_text(text):
    """(version, first address as int, prefix length) of a plain address or CIDR
    network text, or None for anything else (the caller then says why)."""
    address, _, length = text.partition("/")
    try:
        if ":" in address:
            first, bits = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big"), 128
        else:
            first, bits = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big"), 32
    except OSError:
        return None
    if length and not (length.isdigit() and len(length) <= 3):
        return None
    prefixlen = int(length) if length else bits
    if prefixlen > bits or first & ((1 << (bits - prefixlen)) - 1):
        return None
    if bits == 128 and first >> 32 == 0xFFFF:
        return None  # IPv4-mapped: parse_network decides
    return (4 if bits == 32 else 6), first, prefixlen


class Networks(tuple):
    """Inline networks of one family: a tuple of ipaddress networks to every reader,
    made from (first, prefix length) pairs only when first read, because
    compile (which reads .pairs) never needs them and 100k cost seconds."""

    def __new__(cls, version, pairs):
        self = super().__new__(cls)
        self.version, self.pairs, self._networks = version, list(pairs), None
        return self

    def _built(self):
        if self._networks is None:
            make = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
            self._networks = tuple(make(pair) for pair in self.pairs)
        return self._networks

    def __len__(self):
        return len(self.pairs)

    def __bool__(self):
        return bool(self.pairs)

    def __iter__(self):
        return iter(self._built())

    def __getitem__(self, index):
        return self._built()[index]

    def __contains__(self, item):
        return item in self._built()

    def __eq__(self, other):
        return self._built() == (tuple(other) if isinstance(other, tuple) else other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((self.version, tuple(self.pairs)))

    def __repr__(self):
        return repr(self._built())


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


def cidr_text(version, first, prefixlen):
    """str() of the ipaddress network, always with its length, at inet_ntop speed
    (which spells an address as ipaddress does unless its upper 64 bits are 0)."""
    if version == 6 and not first >> 64:
        return str(ipaddress.IPv6Network((first, prefixlen)))
    family, bits = _FAMILY[version]
    return f"{socket.inet_ntop(family, first.to_bytes(bits // 8, 'big'))}/{prefixlen}"


def as_network(version, first, prefixlen):
    return (ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((first, prefixlen))


class Elements(list):
    """An interval set's JSON elements, and the same networks as integers: its
    `intervals` ((first, last) pairs) are what the netlink encoder, doctor and
    the drift check read, so the 100k texts are built only when Python code
    reads the list (render, libnftables, tests), never on the fast path.

    json.dumps reads a list subclass through its iterator (PySequence_Fast
    copies anything but an exact list), so documents serialise whole;
    policyd.nft still materializes before libnftables, to depend on nothing.
    """

    def __init__(self, version, disjoint=None, sources=None):
        super().__init__()
        self.version = version
        self._disjoint = disjoint
        # (networks, netlists) to sweep into `disjoint` on first need: `explain`
        # asks find() about one address and never needs the 100k of them.
        self._sources = sources
        self._filled, self._intervals = False, None

    @property
    def disjoint(self):
        if self._sources is not None:
            self._disjoint = disjoint_networks(self.version, *self._sources)
            self._sources = None
        return self._disjoint

    @disjoint.setter
    def disjoint(self, value):
        self._disjoint, self._sources = value, None

    def find(self, address):
        """The network of this set holding `address` (an ipaddress object), or None:
        from the policy's networks and the lists' sorted records while the set is
        not built, else by bisecting its intervals."""
        if self._sources is not None:
            networks, netlists = self._sources
            for network in networks:
                if address in network:
                    return network
            for netlist in netlists:
                found = netlist.find(address)
                if found is not None:
                    return ipaddress.ip_network(found[0], strict=False)
            return None
        intervals = self.intervals
        if intervals is None:
            return None
        number = int(address)
        index = bisect.bisect_right(intervals, (number, float("inf"))) - 1
        if index >= 0 and intervals[index][0] <= number <= intervals[index][1]:
            return as_network(self.version, *self.disjoint[index])
        return None

    @property
    def intervals(self):
        """Sorted disjoint (first, last) pairs; None once texts were added by hand."""
        if self.disjoint is None:
            return None
        if self._intervals is None:
            bits = _FAMILY[self.version][1]
            self._intervals = [(first, first + (1 << (bits - prefixlen)) - 1)
                               for first, prefixlen in self.disjoint]
        return self._intervals

    def materialize(self):
        if not self._filled:
            self._filled = True
            list.extend(self, _element_texts(self.version, self.disjoint))
        return self

    json = materialize

    def __len__(self):
        return list.__len__(self) if self._filled else len(self.disjoint)

    def __bool__(self):
        if self._sources is not None and not self._filled:
            networks, netlists = self._sources
            return bool(networks) or any(netlist.count(self.version) for netlist in netlists)
        return len(self) > 0

    def __iter__(self):
        return list.__iter__(self.materialize())

    def __reversed__(self):
        return list.__reversed__(self.materialize())

    def __getitem__(self, index):
        return list.__getitem__(self.materialize(), index)

    def __contains__(self, item):
        return list.__contains__(self.materialize(), item)

    def __eq__(self, other):
        if isinstance(other, Elements):
            other.materialize()
        return list.__eq__(self.materialize(), other)

    def __ne__(self, other):
        return not self == other

    __hash__ = None

    def __repr__(self):
        return list.__repr__(self.materialize())

    def extend(self, items):
        list.extend(self.materialize(), items)
        self._intervals = None  # the integers no longer say it all:
        self.disjoint = None    # readers of `intervals` parse the texts instead

    def append(self, item):
        self.extend([item])


def materialize(document):
    """Build every lazy element text in `document` (before a C-level json.dumps)."""
    for command in document.get("nftables", []):
        for body in command.values():
            if isinstance(body, dict):
                for obj in body.values():
                    if isinstance(obj, dict) and isinstance(obj.get("elem"), Elements):
                        obj["elem"].materialize()
    return document


def disjoint_networks(version, networks=(), netlists=()):
    """Sorted (first, prefix length) of every network, nested ones dropped.

    Networks nest or are disjoint, so one sweep in address order that skips
    whatever starts inside the last kept one leaves no overlap (nft and the
    kernel refuse overlapping intervals).
    """
    bits = _FAMILY[version][1]
    pairs = getattr(networks, "pairs", None)
    entries = ([(first, prefixlen, 0) for first, prefixlen in pairs] if pairs is not None
               else [(int(n.network_address), n.prefixlen, 0) for n in networks])
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
    """The JSON interval-set elements of disjoint (first, prefix length) networks,
    as an Elements list (texts built when read)."""
    return Elements(version, disjoint)


def lazy_elements(version, networks=(), netlists=()):
    """The interval-set elements of `networks` and the lists' entries, as an
    Elements list that sweeps them (disjoint_networks) only when first read."""
    return Elements(version, sources=(networks, tuple(netlists)))


def _element_texts(version, disjoint):
    family, bits = _FAMILY[version]
    size, ntop = bits // 8, socket.inet_ntop
    return [ntop(family, first.to_bytes(size, "big")) if prefixlen == bits else
            {"prefix": {"addr": ntop(family, first.to_bytes(size, "big")), "len": prefixlen}}
            for first, prefixlen in disjoint]
