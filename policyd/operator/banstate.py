"""The ban list without a daemon: the bans the state file records as in force,
read as BanColumns (policyd.operator.banlist) with as few Python objects per ban
as SQLite allows, and their count for `policyd status`.

Owns the listing file too: the columns last read, kept in the state dir with a
fingerprint of the bans table, so that listing the same bans again reads a
few MB instead of 100k rows.
"""
import json
import os
from itertools import compress, repeat
from operator import gt, itemgetter

from policyd.operator.banlist import BanColumns, _Index
from policyd.operator.control import RawPart

LISTING_FILE = "bans.listing"   # in the state dir
# What every change policyd makes to the bans table changes: a ban added or
# lifted moves the count; a ban written again (INSERT OR REPLACE: extended, a
# peer's) gets the next rowid, and new bans carry new times. One pass of two
# columns, about a tenth of reading the rows. It would miss only a ban lifted
# and another written with the very same rowid and times: equal times come
# from one batch of bans, which a lift does not come between.
_FINGERPRINT = "SELECT count(*), max(rowid), total(expires_at), total(banned_at) FROM bans"


def from_state(state_dir, now, banned_at=True):
    """The bans a state file records as in force at `now`, or None without a file.

    Read-only and without the daemon's start-up checks (policyd.banning.state runs those):
    this is what the daemon restores when it starts, read for an operator.
    Without `banned_at` that column is left out (None): the text needs none, and
    reading a value per row is what costs here. The listing file gives them when
    its fingerprint is the table's; else they are read, and the file written
    again (if the state dir lets us: it is only a copy).
    """
    from policyd.banning import statefile  # sqlite3: only without a daemon
    return statefile.read(state_dir, lambda db: _listed(db, state_dir, now, banned_at),
                          BanColumns(now, [], [], [], [], []))


def _listed(db, state_dir, now, banned_at):
    fingerprint = list(db.execute(_FINGERPRINT).fetchone())
    path = os.path.join(state_dir, LISTING_FILE)
    columns = _saved(path, fingerprint, now, banned_at)
    if columns is None:
        columns = _columns_of(db, now, banned_at)
        _save(path, fingerprint, columns)
    return columns


def _save(path, fingerprint, columns):
    """Write `columns` with the fingerprint they were read under; quietly not at all
    where the state dir cannot take it. A new file renamed over the old: a reader
    finds the old listing or the new one, whole. Kept soonest expiry first (equal
    ones in recorded order, as the listing prints them): printing it then sorts
    nothing and takes the networks as the file joins them."""
    order = columns.soonest_first()
    if not isinstance(order, range):
        columns = _taken(columns, lambda column: list(map(column.__getitem__, order)))
    head, data = columns.to_wire()
    record = json.dumps({"fingerprint": fingerprint, "columns": head,
                         "banned_at": columns.banned_at is not None}).encode() + b"\n"
    temporary = f"{path}.{os.getpid()}"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(descriptor, "wb") as out:
            out.write(record)
            out.write(data)
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass


def _saved(path, fingerprint, now, banned_at):
    """The listing file's columns still in force at `now`, if it was read under
    `fingerprint` at or before `now` (and holds banned_at if asked); else None.
    The file is policyd's own in a root-only dir, but whatever it holds is read
    as a wire answer is: checked, and a copy that does not check out is read again."""
    try:
        with open(path, "rb") as saved:
            record = json.loads(saved.readline())
            data = saved.read()
        if (not isinstance(record, dict) or record.get("fingerprint") != fingerprint
                or (banned_at and record.get("banned_at") is not True)):
            return None
        columns = BanColumns.from_wire(RawPart(record["columns"], data))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not columns.now <= now:
        return None   # read later than now (the clock went back): it may lack bans in force now
    if not banned_at or record["banned_at"] is not True:
        columns.banned_at = None
    columns.now = now
    if columns.expires_at and min(columns.expires_at) <= now:
        columns = _in_force(columns, now)
    return columns


