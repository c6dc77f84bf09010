"""The daemon's state writes, on a thread and an SQLite connection of their own.

Owns running prepared batches of rows (bans.py prepares them on the main
thread) as one transaction each, in order, and reporting each one done. SQLite
does its page work without the GIL, so the ban path keeps running meanwhile: a
flood's 100k bans cost ~40 ms per 1000 rows of random B-tree pages. A batch
that fails (disk full) is retried, before any later one, until it is written.
"""
import logging
import queue
import sqlite3
import threading
import time

from policyd.banning.state import State

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


class StateWriter:
    """submit(token, rows) queues a batch; collect() returns the tokens written since."""

    def __init__(self, path, wake=None):
        self.path = path
        self._wake = wake
        self._batches = queue.Queue()
        self._written = queue.Queue()
        self._queued = 0  # submitted and not yet collected; main thread only
        self.failing = False
        self._thread = None
        self._stopping = threading.Event()

    def start(self):
        self._thread = threading.Thread(target=self._work, name="policyd-state", daemon=True)
        self._thread.start()

    def stop(self, timeout=60.0):
        """Write what is queued (a failing batch gets until `timeout`), then end."""
        if self._thread is None:
            return
        self._batches.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stopping.set()  # give up retrying; bans.py writes the rest itself
            self._thread.join()
        self._thread = None

    def submit(self, token, rows):
        self._queued += 1
        self._batches.put((token, rows))

    def wait(self, timeout=10.0):
        """Until every batch submitted so far is written; False if `timeout` passed
        first (a failing disk: the batches stay queued and are retried)."""
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._batches.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def queued(self):
        """Batches submitted whose completion was not collected yet."""
        return self._queued

    def collect(self):
        """Tokens of the batches written since the last call, in order."""
        done = []
        while True:
            try:
                done.append(self._written.get_nowait())
            except queue.Empty:
                break
        self._queued -= len(done)
        return done

    def _work(self):
        state = State(self.path)
        try:
            while True:
                item = self._batches.get()
                try:
                    if item is None:
                        return
                    token, rows = item
                    if callable(rows):
                        rows = rows()  # made here, off the ban path, once for every retry
                    while not self._write(state, rows):
                        if self._stopping.wait(RETRY_SECONDS):
                            return
                    self._written.put(token)
                finally:
                    self._batches.task_done()
                if self._wake is not None:
                    self._wake()
        finally:
            state.close()

    def _write(self, state, rows):
        try:
            write_rows(state, rows)
        except (sqlite3.Error, OSError) as error:  # disk full, read-only, locked
            if not self.failing:
                log.error("could not write ban state to %s, retrying every %gs: %s",
                          state.path, RETRY_SECONDS, error)
            self.failing = True
            return False
        self.failing = False
        return True


def write_rows(state, rows):
    """One transaction of prepared rows: {"delete_bans", "upsert_bans", "upsert_history",
    "add_failures": lists, "prune_before": time or None, "positions": [(path, position)]},
    or a callable that makes them (policyd.banning.banqueue hands those over)."""
    if callable(rows):
        rows = rows()
    with state.transaction() as writer:
        writer.delete_bans(rows.get("delete_bans", ()))
        writer.upsert_bans(rows.get("upsert_bans", ()))
        writer.upsert_history(rows.get("upsert_history", ()))
        writer.add_failures(rows.get("add_failures", ()))
        if rows.get("prune_before") is not None:
            writer.prune_failures(rows["prune_before"])
        for path, position in rows.get("positions", ()):
            writer.save_position(path, position)


class QueuedPositions:
    """The daemon's PositionStore (policyd.logs.tail): a saved position is queued with
    the ban state (BanManager.queue_position) and written in the same transaction
    as the last failures read before it, so a crash can neither skip a line whose
    failures were lost nor count a line's failures twice."""

    def __init__(self, state, queue_position):
        self.state = state
        self._queue = queue_position

    def load(self, path):
        return self.state.load_position(path)

    def save(self, path, position):
        self._queue(path, position)
