"""The ban list an operator reads (`policyd bans`), as columns: built from the
daemon's ban book or, with no daemon, from the state file; sent over the control
socket as raw bytes after a small JSON head instead of 100k JSON objects.

Printing them is policyd.operator.banprint's. A column is built and read with C-level
maps where it can: with 100k bans, a Python step per ban per field is what costs.
"""
import array
from dataclasses import dataclass
import math
import socket
import sqlite3
from itertools import compress, repeat
from operator import itemgetter, sub
from pathlib import Path

from policyd.operator.control import RawPart
from policyd.errors import HostError

WIRE = "columns/2"  # /1 sent the columns as base64 in the JSON line
# Bans per step on the daemon's server thread: a C-level map holds the GIL for
# its whole run, and the main loop must not wait behind it for long (each map
# over 5000 bans takes a few ms at most).
CHUNK = 5000
_EXPIRES, _BANNED = itemgetter(0), itemgetter(4)  # of the ban book's entry tuple
_CAUSE = itemgetter(1, 2, 3)                        # -> (failures, filter, reason)


@dataclass(eq=False, slots=True)
class BanColumns:
    """Active bans at `now`, one list per field, in the order they were recorded.

    `cause[i]` indexes `causes`, the distinct (failures, filter, reason) triples:
    a handful for 100k bans, so each is formatted once. `banned_at` is None where
    it was not read (the text does not print it).
    """

    now: float
    network: list
    expires_at: list
    banned_at: list | None
    causes: list
    cause: list

    def __len__(self):
        return len(self.network)

    def soonest_first(self):
        """Indexes by expiry, soonest first; equal expiries in recorded order."""
        return sorted(range(len(self.expires_at)), key=self.expires_at.__getitem__)

    def to_wire(self):
        """A control.RawPart: a small JSON head and the columns as bytes (networks
        joined by newlines, then native doubles and uint32s: the socket never
        leaves this host), neither JSON-escaped nor base64'd."""
        network = "\n".join(self.network).encode()
        data = b"".join((network, array.array("d", self.expires_at).tobytes(),
                         array.array("d", self.banned_at).tobytes(),
                         array.array("I", self.cause).tobytes()))
        return RawPart({"form": WIRE, "now": self.now, "count": len(self.network),
                        "causes": [list(cause) for cause in self.causes],
                        "network_bytes": len(network)}, data)

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
        network = data[:split].decode().split("\n") if count else []
        expires_at, banned_at = _column("d", data, split, count), _column("d", data, split + 8 * count, count)
        cause = _column("I", data, split + 16 * count, count)
        causes = [tuple(entry) for entry in head["causes"]]
        if not all(len(entry) == 3 for entry in causes):
            raise ValueError("ban list: a cause is not (failures, filter, reason)")
        if len(network) != count:
            raise ValueError("ban list: columns of different lengths")
        if count and max(cause) >= len(causes):
            raise ValueError("ban list: a cause out of range")
        if not all(map(math.isfinite, expires_at)) or not all(map(math.isfinite, banned_at)):
            raise ValueError("ban list: a time that is not a number")
        return cls(float(now), network, expires_at, banned_at, causes, cause)


_ROW_BYTES = 8 + 8 + 4  # expires_at, banned_at, cause


def _column(typecode, data, start, count):
    values = array.array(typecode)
    values.frombytes(data[start:start + values.itemsize * count])
    return values.tolist()


def from_snapshot(snapshot, now, network_text):
    """The columns of a ban book snapshot ([(key, entry)], BanManager.snapshot())
    of the bans still in force at `now`; network_text(*key) spells a key as
    policyd.policy.lists.cidr_text does (and is asked only where inet_ntop differs)."""
    network, expires_at, banned_at, cause = [], [], [], []
    causes = _Index()
    for start in range(0, len(snapshot), CHUNK):
        part = snapshot[start:start + CHUNK]
        entries = list(map(itemgetter(1), part))
        keep = list(map(float(now).__lt__, map(_EXPIRES, entries)))
        if not all(keep):  # expired, not yet lifted: not in force
            part, entries = list(compress(part, keep)), list(compress(entries, keep))
        if not part:
            continue
        network += _network_texts(list(map(itemgetter(0), part)), network_text)
        expires_at += map(_EXPIRES, entries)
        banned_at += map(_BANNED, entries)
        cause += map(causes.__getitem__, map(_CAUSE, entries))
    return BanColumns(now, network, expires_at, banned_at, list(causes), cause)