def _in_force(columns, now):
    """`columns` less the bans that expired since they were read (order kept)."""
    keep = list(map(gt, columns.expires_at, repeat(now)))
    return _taken(columns, lambda column: list(compress(column, keep)))


def _taken(columns, pick):
    """`columns` with pick(column) of each column: some of the bans, or another order."""
    network, expires_at, banned_at, cause = (None if column is None else pick(column) for column in (
        columns.network, columns.expires_at, columns.banned_at, columns.cause))
    return BanColumns(columns.now, network, expires_at, banned_at, columns.causes, cause)


def count_in_state(state_dir, now):
    """How many bans the state file records as in force at `now` (None without one)."""
    from policyd.banning import statefile
    return statefile.read(state_dir, lambda db: db.execute(
        "SELECT count(*) FROM bans WHERE expires_at > ?", (now,)).fetchone()[0], 0)


def _columns_of(db, now, banned_at):
    """The bans in force, in the order the rows were written (one read transaction:
    the queries below see the same rows)."""
    causes = _distinct_causes(db, now)
    columns = None
    if causes is not None:
        columns = (_numbered_columns_of(db, now, causes, banned_at) if len(causes) > 1 else
                   _one_cause_columns_of(db, now, causes[0] if causes else None, banned_at))
    return columns if columns is not None else _rows_of(db, now, banned_at)


def _rows_of(db, now, banned_at):
    """_columns_of() from every field of every row: the plain reading, which the
    quicker ones above must equal."""
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


def _distinct_causes(db, now):
    """The distinct (failures, filter, reason) of the bans in force, in the order
    SQLite meets them, or None if there are more than MAX_NUMBERED_CAUSES."""
    causes = db.execute("SELECT DISTINCT failures, filter, reason FROM bans "
                        "WHERE expires_at > ?", (now,)).fetchmany(MAX_NUMBERED_CAUSES + 1)
    return None if len(causes) > MAX_NUMBERED_CAUSES else causes


def _one_cause_columns_of(db, now, cause, banned_at):
    """The columns when every ban in force has `cause` (manual bans, or a flood's;
    None: there are no bans), else None: the networks as SQLite joins them and
    the times, so Python makes one or two objects per ban, not five. (A network
    stored as a BLOB, which policyd never writes, is read as its text here.)"""
    if cause is None:
        return BanColumns(now, [], [], [] if banned_at else None, [], [])
    lines, count = db.execute("SELECT group_concat(network, char(10)), count(*) FROM bans "
                              "WHERE expires_at > ?", (now,)).fetchone()
    if lines.count("\n") != count - 1:  # a network with a newline in it
        return None
    times = db.execute(f"SELECT expires_at{', banned_at' if banned_at else ''} FROM bans "
                       "WHERE expires_at > ?", (now,))
    if banned_at:
        rows = times.fetchall()
        return BanColumns(now, None, list(map(itemgetter(0), rows)), list(map(itemgetter(1), rows)),
                          [cause], [0] * count, lines)
    # Each row taken as the cursor steps (no list of 100k rows first): a third faster.
    return BanColumns(now, None, list(map(itemgetter(0), times)), None, [cause], [0] * count, lines)


def _numbered_columns_of(db, now, causes, banned_at):
    """The columns of bans of several `causes`, each numbered by SQLite; None if
    SQLite's DISTINCT and IS disagree."""
    numbered = " ".join("WHEN failures IS ? AND filter IS ? AND reason IS ? THEN "
                        f"{index}" for index in range(len(causes)))
    rows = db.execute(f"SELECT network, expires_at, CASE {numbered} ELSE -1 END"
                      f"{', banned_at' if banned_at else ''} FROM bans WHERE expires_at > ?",
                      [value for cause in causes for value in cause] + [now]).fetchall()
    cause = list(map(itemgetter(2), rows))
    if min(cause) < 0:  # a cause SQLite's DISTINCT and IS do not agree on
        return None
    return BanColumns(now, list(map(itemgetter(0), rows)), list(map(itemgetter(1), rows)),
                      list(map(itemgetter(3), rows)) if banned_at else None, causes, cause)
