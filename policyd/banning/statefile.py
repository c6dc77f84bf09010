"""The state file's name and mark, and reading it read-only for an operator's
command without a daemon (policyd.banning.state owns the schema and the writes;
importing it, with logging and threading, would cost each such command).
"""
import sqlite3
from pathlib import Path

from policyd.errors import HostError

STATE_FILE = "state.db"  # in the state dir
# "pold": marks the file as ours, so a foreign SQLite file is refused instead
# of having our tables added to it.
APPLICATION_ID = 0x706F6C64
READ_MMAP_BYTES = 1 << 30


def read(state_dir, reader, empty):
    """reader(db) on the state file opened read-only, in one read transaction (one
    snapshot of the file however many queries it makes); `empty` if it has no bans
    table yet, None if there is no file. A foreign or damaged file is the host's error."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        try:
            db.execute(f"PRAGMA mmap_size = {READ_MMAP_BYTES}")  # pages read in place, not copied
            db.execute("BEGIN")
            if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                raise HostError("not a policyd state database (foreign SQLite file)", file=path)
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'bans'").fetchone():
                return empty
            return reader(db)
        finally:
            db.close()
    except sqlite3.Error as error:
        raise HostError(f"cannot read state database: {error}", file=path) from None