def parts_from_snapshot(snapshot, now, network_text, chunk=CHUNK):
    """to_wire() answers of the snapshot's bans in force at `now`, soonest expiry
    first (equal ones in recorded order), `chunk` bans each, made as they are asked
    for. The one sort is of plain floats: C-level, a few ms for 100k."""
    expires = list(map(_EXPIRES, map(itemgetter(1), snapshot)))
    order = sorted(range(len(snapshot)), key=expires.__getitem__)
    for start in range(0, len(order), chunk):
        part = from_snapshot(list(map(snapshot.__getitem__, order[start:start + chunk])),
                             now, network_text)
        if len(part):
            yield part.to_wire()


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


def from_state(state_dir, now, banned_at=True):
    """The bans a state file records as in force at `now`, or None without a file.

    Read-only and without the daemon's start-up checks (policyd.banning.state runs those):
    this is what the daemon restores when it starts, read for an operator.
    Without `banned_at` that column is left out (None): the text needs none, and
    reading a value per row is what costs here.
    """
    return _read_state(state_dir, lambda db: _columns_of(db, now, banned_at),
                       BanColumns(now, [], [], [], [], []))


def count_in_state(state_dir, now):
    """How many bans the state file records as in force at `now` (None without one)."""
    return _read_state(state_dir, lambda db: db.execute(
        "SELECT count(*) FROM bans WHERE expires_at > ?", (now,)).fetchone()[0], 0)


READ_MMAP_BYTES = 1 << 30


def _read_state(state_dir, read, empty):
    """read(db) on the state file opened read-only; `empty` if it has no bans table
    yet, None if there is no file. A foreign or damaged file is the host's error."""
    from policyd.banning.state import APPLICATION_ID, STATE_FILE
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            db.execute(f"PRAGMA mmap_size = {READ_MMAP_BYTES}")  # pages read in place, not copied
            if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                raise HostError("not a policyd state database (foreign SQLite file)", file=path)
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'bans'").fetchone():
                return empty
            return read(db)
        finally:
            db.close()
    except sqlite3.Error as error:
        raise HostError(f"cannot read state database: {error}", file=path) from None


def _columns_of(db, now, banned_at):
    """One pass over the bans table, in the order the rows were written."""
    if not banned_at:
        columns = _text_columns_of(db, now)
        if columns is not None:
            return columns
    rows = db.execute(f"SELECT network, expires_at, {'banned_at' if banned_at else 'NULL'}, "
                      "failures, filter, reason FROM bans WHERE expires_at > ?",
                      (now,)).fetchall()
    causes = _Index()
    cause = list(map(causes.__getitem__, map(itemgetter(3, 4, 5), rows)))
    return BanColumns(now, list(map(itemgetter(0), rows)), list(map(itemgetter(1), rows)),
                      list(map(itemgetter(2), rows)) if banned_at else None,
                      list(causes), cause)


# Distinct causes of the bans in force, up to this many, are numbered by SQLite
# itself: a row is then (network, expires_at, small int), and Python builds no
# failures, filter and reason objects per ban (most of reading the file's time).
MAX_NUMBERED_CAUSES = 64


def _text_columns_of(db, now):
    """The columns the text prints (no banned_at), or None if the bans have too
    many distinct causes to number in SQL."""
    causes = db.execute("SELECT DISTINCT failures, filter, reason FROM bans "
                        "WHERE expires_at > ?", (now,)).fetchmany(MAX_NUMBERED_CAUSES + 1)
    if len(causes) > MAX_NUMBERED_CAUSES:
        return None
    numbered = " ".join("WHEN failures IS ? AND filter IS ? AND reason IS ? THEN "
                        f"{index}" for index in range(len(causes)))
    rows = db.execute(f"SELECT network, expires_at, CASE {numbered} ELSE -1 END FROM bans "
                      "WHERE expires_at > ?" if causes else
                      "SELECT network, expires_at, -1 FROM bans WHERE expires_at > ?",
                      [value for cause in causes for value in cause] + [now]).fetchall()
    cause = list(map(itemgetter(2), rows))
    if cause and min(cause) < 0:  # the table changed between the two reads
        return None
    return BanColumns(now, list(map(itemgetter(0), rows)), list(map(itemgetter(1), rows)),
                      None, causes, cause)


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
