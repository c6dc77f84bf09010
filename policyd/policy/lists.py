"""List files: one address or network a line, `#` and `;` comments.

Owns reading and strict validation of the files a policy's `allow` and `deny`
name (FireHOL netsets and Spamhaus DROP read as they are). Entries are kept as
integers, not ipaddress objects: lists run to 100k lines and must load fast.
A bad line refuses the whole list with file:line. Parsing is policyd.policy.listparse,
the compiled sets' elements policyd.rules.elements.
"""
import array
import bisect
import contextlib
import hashlib
import ipaddress
import logging
import marshal
import os
import socket
import sys
from itertools import islice, repeat
from operator import itemgetter, lshift, or_
from pathlib import Path

from policyd import pieces
from policyd.errors import InputError
from policyd.policy.listparse import parse_entry, parse_lines, parse_text, strip  # noqa: F401
from policyd.logfmt import kv
from policyd.kernel.nlattr import big_endian

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
        ordered = pieces.sort(entries)  # in pieces, as below: the daemon's bans wait on none
        # Column by column (addresses, then prefix lengths), not a record at a time.
        records = bytearray((length + 1) * len(ordered))
        if ordered:
            firsts, prefixes, lines = [], [], []
            for chunk in pieces.chunks(ordered):
                firsts.extend(map(itemgetter(0), chunk))
                prefixes.extend(map(itemgetter(1), chunk))
                lines.extend(map(itemgetter(2), chunk))
            keys = big_endian(firsts, length)
            for offset in range(length):
                records[offset::length + 1] = keys[offset::length]
            records[length::length + 1] = bytes(prefixes)
        else:
            lines = ()
        return cls(version, bytes(records), array.array("I", lines))

    def __len__(self):
        return len(self.records) // self.size

    def __getitem__(self, i):
        return self.records[i * self.size:(i + 1) * self.size]

    def entries(self):
        """(first, prefix length, line) of every record, column by column at C speed."""
        size, records = self.size, self.records
        columns = []
        for start in range(0, size - 1, 8):  # 8-byte big-endian columns of the key
            width = min(8, size - 1 - start)
            keys = bytearray(width * len(self))
            for offset in range(width):
                keys[offset::width] = records[start + offset::size]
            column = array.array("I" if width == 4 else "Q", keys)
            if sys.byteorder == "little":
                column.byteswap()
            columns.append(column)
        firsts = iter(columns[0] if len(columns) == 1 else
                      map(or_, map(lshift, columns[0], repeat(64)), columns[1]))
        prefixes, out = records[size - 1::size], []
        for at in range(0, len(self), pieces.PIECE):  # in pieces: see policyd.pieces
            out.extend(zip(islice(firsts, pieces.PIECE), prefixes[at:at + pieces.PIECE],
                           self.lines[at:at + pieces.PIECE]))
        return tuple(out)

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


# The daemon sets this too: a list of CHILD_PARSE_BYTES or more missing from
# the cache is parsed by a child process into the cache (policyd.policy.listchild).
parse_in_child = False
CHILD_PARSE_BYTES = 1 << 16


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
        if netlist is None and parse_in_child and len(data) >= CHILD_PARSE_BYTES and _cache_root():
            from policyd.policy import listchild  # the daemon's way: see there
            if listchild.parse_in_child(path, _cache_root()):
                netlist = _cached(path, sha256)
        if netlist is None:
            netlist = parse(data, path, sha256)
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


# A list while cache writes wait (stored_later, one CLI command); None: at once.
_unstored = None


@contextlib.contextmanager
def stored_later():
    """Hold back the cache writes of lists parsed inside, and write them on leaving:
    `policyd apply` has the kernel load the policy first. The cache is by content
    and only ever saves time, so when it is written changes nothing else."""
    global _unstored
    outer, _unstored = _unstored, []
    try:
        yield
    finally:
        waiting, _unstored = _unstored, outer
        for netlist in waiting:
            _store(netlist)


def _store(netlist):
    """Keep a parsed list for the next command; the previous version of it goes.

    The cache lives in the state dir (root's, 0700): whoever can write there can
    change the committed policy anyway. Failing to write it costs only time."""
    if _cache_root() is None:
        return
    if _unstored is not None:
        _unstored.append(netlist)
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


def parse(data, path, sha256=None):
    """The NetList of a list file's bytes (whose sha256 hex digest the caller may
    have at hand); InputError names the first bad line."""
    v4, v6 = parse_lines(data, path)
    return NetList(path, sha256 or hashlib.sha256(data).hexdigest(), v4, v6)


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


from policyd.rules.elements import (Elements, disjoint_networks, lazy_elements,  # noqa: E402,F401
                               materialize, set_elements)
