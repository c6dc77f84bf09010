"""Follow one systemd unit's entries in the journal (python3-systemd).

Owns matching on the trusted `_SYSTEMD_UNIT` field (journald sets it; any
local user can set SYSLOG_IDENTIFIER with `systemd-cat -t sshd`), or for a
template (`ssh@.service`) on its instances' slice and unit names, the cursor
that a restart resumes from, and a wake-up thread. The cursor is handed to the
caller's position queue, which stores it in the same transaction as the
failures read up to it, so a restart neither misses nor double-counts.
"""
import logging
import threading

from policyd.errors import InputError
from policyd.logs.filters import MAX_LINE_BYTES, Outcome
from policyd.policy.reader import JOURNAL_UNIT

log = logging.getLogger(__name__)

WAIT_SECONDS = 1.0
# Entries handled per read: bounds memory during a flood (the rest come next round).
BATCH_ENTRIES = 20000


def _journal_module():
    try:
        from systemd import journal
    except ImportError:
        raise InputError("journal sources need python3-systemd (apt install python3-systemd)",
                         key="bans.logs.journal") from None
    return journal


def position_key(unit):
    return f"journal:{unit}"


def template_slice(unit):
    """The slice systemd runs the instances of a template `NAME@.service` in
    (`system-NAME.slice`, NAME escaped as unit_name_escape() does, so a '-' is
    not read as a slice level), or None for a unit that is not a template."""
    if not unit.endswith("@.service") or "@" in unit[:-len("@.service")]:
        return None
    prefix = unit[:-len("@.service")]
    escaped = "".join(
        f"\\x{byte:02x}" if byte in b"-\\" or (index == 0 and byte == ord("."))
        else chr(byte) for index, byte in enumerate(prefix.encode()))
    return f"system-{escaped}.slice"


def _match_unit(reader, unit):
    """Entries of `unit`; of a template, those in its instances' slice (sd-journal
    matches exact values only: instance names are checked as they are read)."""
    slice_name = template_slice(unit)
    if slice_name is None:
        reader.add_match(_SYSTEMD_UNIT=unit)
    else:
        reader.add_match(_SYSTEMD_SLICE=slice_name)


def _instance_check(unit):
    """For a template: a test that an entry's _SYSTEMD_UNIT is one of its
    instances (another unit can be put in the slice with Slice=); else None."""
    if template_slice(unit) is None:
        return None
    prefix = unit[:-len("service")]     # `ssh@.`: instances are `ssh@INSTANCE.service`
    head, tail = prefix[:-1].encode(), b".service"

    def is_instance(reader):
        try:
            name = reader._get("_SYSTEMD_UNIT")
        except KeyError:
            return False
        if isinstance(name, str):
            name = name.encode()
        return (name.startswith(head) and name.endswith(tail)
                and len(name) > len(head) + len(tail))
    return is_instance


