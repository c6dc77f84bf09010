"""The daemon's persistent state: one SQLite file with a versioned schema.

Owns active bans, per-network ban history (for escalation), the recent
failures of the findtime window, and log read positions. Knows nothing of
nftables or of the ban rules; bans.py decides, this module remembers.
"""
import json
import logging
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from policyd.banning.statefile import APPLICATION_ID, STATE_FILE  # noqa: F401 (for its users)
from policyd.errors import HostError

log = logging.getLogger(__name__)

# The failure window is persisted, not kept only in memory: log positions are
# persisted too, so after a restart the lines already read are never read
# again. A window held only in memory would forget up to maxretry-1 failures
# per source at every restart, and an attacker who can make the daemon restart
# would never be banned. The cost is one INSERT per failure, batched into the
# flush transaction that the ban path makes anyway.
#
# MIGRATIONS[i] takes the schema from user_version i to i+1. Append only.
MIGRATIONS = (
    """
    CREATE TABLE bans (
        key        BLOB PRIMARY KEY,
        network    TEXT NOT NULL,
        version    INTEGER NOT NULL CHECK (version IN (4, 6)),
        banned_at  REAL NOT NULL,
        expires_at REAL NOT NULL,
        failures   INTEGER NOT NULL,
        filter     TEXT,
        reason     TEXT NOT NULL CHECK (reason IN ('auto', 'manual'))
    );
    CREATE TABLE ban_history (
        key      BLOB PRIMARY KEY,
        bans     INTEGER NOT NULL,
        last_end REAL NOT NULL
    );
    CREATE TABLE failures (
        key    BLOB NOT NULL,
        time   REAL NOT NULL,
        filter TEXT NOT NULL
    );
    CREATE INDEX failures_by_key ON failures (key);
    CREATE INDEX failures_by_time ON failures (time);
    CREATE TABLE log_positions (
        path     TEXT PRIMARY KEY,
        position TEXT NOT NULL
    );
    """,
    # The fleet's outbox: bans and unbans this node made that Redis has not
    # taken yet (Redis down, or the daemon stopped first), sent in seq order.
    # fleet_meta keeps the last id Redis gave this node's stream, which tells
    # a Redis restarted empty from one that kept its data.
    """
    CREATE TABLE fleet_outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        op         TEXT NOT NULL CHECK (op IN ('ban', 'unban')),
        network    TEXT NOT NULL,
        expires_at REAL,
        reason     TEXT NOT NULL
    );
    CREATE TABLE fleet_meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2 -> 3: failures are no longer deleted by key when their network is banned
    # (load_failures skips those older than the network's last ban instead), so
    # the index by key only cost a random page write per failure in a flood.
    """
    DROP INDEX IF EXISTS failures_by_key;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Networks are keyed by an opaque BLOB that bans.py makes (packed address and
# prefix length): reading 100k bans back must not parse 100k address strings.
# `network` keeps the text form for people reading the file with sqlite3.
# Keys per `IN (...)` query: well under SQLite's limit on bound parameters.
HISTORY_QUERY_KEYS = 500
BAN_COLUMNS = ("key", "network", "version", "banned_at", "expires_at", "failures", "filter", "reason")


class State:
    """An open state file. Writes go through `transaction()`, one per flush."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            # Autocommit mode: transactions are opened explicitly, so a flush
            # is exactly one BEGIN ... COMMIT whatever the statements are.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise HostError(f"cannot open state database: {error}", file=self.path) from None
        try:
            self._prepare()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise HostError(f"not a usable policyd state database: {error}", file=self.path) from None
        except HostError:
            self._db.close()
            raise

    def _prepare(self):
        db = self._db
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if application_id != APPLICATION_ID and (application_id != 0 or has_tables):
            raise HostError("not a policyd state database (foreign SQLite file)", file=self.path)
        if version > SCHEMA_VERSION:
            raise HostError(
                f"state schema version {version} is newer than this policyd understands "
                f"({SCHEMA_VERSION})", file=self.path)
        if application_id == APPLICATION_ID and version:
            # Finds damage in the pages of an existing file now, as a clear
            # error, instead of later on the ban path.
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise HostError(f"state database is damaged: {problem}", file=self.path)
        db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL loses at most the last commits on power loss,
        # never consistency; FULL would fsync on every flush of the ban path.
        db.execute("PRAGMA synchronous=NORMAL")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            db.executescript(
                "BEGIN;\n" + MIGRATIONS[target - 1]
                + f";\nPRAGMA application_id={APPLICATION_ID};\nPRAGMA user_version={target};\nCOMMIT;")

    def close(self):
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, sql, args=()):
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as error:
                raise HostError(f"cannot read state database: {error}", file=self.path) from None

    @contextmanager
    def transaction(self):
        """One BEGIN ... COMMIT; yields a Writer. Rolls back if the block raises."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield Writer(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed (disk full): a transaction
                # left open would make every later BEGIN fail.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # Reading, at startup.

    def load_bans(self, now):
        """Rows (BAN_COLUMNS order) of bans that have not expired at `now`."""
        return self._read(
            f"SELECT {', '.join(BAN_COLUMNS)} FROM bans WHERE expires_at > ?", (now,))

    def load_history_of(self, key):
        """(times banned, end of the last ban) for one key, or None."""
        rows = self._read("SELECT bans, last_end FROM ban_history WHERE key = ?", (key,))
        return rows[0] if rows else None

    def load_history_of_many(self, keys):
        """{key: (times banned, end of the last ban)} for those of `keys` with history."""
        found = {}
        for start in range(0, len(keys), HISTORY_QUERY_KEYS):
            chunk = keys[start:start + HISTORY_QUERY_KEYS]
            found.update((key, (bans, last_end)) for key, bans, last_end in self._read(
                f"SELECT key, bans, last_end FROM ban_history WHERE key IN "
                f"({', '.join('?' * len(chunk))})", chunk))
        return found

    def load_failures(self, since):
        """[(key, time, filter)] of failures at or after `since`, oldest first, without
        those made stale by a ban of their key (up to its history's last_end)."""
        return self._read(
            "SELECT f.key, f.time, f.filter FROM failures AS f "
            "LEFT JOIN ban_history AS h ON h.key = f.key "
            "WHERE f.time >= ? AND (h.last_end IS NULL OR f.time > h.last_end) "
            "ORDER BY f.time", (since,))

    # Log positions: the tail module's PositionStore protocol is load/save.

    def load_position(self, path):
        rows = self._read("SELECT position FROM log_positions WHERE path = ?", (str(path),))
        if not rows:
            return None
        try:
            return json.loads(rows[0][0])
        except ValueError:
            return None  # a damaged position means "start as for a new log", not a crash

    def save_position(self, path, position):
        """Store `position` (JSON-able). A failed write is logged, not raised: the
        cost is re-reading some lines after a restart, not a dead daemon."""
        try:
            with self.transaction() as writer:
                writer.save_position(path, position)
        except (sqlite3.Error, OSError) as error:
            log.error("could not save the position of %s in %s: %s", path, self.path, error)

    load = load_position
    save = save_position

    # The fleet's outbox and its one remembered stream id (policyd.fleet.node uses these).

    def fleet_outbox(self):
        """[(seq, op, network, expires_at, reason)] not yet published, oldest first."""
        return self._read("SELECT seq, op, network, expires_at, reason FROM fleet_outbox ORDER BY seq")

    def fleet_meta(self, name):
        rows = self._read("SELECT value FROM fleet_meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None


class Writer:
    """The statements a transaction may run; every method takes a whole batch."""

    def __init__(self, db):
        self._db = db

    def execute(self, sql, args=()):
        self._db.execute(sql, args)

    def upsert_bans(self, rows):
        """rows: BAN_COLUMNS order."""
        self._db.executemany(
            f"INSERT OR REPLACE INTO bans ({', '.join(BAN_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(BAN_COLUMNS))})", rows)

    def delete_bans(self, keys):
        self._db.executemany("DELETE FROM bans WHERE key = ?", ((key,) for key in keys))

    def upsert_history(self, rows):
        """rows: (key, times banned, end of the last ban)."""
        self._db.executemany(
            "INSERT OR REPLACE INTO ban_history (key, bans, last_end) VALUES (?, ?, ?)", rows)

    def add_failures(self, rows):
        """rows: (key, time, filter)."""
        self._db.executemany("INSERT INTO failures (key, time, filter) VALUES (?, ?, ?)", rows)

    def save_position(self, path, position):
        self._db.execute(
            "INSERT INTO log_positions (path, position) VALUES (?, ?) "
            "ON CONFLICT (path) DO UPDATE SET position = excluded.position",
            (str(path), json.dumps(position, sort_keys=True)))

    def prune_failures(self, before):
        self._db.execute("DELETE FROM failures WHERE time < ?", (before,))

    def add_fleet_outbox(self, rows):
        """rows: (op, network, expires_at, reason); returns the seq given to each."""
        seqs = []
        for row in rows:
            seqs.append(self._db.execute(
                "INSERT INTO fleet_outbox (op, network, expires_at, reason) VALUES (?, ?, ?, ?)",
                row).lastrowid)
        return seqs

    def delete_fleet_outbox(self, seqs):
        self._db.executemany("DELETE FROM fleet_outbox WHERE seq = ?", ((seq,) for seq in seqs))

    def set_fleet_meta(self, name, value):
        self._db.execute("INSERT OR REPLACE INTO fleet_meta (name, value) VALUES (?, ?)",
                         (name, str(value)))
