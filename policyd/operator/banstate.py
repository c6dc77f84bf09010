"""The ban list without a daemon: the bans the state file records as in force,
read as BanColumns (policyd.operator.banlist) with as few Python objects per ban
as SQLite allows, and their count for `policyd status`.
"""
from operator import itemgetter

from policyd.operator.banlist import BanColumns, _Index


def from_state(state_dir, now, banned_at=True):
    """The bans a state file records as in force at `now`, or None without a file.

    Read-only and without the daemon's start-up checks (policyd.banning.state runs those):
    this is what the daemon restores when it starts, read for an operator.
    Without `banned_at` that column is left out (None): the text needs none, and
    reading a value per row is what costs here.
    """
    from policyd.banning import statefile  # sqlite3: only without a daemon
    return statefile.read(state_dir, lambda db: _columns_of(db, now, banned_at),
                          BanColumns(now, [], [], [], [], []))


def count_in_state(state_dir, now):
    """How many bans the state file records as in force at `now` (None without one)."""
    from policyd.banning import statefile
    return statefile.read(state_dir, lambda db: db.execute(
        "SELECT count(*) FROM bans WHERE expires_at > ?", (now,)).fetchone()[0], 0)


def _columns_of(db, now, banned_at):
    """The bans in force, in the order the rows were written (one read transaction:
    the queries below see the same rows)."""
    if not banned_at:
        causes = _distinct_causes(db, now)
        columns = None
        if causes is not None:
            columns = (_text_columns_of(db, now, causes) if len(causes) > 1 else
                       _one_cause_columns_of(db, now, causes[0] if causes else None))
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


def _distinct_causes(db, now):
    """The distinct (failures, filter, reason) of the bans in force, in the order
    SQLite meets them, or None if there are more than MAX_NUMBERED_CAUSES."""
    causes = db.execute("SELECT DISTINCT failures, filter, reason FROM bans "
                        "WHERE expires_at > ?", (now,)).fetchmany(MAX_NUMBERED_CAUSES + 1)
    return None if len(causes) > MAX_NUMBERED_CAUSES else causes


def _one_cause_columns_of(db, now, cause):
    """The columns the text prints when every ban in force has `cause` (manual
    bans, or a flood's; None: there are no bans), else None: the networks as
    SQLite joins them and the expiries, so Python makes one object per ban, not
    four. (A network stored as a BLOB, which policyd never writes, is read as
    its text here.)"""
    if cause is None:
        return BanColumns(now, [], [], None, [], [])
    lines, count = db.execute("SELECT group_concat(network, char(10)), count(*) FROM bans "
                              "WHERE expires_at > ?", (now,)).fetchone()
    if lines.count("\n") != count - 1:  # a network with a newline in it
        return None
    # Each row taken as the cursor steps (no list of 100k rows first): a third faster.
    expires_at = list(map(itemgetter(0), db.execute(
        "SELECT expires_at FROM bans WHERE expires_at > ?", (now,))))
    return BanColumns(now, None, expires_at, None, [cause], [0] * count, lines)


def _text_columns_of(db, now, causes):
    """The columns the text prints (no banned_at) of bans of several `causes`,
    each numbered by SQLite; None if SQLite's DISTINCT and IS disagree."""
    numbered = " ".join("WHEN failures IS ? AND filter IS ? AND reason IS ? THEN "
                        f"{index}" for index in range(len(causes)))
    rows = db.execute(f"SELECT network, expires_at, CASE {numbered} ELSE -1 END FROM bans "
                      "WHERE expires_at > ?", [value for cause in causes for value in cause] + [now]).fetchall()
    cause = list(map(itemgetter(2), rows))
    if min(cause) < 0:  # a cause SQLite's DISTINCT and IS do not agree on
        return None
    return BanColumns(now, list(map(itemgetter(0), rows)), list(map(itemgetter(1), rows)),
                      None, causes, cause)
