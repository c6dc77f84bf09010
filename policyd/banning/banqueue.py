"""The ban manager's write queues: to the kernel (ban elements added and removed,
one add and one remove call per flush), and to state (bans started and ended,
escalation history, failures of the window, the prune of old failures and the
log positions they cover), written in bounded transactions, in order, by the
state writer's thread (policyd.banning.statewriter) or, without one, at once.
"""
import itertools
import logging
import sqlite3

from policyd.banning.bankeys import blob, network, sample, text, timeout
from policyd.errors import KernelError
from policyd.banning.historyfilter import HistoryFilter
from policyd.banning.statewriter import write_rows

log = logging.getLogger(__name__)


# While a backlog is read, queued failures of up to this many networks, and up to
# this many ban and history rows, wait for its end (~100 bytes each).
HELD_FAILURE_KEYS = 100_000
HELD_BAN_ROWS = 200_000


class KernelQueue:
    """What the next flush must add to and remove from the kernel's ban sets. Keys
    never banned before (no element can linger in the kernel) are `fresh`: they
    need no delete-then-add to set their timeout."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.add: dict[tuple, float] = {}  # key -> expires_at
        self.fresh: set[tuple] = set()
        self.remove: dict[tuple, object] = {}  # key -> network

    def banned(self, key, expires_at, fresh):
        self.add[key] = expires_at
        if fresh:
            self.fresh.add(key)
        else:
            self.fresh.discard(key)
        if self.remove:
            self.remove.pop(key, None)

    def lifted(self, key):
        self.add.pop(key, None)
        self.remove[key] = network(key)

    def expired(self, key):
        self.add.pop(key, None)

    def added(self, keys):
        """These keys' elements are in the kernel already (a restore put them)."""
        for key in keys:
            self.add.pop(key, None)

    def clear_adds(self):
        self.add.clear()
        self.fresh.clear()

    def push(self, now):
        """Hand queued changes to the kernel: one add_ban_keys call for fresh keys, one
        replace_ban_keys for the others, one remove_bans; returns how many changes
        went. What the kernel refuses stays queued for the next flush."""
        pushed = 0
        if self.add:
            fresh, renewed, seconds_of = [], [], {}
            for key, expires_at in self.add.items():
                seconds = seconds_of.get(expires_at)
                if seconds is None:
                    if expires_at <= now:
                        continue
                    seconds = seconds_of[expires_at] = timeout(expires_at, now)
                (fresh if key in self.fresh else renewed).append((key, seconds))
            try:
                if fresh:
                    self.kernel.add_ban_keys(fresh)
                    self.fresh.clear()  # in the kernel now: a retry must replace them
                if renewed:
                    self.kernel.replace_ban_keys(renewed)
            except (KernelError, OSError) as error:
                log.error("kernel refused %d ban(s), kept queued for the next flush: %s",
                          len(fresh) + len(renewed), error)
                return pushed
            pushed += len(fresh) + len(renewed)
            self.clear_adds()
        if self.remove:
            removals = list(self.remove.values())
            try:
                self.kernel.remove_bans(removals)
            except (KernelError, OSError) as error:
                log.error("kernel refused %d unban(s), kept queued for the next flush: %s",
                          len(removals), error)
                return pushed
            pushed += len(removals)
            log.debug("unbanned %d: %s", len(removals), sample(removals))
            self.remove.clear()
        return pushed


