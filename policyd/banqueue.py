"""The ban manager's write queue to state: bans started and ended, escalation
history, failures of the window, the prune of old failures and the log
positions they cover, written in bounded transactions, in order, by the state
writer's thread (policyd.statewriter) or, without one, at once.
"""
import itertools
import logging
import sqlite3

from .statewriter import write_rows

log = logging.getLogger(__name__)


class StateQueue:
    """What the next state write must hold. Keys are the ban manager's network keys;
    its `blob` and `text` (policyd.bans) turn one into the row's key and network."""

    def __init__(self, state, writer, blob, text):
        self.state = state
        self._blob, self._text = blob, text
        # A policyd.statewriter.StateWriter, or None to write in the caller's thread.
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

    def write(self, max_rows=None):
        """Persist queued changes in one transaction, at most about max_rows rows of
        them (None: all); returns the rows handed over. With a writer the
        transaction runs on its thread (written() hears of it); without, here,
        and on a write error the rows go back to the queue: the kernel is still
        served, enforcement matters more.

        A flood queues 100k bans: written in bounded pieces between slices of
        log lines, no single transaction holds up the next ban for long."""
        _blob, _text = self._blob, self._text
        if not self.pending():
            return 0
        budget = max_rows
        deletes = list(itertools.islice(self.delete, budget))
        budget = None if budget is None else max(0, budget - len(deletes))
        upserts = list(itertools.islice(self.upsert.items(), budget))
        budget = None if budget is None else max(0, budget - len(upserts))
        history = list(itertools.islice(self.history_unwritten.items(), budget))
        budget = None if budget is None else max(0, budget - len(history))
        failures, failure_rows = [], []
        for key, entries in self.failures.items():
            if budget is not None and len(failure_rows) >= budget:
                break
            failures.append((key, entries))
            blob = _blob(key)
            failure_rows.extend((blob, when, filter_name) for when, filter_name in entries)
        rows = {
            "delete_bans": [_blob(key) for key in deletes],
            "upsert_bans": [(_blob(key), _text(key), key[0], banned_at, expires_at, count, name, reason)
                            for key, (expires_at, count, name, reason, banned_at) in upserts],
            "upsert_history": [(_blob(key), *entry) for key, entry in history],
            "add_failures": failure_rows,
            "prune_before": self.prune_before,
        }
        self.delete.difference_update(deletes)
        for key, _entry in upserts:
            del self.upsert[key]
        for key, _entry in history:
            del self.history_unwritten[key]
        for key, _entries in failures:
            del self.failures[key]
        self.prune_before = None
        positions = []
        if not (self.upsert or self.delete or self.history_unwritten or self.failures):
            # The last piece: the positions go with it, so a position is never
            # written before the failures read up to it (batches are written in order).
            positions = list(self.positions.items())
            self.positions.clear()
        rows["positions"] = positions
        handed = len(deletes) + len(upserts) + len(history) + len(failure_rows) or 1
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
            self.prune_before = rows["prune_before"]
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