class JournalFollower:
    """Returns new entries of one unit as (message bytes, Unix time, prefix text).

    prefix is `IDENTIFIER[PID]: `, for fail2ban filters that key connections
    by process. Call commit() after handling what read_entries() returned.
    """

    def __init__(self, unit, positions, directory=None, on_change=None, queue_position=None):
        if not JOURNAL_UNIT.match(unit):
            raise InputError(f"{unit!r} is not a systemd unit name (like caddy.service)",
                             key="bans.logs.journal")
        self.unit = unit
        self.directory = directory
        self.key = position_key(unit)
        self._positions = positions
        self._queue_position = queue_position
        self._on_change = on_change
        self.batch = BATCH_ENTRIES
        self.with_prefix = True    # `IDENTIFIER[PID]: ` for fail2ban filters
        self._journal = _journal_module()
        self._is_instance = _instance_check(unit)
        self.reader = self._open()
        self.cursor = None
        self._committed = None     # the cursor last handed to commit()
        self._unread_current = False
        self._entries = 0
        self._oversized = 0
        self._error = None
        self._resume(positions.load(self.key))
        self._stopping = threading.Event()
        self._waiter = None
        if on_change is not None:
            self._waiter = threading.Thread(target=self._wait_loop, args=(on_change,),
                                            name=f"policyd-journal-{unit}", daemon=True)
            self._waiter.start()

    def _open(self):
        try:
            reader = (self._journal.Reader(path=self.directory) if self.directory
                      else self._journal.Reader())
        except OSError as error:
            raise InputError(f"cannot open the journal: {error}",
                             file=self.directory, key="bans.logs.journal") from None
        _match_unit(reader, self.unit)
        # sd-journal watches the directory (new files after a rotation, removed
        # ones after a vacuum) only once its inotify descriptor exists.
        reader.fileno()
        return reader

    def _resume(self, saved):
        cursor = saved.get("cursor") if isinstance(saved, dict) else None
        reader = self.reader
        if isinstance(cursor, str) and cursor:
            try:
                reader.seek_cursor(cursor)
            except (OSError, ValueError):
                cursor = None
            else:
                # Seeking lands on the saved entry if it still exists (already
                # handled: skip it), else on the next one (not handled yet).
                # (Stepping back with previous() would lose an entry.)
                self._unread_current = reader._next() and not reader.test_cursor(cursor)
                self.cursor = self._committed = cursor
                return
        # First start: only what is written from now on counts. With no entry of
        # the unit yet, everything that comes is new: start at the head.
        reader.seek_tail()
        if reader._previous():
            self.cursor = reader._get_cursor()
        else:
            reader.seek_head()
        if self.cursor is not None:
            self._positions.save(self.key, {"cursor": self.cursor})
            self._committed = self.cursor

    def read_entries(self):
        """The new entries of the unit since the last call, at most self.batch; with
        more waiting, the caller is woken again at once."""
        reader = self.reader
        limit = self.batch
        entries = []
        scanned = 0
        self._error = None
        try:
            reader.process()   # picks up new and removed (rotated, vacuumed) files
            is_instance = self._is_instance
            if self._unread_current:
                self._unread_current = False
                if is_instance is None or is_instance(reader):
                    entries.append(self._entry(reader))
            while scanned < limit and reader._next():
                scanned += 1
                if is_instance is None or is_instance(reader):
                    entries.append(self._entry(reader))
        except OSError as error:
            self._error = str(error)
        if scanned or entries:
            try:
                self.cursor = reader._get_cursor()   # the last entry read
            except OSError as error:
                self._error = str(error)
        self._entries += len(entries)
        if scanned >= limit and self._on_change is not None:
            self._on_change(self.key)
        return entries

    def _entry(self, reader):
        try:
            message = reader._get("MESSAGE")
        except KeyError:
            message = b""
        if isinstance(message, str):
            message = message.encode("utf-8", "surrogateescape")
        when = reader._get_realtime() / 1e6
        if len(message) > MAX_LINE_BYTES:
            self._oversized += 1
            message = b"\x00"   # classified MALFORMED by every filter
        return message, when, self._prefix(reader) if self.with_prefix else ""

    @staticmethod
    def _prefix(reader):
        fields = []
        for name in ("SYSLOG_IDENTIFIER", "_COMM", "_PID"):
            try:
                value = reader._get(name)
            except KeyError:
                value = None
            fields.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
        identifier = fields[0] or fields[1] or "-"
        return f"{identifier}[{fields[2]}]: " if fields[2] else f"{identifier}: "

    def commit(self):
        """Queue the cursor after the entries returned so far (written with the failures)."""
        if self.cursor is None or self.cursor == self._committed:
            return
        self._committed = self.cursor
        position = {"cursor": self.cursor}
        if self._queue_position is not None:
            self._queue_position(self.key, position)
        else:
            self._positions.save(self.key, position)

    @property
    def stats(self):
        return {"path": self.key, "journal": self.unit, "directory": self.directory,
                "exists": True, "cursor": self.cursor, "lines": self._entries,
                "oversized": self._oversized, "rotations": 0, "error": self._error}

    def _wait_loop(self, on_change):
        # A reader of its own: python3-systemd readers are not thread-safe.
        try:
            waiter = self._open()
            waiter.seek_tail()
        except InputError as error:
            log.error("journal wake-up disabled for %s: %s", self.unit, error)
            return
        try:
            while not self._stopping.is_set():
                if waiter.wait(WAIT_SECONDS) != self._journal.NOP:
                    on_change(self.key)
        finally:
            waiter.close()

    def close(self):
        self._stopping.set()
        if self._waiter is not None:
            self._waiter.join(timeout=WAIT_SECONDS * 3)
        self.reader.close()


class JournalSource:
    """A `journal: UNIT` entry of bans.logs: its follower, its filter, its counters."""

    kind = "journal"
    broken = None

    def __init__(self, config, positions, on_change=None, queue_position=None):
        from policyd.logs.filters import load_filter
        self.path = config.label
        self.filter_name = config.filter
        self.filter = load_filter(config.filter, mode=config.mode, journal=True)
        # fail2ban filters see `IDENTIFIER[PID]: MESSAGE` (their journal line
        # prefix, which sshd's connection cache keys on); native ones the MESSAGE.
        self.timed = getattr(self.filter, "classify_timed", None)
        self.follower = JournalFollower(config.journal, positions, config.journal_dir,
                                        on_change, queue_position)
        self.follower.with_prefix = self.timed is not None
        self.matched = 0
        self.malformed = 0

    def read(self):
        """[(outcome, Unix time of the entry)] for every new entry."""
        results = []
        for message, when, prefix in self.follower.read_entries():
            if b"\n" in message.rstrip(b"\n"):
                # One entry, several lines: a line in it could pose as a whole
                # entry of its own. Never a failure.
                results.append((Outcome.MALFORMED, when))
            elif self.timed is not None:
                results.append((self.timed(prefix.encode() + message, when=when)[0], when))
            else:
                results.append((self.filter.classify(message), when))
        return results

    def close(self):
        self.follower.close()

    def stats(self):
        # A journal entry is one record: no request can write another into it.
        return dict(self.follower.stats, filter=self.filter.name, matched=self.matched,
                    malformed=self.malformed, forged=0)


def probe(unit, directory=None):
    """What `policyd doctor` reports about a journal source: a dict with
    readable (bool), error (str or None), entries (bool), last (Unix time or None)."""
    try:
        journal = _journal_module()
        reader = journal.Reader(path=directory) if directory else journal.Reader()
    except (InputError, OSError) as error:
        return {"readable": False, "error": str(error), "entries": False, "last": None}
    try:
        if not reader.get_usage():
            return {"readable": False, "entries": False, "last": None,
                    "error": "no journal files can be read there"}
        _match_unit(reader, unit)
        reader.seek_tail()
        if reader._previous():
            return {"readable": True, "error": None, "entries": True,
                    "last": reader._get_realtime() / 1e6}
        return {"readable": True, "error": None, "entries": False, "last": None}
    except OSError as error:
        return {"readable": False, "error": str(error), "entries": False, "last": None}
    finally:
        reader.close()