class StateQueue:
    """What the next state write must hold. Keys are the ban manager's network keys;
    `blob` and `text` (policyd.banning.bankeys) turn one into the row's key and network."""

    def __init__(self, state, writer, blob=blob, text=text, history_ahead=False):
        self.state = state
        self._blob, self._text = blob, text
        # A policyd.banning.statewriter.StateWriter, or None to write in the caller's thread.
        self.writer = writer
        self.upsert: dict[tuple, tuple] = {}      # key -> ban entry, as BanManager keeps it
        self.delete: set[tuple] = set()
        self.failures: dict[tuple, list[tuple[float, str]]] = {}
        self.prune_before: float | None = None
        # key -> (times banned, end of the last ban), changed since the last write
        self.history_unwritten: dict[tuple, tuple[int, float]] = {}
        # Log positions (file offsets, journal cursors) written in the same
        # transaction as the failures read up to them: a crash loses both or neither.
        self.positions: dict[str, dict] = {}
        # Which keys may have history in state already (the rest need no query); for
        # a long-lived queue (the daemon's): reading it costs ~0.1 s per 100k keys.
        self.history_filter = HistoryFilter(state.path) if history_ahead else None
        self._batches = itertools.count()
        self._in_flight: dict[int, list] = {}   # batch -> its history items, until written
        self._history_in_flight: dict[tuple, tuple[int, float]] = {}

    def ban_started(self, key, entry, history):
        self.history_unwritten[key] = history
        self.upsert[key] = entry
        self.delete.discard(key)

    def ban_ended(self, key, history):
        self.history_unwritten[key] = history
        self.upsert.pop(key, None)
        self.delete.add(key)

    def history(self, key):
        """The escalation history of `key` not yet in state (queued or being written), or None."""
        return self.history_unwritten.get(key) or self._history_in_flight.get(key)

    def pending(self):
        """Whether changes wait to be written to state."""
        return bool(self.upsert or self.delete or self.history_unwritten or self.failures
                    or self.prune_before is not None or self.positions)

    def write(self, max_rows=None, backlog=False):
        """Persist queued changes in one transaction, at most about max_rows rows of
        them (None: all); returns the rows handed over. With a writer the
        transaction runs on its thread (written() hears of it), and so does making
        the rows (blobs, texts): the main thread only hands over what it queued.
        Without, here, and on a write error the rows go back to the queue: the
        kernel is still served, enforcement matters more.

        backlog (while a backlog of lines is read): the kernel first, state once
        the backlog is read. Failures wait, up to HELD_FAILURE_KEYS networks: most
        belong to networks the next lines ban, which drops them unwritten. Bans
        and history wait, up to HELD_BAN_ROWS: the writer's thread would take CPU
        and the GIL from the ban path. Positions wait with them, so a crash
        re-reads those lines (and bans again) instead of losing their failures."""
        if not self.pending():
            return 0
        hold = backlog and len(self.failures) <= HELD_FAILURE_KEYS
        if backlog and len(self.upsert) + len(self.delete) + len(self.history_unwritten) \
                <= HELD_BAN_ROWS and (hold or not self.failures):
            return 0
        budget = max_rows
        deletes = list(itertools.islice(self.delete, budget))
        budget = None if budget is None else max(0, budget - len(deletes))
        upserts = list(itertools.islice(self.upsert.items(), budget))
        budget = None if budget is None else max(0, budget - len(upserts))
        history = list(itertools.islice(self.history_unwritten.items(), budget))
        budget = None if budget is None else max(0, budget - len(history))
        failures, failure_count = [], 0
        for key, entries in () if hold else self.failures.items():
            if budget is not None and failure_count >= budget:
                break
            failures.append((key, entries))
            failure_count += len(entries)
        self.delete.difference_update(deletes)
        for key, _entry in upserts:
            del self.upsert[key]
        for key, _entry in history:
            del self.history_unwritten[key]
        for key, _entries in failures:
            del self.failures[key]
        prune_before, self.prune_before = self.prune_before, None
        if self.history_filter is not None:
            for key, _entry in history:
                self.history_filter.add(blob(key))  # before any write can hold it
        positions = []
        if not (self.upsert or self.delete or self.history_unwritten or self.failures):
            # The last piece: the positions go with it, so a position is never
            # written before the failures read up to it (batches are written in order).
            positions = list(self.positions.items())
            self.positions.clear()
        rows = _Rows(self._blob, self._text, deletes, upserts, history, failures, prune_before,
                     positions)
        handed = len(deletes) + len(upserts) + len(history) + failure_count or 1
        if self.writer is not None:
            batch = next(self._batches)
            self._in_flight[batch] = history
            self._history_in_flight.update(history)
            self.writer.submit(batch, rows)
            return handed
        try:
            write_rows(self.state, rows)
        except (sqlite3.Error, OSError) as error:  # disk full, read-only, locked
            log.error("could not write ban state to %s, will retry on the next flush: %s",
                      self.state.path, error)
            # Nothing was queued meanwhile (same thread): put it all back as it was.
            self.delete.update(deletes)
            self.upsert.update(upserts)
            self.history_unwritten.update(history)
            self.failures.update(failures)
            self.prune_before = prune_before
            for key, position in positions:
                self.positions.setdefault(key, position)
            return 0
        return handed

    def written(self, batches):
        """The writer wrote these batches (tokens of write()'s submissions)."""
        for batch in batches:
            for key, entry in self._in_flight.pop(batch, ()):
                if self._history_in_flight.get(key) is entry:
                    del self._history_in_flight[key]

    def in_flight(self):
        return bool(self._in_flight)


class _Rows:
    """One write's queued changes; called (on the writer's thread) it makes the
    rows policyd.banning.statewriter.write_rows takes."""

    __slots__ = ("_blob", "_text", "_parts")

    def __init__(self, blob, text, *parts):
        self._blob, self._text, self._parts = blob, text, parts

    def __call__(self):
        _blob, _text = self._blob, self._text
        deletes, upserts, history, failures, prune_before, positions = self._parts
        return {
            "delete_bans": [_blob(key) for key in deletes],
            "upsert_bans": [(_blob(key), _text(key), key[0], banned_at, expires_at, count, name, reason)
                            for key, (expires_at, count, name, reason, banned_at) in upserts],
            "upsert_history": [(_blob(key), *entry) for key, entry in history],
            "add_failures": [(blob, when, filter_name) for key, entries in failures
                             for blob in (_blob(key),) for when, filter_name in entries],
            "prune_before": prune_before,
            "positions": positions,
        }
