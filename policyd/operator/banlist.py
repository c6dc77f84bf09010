"""The ban list an operator reads (`policyd bans`), as columns: built from the
daemon's ban book or, with no daemon, from the state file (policyd.operator.banstate);
sent over the control socket as raw bytes after a small JSON head instead of 100k
JSON objects.

Printing them is policyd.operator.banprint's. A column is built and read with C-level
maps where it can: with 100k bans, a Python step per ban per field is what costs.
"""
import array
import math
import socket
from bisect import bisect_right
from itertools import accumulate, islice, repeat
from operator import itemgetter, le, sub

from policyd.operator.control import RawPart

WIRE = "columns/2"  # /1 sent the columns as base64 in the JSON line
# Bans per step on the daemon's server thread: a C-level map holds the GIL for
# its whole run, and the main loop must not wait behind it for long (each map
# over 5000 bans takes a few ms at most).
CHUNK = 5000
_EXPIRES, _BANNED = itemgetter(0), itemgetter(4)  # of the ban book's entry tuple
_CAUSE = itemgetter(1, 2, 3)                        # -> (failures, filter, reason)


class BanColumns:
    """Active bans at `now`, one list per field, in the order they were recorded.

    `cause[i]` indexes `causes`, the distinct (failures, filter, reason) triples:
    a handful for 100k bans, so each is formatted once. `banned_at` is None where
    it was not read (the text does not print it). The networks come as a list or,
    from the wire and the state file, as one text joined by newlines (`lines`):
    the text output needs them joined, and 100k strings cost to make.
    """

    __slots__ = ("now", "_network", "_lines", "expires_at", "banned_at", "causes", "cause")

    def __init__(self, now, network, expires_at, banned_at, causes, cause, lines=None):
        (self.now, self._network, self._lines, self.expires_at, self.banned_at, self.causes,
         self.cause) = now, network, lines, expires_at, banned_at, causes, cause

    @property
    def network(self):
        if self._network is None:
            self._network = self._lines.split("\n") if self.expires_at else []
        return self._network

    @property
    def lines(self):
        """The networks joined by newlines (a network with a newline in it, which
        policyd never writes, makes more lines than bans)."""
        if self._lines is None:
            self._lines = "\n".join(self._network)
        return self._lines

    def __len__(self):
        return len(self.expires_at)

    def pieces(self, count):
        """These columns cut into about `count` pieces, in recorded order."""
        if self._lines is None or self._network is not None:
            size = max(1, -(-len(self) // count))
            return [self._piece(start, start + size, self._network[start:start + size], None)
                    for start in range(0, len(self), size)]
        pieces, lines, at, line = [], self._lines, 0, 0
        step = len(lines) // count + 1
        while line < len(self):  # cut at the newline after each step
            end = lines.find("\n", at + step)
            text = lines[at:] if end < 0 else lines[at:end]
            lines_in = text.count("\n") + 1
            pieces.append(self._piece(line, line + lines_in, None, text))
            at, line = len(lines) + 1 if end < 0 else end + 1, line + lines_in
        return pieces

    def _piece(self, start, end, network, lines):
        return BanColumns(self.now, network, self.expires_at[start:end],
                          None if self.banned_at is None else self.banned_at[start:end],
                          self.causes, self.cause[start:end], lines)

    def soonest_first(self):
        """Indexes by expiry, soonest first; equal expiries in recorded order."""
        return _soonest_first(self.expires_at)

    def to_wire(self):
        """A control.RawPart: a small JSON head and the columns as bytes (networks
        joined by newlines, then native doubles and uint32s: the socket never
        leaves this host), neither JSON-escaped nor base64'd. banned_at not read
        (None) is sent as zeros."""
        banned_at = self.banned_at if self.banned_at is not None else repeat(0.0, len(self))
        return _wire(self.now, self.causes, self.lines.encode(), array.array("d", self.expires_at),
                     array.array("d", banned_at), array.array("I", self.cause))

    @classmethod
    def from_wire(cls, part):
        """The columns of a to_wire() answer; ValueError if it is not one."""
        head, data = part if isinstance(part, RawPart) else (None, None)
        if not isinstance(head, dict) or head.get("form") != WIRE:
            raise ValueError("not a ban list in columns")
        count, now, split = head["count"], head["now"], head["network_bytes"]
        if not isinstance(count, int) or not isinstance(now, (int, float)):
            raise ValueError("ban list: count or time missing")
        if (not isinstance(split, int) or count < 0 or split < 0
                or len(data) != split + count * _ROW_BYTES):
            raise ValueError("ban list: columns of different lengths")
        lines = data[:split].decode()
        expires_at, banned_at = _column("d", data, split, count), _column("d", data, split + 8 * count, count)
        cause = _column("I", data, split + 16 * count, count)
        causes = [tuple(entry) for entry in head["causes"]]
        if not all(len(entry) == 3 for entry in causes):
            raise ValueError("ban list: a cause is not (failures, filter, reason)")
        if (lines.count("\n") != count - 1) if count else lines:
            raise ValueError("ban list: columns of different lengths")
        if count and max(cause) >= len(causes):
            raise ValueError("ban list: a cause out of range")
        if not all(map(math.isfinite, expires_at)) or not all(map(math.isfinite, banned_at)):
            raise ValueError("ban list: a time that is not a number")
        return cls(float(now), None, expires_at, banned_at, causes, cause, lines)


_ROW_BYTES = 8 + 8 + 4  # expires_at, banned_at, cause


def _wire(now, causes, network, expires_at, banned_at, cause):
    """BanColumns.to_wire() of the columns as bytes and arrays."""
    return RawPart({"form": WIRE, "now": now, "count": len(expires_at),
                    "causes": [list(entry) for entry in causes], "network_bytes": len(network)},
                   b"".join((network, expires_at.tobytes(), banned_at.tobytes(), cause.tobytes())))


def _column(typecode, data, start, count):
    values = array.array(typecode)
    values.frombytes(data[start:start + values.itemsize * count])
    return values.tolist()


def from_snapshot(snapshot, now, network_text):
    """The columns of a ban book snapshot ({key: entry}, or [(key, entry)] as
    BanManager.snapshot() gives it) of the bans still in force at `now`, in
    recorded order; network_text(*key) spells a key as policyd.policy.lists.cidr_text
    does (and is asked only where inet_ntop differs)."""
    keys, entries = _split(snapshot)
    order = [i for i, entry in enumerate(entries) if entry[0] > now]
    listing = _Listing(None, max(1, len(order)))
    for lines, _starts, expires_at, banned_at, cause in listing.made(keys, entries, order,
                                                                     network_text):
        return BanColumns(now, None, expires_at.tolist(), banned_at.tolist(), list(listing.causes),
                          cause.tolist(), lines[:-1].decode())
    return BanColumns(now, [], [], [], [], [])


def parts_from_snapshot(snapshot, now, network_text, chunk=CHUNK, stamp=None, listing=None):
    """to_wire() answers of the snapshot's bans in force at `now`, soonest expiry
    first (equal ones in recorded order), up to `chunk` bans each, made as they are
    asked for. The one sort is of plain floats: C-level, a few ms for 100k.

    `stamp`: the ban book's (BanBook.stamp) when the snapshot was taken. The
    listing of one stamp is kept and sent again while the book is unchanged:
    spelling 100k keys is most of what a listing costs, and an operator lists
    the same bans again and again. `listing`: kept(stamp) as the caller found it
    (then the snapshot is not read)."""
    global _LAST
    listing = listing or kept(stamp, chunk)
    if listing is None:
        keys, entries = _split(snapshot)
        expires = list(map(_EXPIRES, entries))
        listing = _Listing(stamp, chunk)
        blocks = listing.made(keys, entries, _soonest_first(expires), network_text)
    else:
        blocks = listing.blocks
    for block in blocks:
        part = _block_wire(now, listing.causes, block)
        if part is not None:
            yield part
    if stamp is not None and listing is not _LAST:
        _LAST = listing  # made whole (a client that stops early leaves it unmade)


_LAST = None  # the daemon's last listing (its server threads list the bans)


def kept(stamp, chunk=CHUNK):
    """The listing kept for a ban book at `stamp`, or None."""
    listing = _LAST
    if stamp is None or listing is None or (listing.stamp, listing.chunk) != (stamp, chunk):
        return None
    return listing


def _soonest_first(expires):
    """Indexes by expiry, soonest first; equal expiries in recorded order: a range
    when they are recorded so (bans of one bantime, the usual), without sorting."""
    if all(map(le, expires, islice(expires, 1, None))):
        return range(len(expires))
    return sorted(range(len(expires)), key=expires.__getitem__)


def _split(snapshot):
    if isinstance(snapshot, dict):
        return list(snapshot), list(snapshot.values())
    return list(map(itemgetter(0), snapshot)), list(map(itemgetter(1), snapshot))


class _Listing:
    """The bans of a snapshot in an order, in blocks of `chunk` bans, each the
    networks as one ASCII text with the offset of each line (5 MB for 100k bans
    where 100k strings take 8) and the other columns as arrays; their causes
    numbered once for all. A block is made in one step: the main loop gets the
    GIL between steps (a C-level map holds it for its whole run)."""

    def __init__(self, stamp, chunk):
        self.stamp, self.chunk, self.blocks, self.causes = stamp, chunk, [], _Index()

    def made(self, keys, entries, order, network_text):
        """Make the blocks of the bans at `order` (indexes into keys and entries),
        yielding each as it is made. A daemon's listing (with a stamp) spells
        only the keys its last whole listing did not: the book changes between
        two listings by a few bans, and spelling 100k keys is most of the work."""
        global _SPELLED
        spelled = _SPELLED if self.stamp is not None else {}
        if len(spelled) > 2 * len(order) + self.chunk:
            spelled = {}   # mostly bans long gone: start again, rather than weed
        for start in range(0, len(order), self.chunk):
            part = order[start:start + self.chunk]
            if isinstance(part, range):   # already in expiry order (the usual): slices
                chosen, chosen_keys = entries[part.start:part.stop], keys[part.start:part.stop]
            else:
                chosen = list(map(entries.__getitem__, part))
                chosen_keys = list(map(keys.__getitem__, part))
            lines = _spelled_lines(chosen_keys, spelled, network_text)
            # An array made from a list is sized once; from a map it grows item by
            # item (a third slower: ~10 ms a listing of 100k bans).
            block = ("".join(lines).encode("ascii"),
                     array.array("Q", list(accumulate(map(len, lines), initial=0))),
                     array.array("d", list(map(_EXPIRES, chosen))), array.array("d", list(map(_BANNED, chosen))),
                     array.array("I", list(map(self.causes.__getitem__, map(_CAUSE, chosen)))))
            self.blocks.append(block)
            yield block
        if self.stamp is not None:
            _SPELLED = spelled


# key -> "network\n" as the daemon's listings spelled it (~10 MB for 100k bans),
# dropped when it holds over twice the bans in force. Server threads that list at
# once each add to it or swap in a whole new dict: both are atomic.
_SPELLED = {}


def _spelled_lines(keys, spelled, network_text):
    """"network\n" of each key, from `spelled` where it has the key; those it
    lacks are spelled and added to it."""
    lines = list(map(spelled.get, keys))
    if None not in lines:
        return lines
    missing = [key for key, line in zip(keys, lines) if line is None]
    made = list(map(str.__add__, _network_texts(missing, network_text), repeat("\n")))
    spelled.update(zip(missing, made))
    made = iter(made)
    return [line if line is not None else next(made) for line in lines]


def _block_wire(now, causes, block):
    """The to_wire() answer of a block's bans in force at `now` (the last ones:
    a block is in expiry order), or None if none is."""
    lines, starts, expires_at, banned_at, cause = block
    first = bisect_right(expires_at, now)
    if first == len(expires_at):
        return None
    return _wire(now, list(causes), lines[starts[first]:-1], expires_at[first:],
                 banned_at[first:], cause[first:])


class _Index(dict):
    """value -> its index in order of first sight; looked up by C-level maps."""

    def __missing__(self, value):
        self[value] = index = len(self)
        return index


_FAMILIES = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}
_SUFFIXES = [f"/{length}" for length in range(129)]


def _network_texts(keys, network_text):
    """network_text(*key) for each key, by inet_ntop over the whole list. glibc writes
    an IPv6 address whose first 80 bits are zero with an embedded IPv4 (::1.2.3.4),
    where ipaddress writes hex: those few are spelled by network_text itself.
    A chunk of one version and one prefix length (the usual) maps the fewest steps."""
    if not keys:
        return []
    versions, numbers = list(map(itemgetter(0), keys)), list(map(itemgetter(1), keys))
    lengths = list(map(itemgetter(2), keys))
    if versions.count(versions[0]) == len(versions):
        family, size = _FAMILIES[versions[0]]
        texts = list(map(socket.inet_ntop, repeat(family), map(
            int.to_bytes, numbers, repeat(size), repeat("big"))))
        spoken = versions[0] == 6 and min(numbers) < _DOTTED_BELOW
    else:
        families = list(map(_FAMILIES.__getitem__, versions))
        texts = list(map(socket.inet_ntop, map(itemgetter(0), families), map(
            int.to_bytes, numbers, map(itemgetter(1), families), repeat("big"))))
        spoken = True
    if spoken and sum(map(str.__contains__, texts, repeat("."))) != versions.count(4):
        for i, (version, text) in enumerate(zip(versions, texts)):
            if version == 6 and "." in text:
                texts[i] = network_text(*keys[i]).rpartition("/")[0]
    if lengths.count(lengths[0]) == len(lengths):
        return map(str.__add__, texts, repeat(_SUFFIXES[lengths[0]]))
    return map(str.__add__, texts, map(_SUFFIXES.__getitem__, lengths))


_DOTTED_BELOW = 1 << 48  # an IPv6 number from here up has a nonzero bit in its first 80


def rows_from_snapshot(snapshot, now, network_text):
    """The list-of-objects answer of daemons before the columns (Ban.as_dict() plus
    seconds_left, soonest expiry first), for a request that does not ask for columns."""
    rows = sorted(((key, entry) for key, entry in snapshot if entry[0] > now),
                  key=lambda item: (item[1][0], item[0]))
    return [{"network": network_text(version, number, prefixlen), "expires_at": expires_at,
             "failures": failures, "filter": filter_name, "reason": reason,
             "banned_at": banned_at, "seconds_left": round(max(0.0, expires_at - now), 1)}
            for (version, number, prefixlen), (expires_at, failures, filter_name, reason,
                                               banned_at) in rows]


def seconds_left(columns, order):
    """[max(0, expires_at - now)] of each ban in `order` (C-level maps; the max
    only where a ban has expired, which the daemon and the state file leave out)."""
    expires = columns.expires_at
    if not (isinstance(order, range) and order == range(len(expires))):
        expires = list(map(expires.__getitem__, order))
    now = columns.now
    if not expires or min(expires) > now:
        return list(map(sub, expires, repeat(now)))
    return list(map(max, repeat(0.0), map(sub, expires, repeat(now))))
