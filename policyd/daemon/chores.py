"""The daemon's heavy policy work, off the ban path: parsing, compiling, libnftables.

Owns one background thread with its own libnftables context. It runs jobs and
hands each result back; the main thread alone changes the daemon's state, by
running the completions in collect(). A job never touches the daemon's objects:
it gets what it needs as arguments and returns what it found.
"""
import ctypes
import gc
import logging
import queue
import threading
import time

from policyd.kernel import trial
from policyd.rules.compile import compile_policy

log = logging.getLogger(__name__)

# Objects a job may leave in the youngest generation and still be collected
# as usual afterwards (a collection of that many takes a few ms); past it,
# they are frozen rather than walked on the ban path.
FREEZE_AFTER_OBJECTS = 50000


def give_back_memory():
    """Hand freed heap back to the system. A reload's parse, compile and libnftables
    cache of 100k networks leave ~200 MB free in the worker's malloc arena, a flood
    tens of MB in the main one; glibc keeps them unless asked (malloc_trim)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to ask


class Chores:
    """submit(kind, job, done): job(nft) runs on the worker, done(result, error)
    later on the thread that calls collect(). One job of a kind at a time."""

    def __init__(self, make_nft, wake=None):
        self._make_nft = make_nft
        self._wake = wake
        self._jobs = queue.Queue()
        self._results = queue.Queue()
        self._pending = set()  # kinds queued or running; main thread only
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._work, name="policyd-chores", daemon=True)
        self._thread.start()

    def stop(self, timeout=60.0):
        """Let the job in hand finish (a half-done libnftables load is not a thing:
        each is one transaction), drop the queued ones."""
        if self._thread is None:
            return
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, kind, job, done):
        """Queue job unless one of this kind is queued or running; True if queued."""
        if kind in self._pending:
            return False
        self._pending.add(kind)
        self._jobs.put((kind, job, done))
        return True

    def pending(self, kind):
        return kind in self._pending

    def collect(self):
        """Run the completions of finished jobs here; how many ran."""
        ran = 0
        while True:
            try:
                kind, done, result, error = self._results.get_nowait()
            except queue.Empty:
                return ran
            self._pending.discard(kind)
            done(result, error)
            ran += 1

    def _work(self):
        while True:
            item = self._jobs.get()
            if item is None:
                return
            kind, job, done = item
            nft = None
            # No cyclic collection while a job runs: a collection holds the GIL while
            # it walks every young object, and a reload makes a million of them
            # (30-270 ms in which no ban could run). What a big job leaves alive is
            # frozen out of later collections instead (as Daemon._adopt does).
            collecting = gc.isenabled()
            gc.disable()
            try:
                # A context per job: libnftables keeps the cache of its last command
                # (every element of a 100k-network set, ~200 MB) until it is freed.
                nft = self._make_nft()
                result, error = job(nft), None
            except Exception as exc:  # handed to the main thread, which logs and counts it
                result, error = None, exc
            finally:
                if nft is not None and hasattr(nft, "close"):
                    nft.close()
                del nft
                if gc.get_count()[0] > FREEZE_AFTER_OBJECTS:
                    gc.freeze()  # a big job's survivors: never walked, freed by refcount
                if collecting:
                    gc.enable()
                give_back_memory()
            self._results.put((kind, done, result, error))
            if self._wake is not None:
                self._wake()


class PolicyUpkeep:
    """The jobs the daemon gives its worker: take the committed policy again, and
    the policy half of housekeeping. Keeps the tables' expected shapes, which
    only the worker reads, so comparing them costs a compile once per policy."""

    def __init__(self, store, clock=time.time):
        self.store = store
        self.clock = clock
        self._expected_key = None
        self._expected = {}

    def reload(self, nft, load_kernel, current=None, held=None):
        """(committed Policy or None, whether it was loaded into the kernel).

        With `current` (the policy the kernel has) and `held()` ({set name: (key
        length, intervals)}: what its interval sets hold), a policy whose chains
        and rules are unchanged goes in as one transaction of only the elements
        that differ (Nft.load_changes); else, or if that fails, whole."""
        committed = self.store.committed()
        if committed is None:
            return None, False
        if load_kernel and self.store.pending() is None:
            ruleset = compile_policy(committed)
            changes = getattr(nft, "load_changes", None)
            if (changes is None or current is None or current.table != committed.table
                    or not changes(ruleset, compile_policy(current), committed.table,
                                   held() if held else {})):
                nft.load(ruleset.document())
            return committed, True
        return committed, False

    def check(self, nft, policy, elements_drifted=False, bans_in_force=None):
        """{"committed": a newer committed Policy, "rolled_back": a trial past its
        deadline was ended, "restored_ms": the tables were gone or edited (or
        elements_drifted: the element watch, policyd.kernel.drift, saw a guard set's
        elements differ) and the committed policy is back, with bans_in_force() in
        its transaction (the caller then adds the bans made since), "trial_active":
        whether a trial runs now (for the metrics)}."""
        found = {}
        meta = self.store.meta()
        if meta and meta.get("sha256") != policy.digest:
            found["committed"] = policy = self.store.committed() or policy
        found["rolled_back"] = trial.enforce(nft, self.store, now=self.clock())
        if elements_drifted or self._drifted(nft, policy):
            with self.store.locked(wait=False) as got:
                # A CLI apply holds the lock while it changes the kernel: look again later.
                if got and (elements_drifted or self._drifted(nft, policy)):
                    started = time.perf_counter()
                    trial.restore_committed_locked(nft, self.store, bans_in_force)
                    found["restored_ms"] = round((time.perf_counter() - started) * 1000, 1)
        found["trial_active"] = self.store.pending() is not None
        return found

    def _drifted(self, nft, policy):
        """Chains, rule counts and set names over netlink (well under a millisecond,
        whatever the allowlist's size) against what the policy loads."""
        pending = self.store.pending()
        key = (policy.digest, pending and pending.sha256)
        if key != self._expected_key:
            ruleset = (compile_policy(policy, pending.policy(), pending.seconds)
                       if pending else compile_policy(policy))
            self._expected = {table: ruleset.skeleton(table)
                              for table in (policy.table, policy.bans_table)}
            self._expected_key = key
        return any(nft.skeleton(table) != shape for table, shape in self._expected.items())
