"""The elements of a compiled ruleset's interval sets: integers for the netlink
encoder, the drift check and doctor, texts built only when Python code reads
them. Owns the sweep that makes a family's networks disjoint.
"""
import bisect
import ipaddress
import socket
from operator import add, gt, itemgetter

from policyd import pieces

_FAMILY = {4: (socket.AF_INET, 32), 6: (socket.AF_INET6, 128)}
# Per family, by prefix length: the last address of a network minus its first.
_SIZES = {bits: [(1 << (bits - prefixlen)) - 1 for prefixlen in range(bits + 1)]
          for bits in (32, 128)}


def as_network(version, first, prefixlen):
    return (ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((first, prefixlen))


class Elements(list):
    """An interval set's JSON elements, and the same networks as integers: its
    `intervals` ((first, last) pairs) are what the netlink encoder, doctor and
    the drift check read, so the 100k texts are built only when Python code
    reads the list (render, libnftables, tests), never on the fast path.

    json.dumps reads a list subclass through its iterator (PySequence_Fast
    copies anything but an exact list), so documents serialise whole;
    policyd.kernel.nft still materializes before libnftables, to depend on nothing.
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
            sizes = _SIZES[_FAMILY[self.version][1]]
            self._intervals = intervals = []
            for chunk in pieces.chunks(self.disjoint):  # in pieces: see policyd.pieces
                firsts = list(map(itemgetter(0), chunk))
                intervals.extend(zip(firsts, map(add, firsts, map(sizes.__getitem__,
                                                                  map(itemgetter(1), chunk)))))
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
    # In pieces (policyd.pieces): one sort of 100k holds the GIL for 5-50 ms.
    entries = pieces.sort(entries)
    sizes = _SIZES[bits]
    out, end = [], -1
    for chunk in pieces.chunks(entries):
        firsts = list(map(itemgetter(0), chunk))
        prefixes = list(map(itemgetter(1), chunk))
        lasts = list(map(add, firsts, map(sizes.__getitem__, prefixes)))
        if firsts[0] > end and all(map(gt, firsts[1:], lasts)):
            # None nests in another (the usual list): all kept, at C speed.
            out.extend(zip(firsts, prefixes))
            end = lasts[-1]
            continue
        for first, prefixlen, last in zip(firsts, prefixes, lasts):
            if first <= end:
                continue
            out.append((first, prefixlen))
            end = last
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
