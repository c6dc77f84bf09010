"""The daemon: wires logs -> filters -> bans -> kernel, and keeps the kernel converged.

One main thread owns every piece of state. Wake-ups (inotify), control
requests, signals and the worker's results (policyd.daemon.chores: parsing,
compiling, libnftables) only post to it, so nothing here needs a lock, and
no reload or drift repair stands between a log line and its ban.
"""
import gc
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

from policyd import __version__, systemd
from policyd.fleet import node as fleet
from policyd.kernel import drift
from policyd.operator import control, control_server, metrics
from policyd.policy import lists, store as policystore
from policyd.banning.bans import BanManager
from policyd.daemon.chores import Chores, PolicyUpkeep, give_back_memory
from policyd.errors import KernelError, PolicydError
from policyd.kernel.listsync import ListSync
from policyd.kernel.nft import BanTable, Nft
from policyd.banning.banlog import BanLog
from policyd.banning.state import STATE_FILE, State
from policyd.logfmt import kv
from policyd.banning.statewriter import QueuedPositions, StateWriter

from policyd.daemon.control import ControlAnswers
from policyd.daemon.logs import LogReading
from policyd.daemon.policy import PolicyKeeping

log = logging.getLogger(__name__)

# How often the main loop looks at the kernel and the clock when no log moves.
HOUSEKEEPING_SECONDS = 0.5
# A full comparison of kernel bans against state costs a set listing; rare.
RECONCILE_SECONDS = 300
# Bans reach the kernel at once; state (bans, failures, then the log positions
# they cover) is written at most this often while logs keep coming, at most
# STATE_CHUNK_ROWS rows per transaction and per turn of the loop, so that a
# flood's 100k bans are written between slices of lines, never in one stall.
# The writer's thread makes and writes the rows; SQLite pays per page a
# transaction touches, and random keys spread rows over pages, so 5000 rows
# cost 40% less CPU than five transactions of 1000.
STATE_WRITE_SECONDS = 0.25
STATE_CHUNK_ROWS = 5000
# Batches handed to the state writer and not yet written, at most: beyond,
# rows wait in the ban manager's queues (less memory than prepared rows).
STATE_BATCHES_QUEUED = 3
# While the worker parses or compiles (pure Python), the main thread gets the
# GIL back after this long at most, each time it returns from a system call:
# the default 5 ms, paid on each of a ban's dozen calls, would be 50 ms.
GIL_SWITCH_SECONDS = 0.0005
# The cyclic garbage collector stops every thread while it walks all objects:
# with a 100k-network policy in memory that is 50-100 ms, many times during
# a reload. Collections are made rarer, and what start-up and each adopted
# policy leave in memory is frozen out of them (gc.freeze).
GC_THRESHOLDS = (10000, 20, 100)


class Daemon(LogReading, PolicyKeeping, ControlAnswers):
    """policyd run: start() takes the kernel and the logs in hand, run() loops, stop() lets go."""

    def __init__(self, policy_path, state_dir, run_dir, metrics_listen=None, clock=time.time):
        self.policy_path = os.path.abspath(policy_path)
        self.state_dir = Path(state_dir)
        self.run_dir = Path(run_dir)
        self.metrics_listen = metrics_listen
        self.clock = clock
        self.wake = threading.Event()
        self.calls = control_server.MainLoopCall(self._handle, wake=self.wake.set)
        self.stopping = False
        self.reload_requested = False
        self.started_at = clock()
        self.registry = metrics.new_registry()
        self.metrics = metrics.standard_metrics(self.registry)
        self.held_back = None  # why nothing is enforced yet, or None
        self.tables_gone = False  # at start: the committed policy waits for its bans
        self.trial_active = False  # as the worker's last housekeeping found
        self.problems = {}  # what failed -> why, until it works again (status)
        self.bans = None
        self.sources = []
        self.watcher = None
        self.control = None
        self.metrics_server = None
        self.fleet = None
        self.next_reconcile = 0.0
        self.next_state_write = 0.0
        self.backlog = False
        self.chores = None
        self.state_writer = None
        self.state = None
        self.kernel_features = None
        self.lists = None           # the list files' follower (policyd.kernel.listsync)
        self.elements = None        # the guard sets' element watch (policyd.kernel.drift)
        self._sets_key = self._sets = None
        self._reload_again = None   # (load_kernel, replies) asked for while one ran
        self.ban_log = BanLog()

    def start(self):
        lists.keep_last_good = True  # a list turning bad at runtime must not stop us
        lists.parse_in_child = True  # 100k lines parsed here would hold the bans up
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = policystore.PolicyStore(self.state_dir)
        # The first start's lint forks: before any thread of ours runs.
        first_lint = self._first_start_lint()
        # The control socket next: a second daemon on this run dir must refuse
        # before it touches the kernel, the bans or the state file.
        self.control = control_server.ControlServer(control.socket_path(self.run_dir), self._control)
        self.control.start()
        if self.metrics_listen:
            self.metrics_server = metrics.MetricsServer(self.metrics_listen, self.registry)
            self.metrics_server.start()
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        gc.set_threshold(*GC_THRESHOLDS)
        self.nft = Nft()
        self.kernel_features = self.nft.features()
        log.info("kernel %s", kv(**self.kernel_features))
        self.upkeep = PolicyUpkeep(self.store, clock=self.clock)
        self.chores = Chores(Nft, wake=self.wake.set)
        self.chores.start()
        self.policy = self._committed_or_first_policy(first_lint)
        if self.policy is None:
            systemd.notify("READY=1", f"STATUS={self._status_line()}")
            return
        try:
            self._start_enforcing()
        except BaseException:
            if self.tables_gone:  # no bans to read (a damaged state file): the policy all the same
                self._restore_tables()
            raise
        self._warn_if_file_differs()
        gc.freeze()
        systemd.notify("READY=1", f"STATUS={self._status_line()}")

    def _start_enforcing(self):
        """The committed policy is in the kernel: restore its bans and follow its logs."""
        self.state = State(self.state_dir / STATE_FILE)
        self.state_writer = StateWriter(self.state.path, wake=self.wake.set)
        self.state_writer.start()
        self.bans = BanManager(self.policy.bans, self.state, self._ban_table(self.policy),
                               writer=self.state_writer)
        self.positions = QueuedPositions(self.state, self.bans.queue_position)
        restored = self.bans.restore(with_tables=self._restore_tables if self.tables_gone else None)
        # restore() just put every ban in: the first full comparison can wait.
        self.next_reconcile = self.clock() + RECONCILE_SECONDS
        self._follow(self.policy)
        self.lists = ListSync(self.nft, self.policy, self.wake.set, self._reload,
                              submit=self.chores.submit)
        self.elements = drift.ElementWatch(self.policy.table, self._expected_sets, self.wake.set,
                                           epoch=self._kernel_epoch)
        self.elements.start()
        self._start_fleet()  # catches up with the other nodes before READY
        self.held_back = None
        source = (self.store.meta() or {}).get("source", self.policy.source)
        log.info("started %s", kv(version=__version__, policy=source,
                                  sha256=self.policy.digest[:12], bans=restored,
                                  logs=len(self.sources)))

    def _stop_enforcing(self):
        """Undo a _start_enforcing() that failed half way: still held back."""
        if self.state_writer is not None:
            self.state_writer.stop()
            self.state_writer = None
        self.bans = None
        if self.state is not None:
            self.state.close()
            self.state = None

    def _start_fleet(self):
        if self.policy.fleet is not None:
            self.fleet = fleet.Fleet(self.policy.fleet, self.state, self.bans, self.registry,
                                     wake=self.wake.set, clock=self.clock)
            if self.fleet.start():
                self._flush()

    def _ban_table(self, policy):
        return BanTable(self.nft, policy.bans_table, policy.bans.ipv6_prefix)

    def stop(self):
        """Stop following and serving; every table and ban stays in the kernel."""
        systemd.notify("STOPPING=1")
        for closer in (self.watcher and self.watcher.stop, self.lists and self.lists.stop,
                       self.elements and self.elements.stop,
                       self.control and self.control.stop,
                       self.metrics_server and self.metrics_server.stop,
                       self.fleet and self.fleet.stop,
                       self.chores and self.chores.stop):
            if closer:
                closer()
        if self.bans is None:
            log.info("stopped %s", kv(enforcing="no"))
            return
        self._flush(write_state=False)
        self.ban_log.flush()  # a flood's last summary
        self.state_writer.stop()  # writes what it was given
        self.bans.state_written(self.state_writer.collect())
        self.bans.writer = None
        for source in self.sources:
            if source.follower:
                source.follower.commit()  # queued: one transaction with the last state
                source.close()
        self.bans.flush()
        self.state.close()
        self._leave_listing()
        log.info("stopped %s", kv(bans=self.bans.active_count))

    def _leave_listing(self):
        """The state file's ban listing, written for `policyd bans` while no daemon
        runs (policyd.operator.banstate): read as that command reads it, so that
        the first listing after a stop is as quick as the next."""
        from policyd.operator import banstate
        started = time.perf_counter()
        try:
            banstate.from_state(self.state_dir, self.clock())
        except (PolicydError, OSError, sqlite3.Error) as exc:
            log.warning("ban listing not written: %s", exc)
            return
        log.debug("ban listing written %s", kv(ms=round((time.perf_counter() - started) * 1000)))

    def run(self):
        watchdog = systemd.watchdog_interval()
        next_housekeeping = next_watchdog = 0.0
        while not self.stopping:
            if not self.backlog:
                pause = HOUSEKEEPING_SECONDS
                if (self.bans is not None and self.bans.state_pending()
                        and not self._writer_busy()):
                    # The rest of a flood's state, piece by piece (a full writer wakes us).
                    pause = min(pause, max(0.0, self.next_state_write - time.monotonic()))
                pause = self._until_held_failures_are_due(pause)
                self.wake.wait(pause)
            self.wake.clear()
            if self.bans is not None:
                backlog = self._read_logs()
                if backlog != self.backlog:
                    self._collect_garbage_after(flood_over=not backlog)
                    self.ban_log.flush()
                self.backlog = backlog
                if self.fleet is not None and self.fleet.pump():
                    self._flush()
                if self.lists.changed:
                    self.lists.sync()
                if self.state_writer is not None:
                    self.bans.state_written(self.state_writer.collect())
            self.chores.collect()
            self.calls.run_pending()
            now = time.monotonic()
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                self._housekeeping()
            if watchdog and now >= next_watchdog:
                next_watchdog = now + watchdog
                systemd.notify("WATCHDOG=1")

    def _read_logs(self):
        """One slice of new lines from every log, their bans pushed to the kernel;
        True if a log has more lines waiting (the loop comes back at once)."""
        backlog = False
        for source in self.sources:
            if source.broken:
                continue
            started = time.perf_counter()
            if source.kind == "journal":
                failures = self._journal_failures(source)
            else:
                failures, more = self._file_failures(source)
                backlog = backlog or more
            if failures:
                bans = self.bans.record_failures(failures)
                if bans:
                    self._flush(write_state=False)
                    self.metrics.ban_latency.observe(time.perf_counter() - started)
                    self.metrics.bans.labels(reason="auto").inc(len(bans))
                    self.ban_log.record(bans)
                    if self.fleet is not None:
                        for ban in bans:
                            self.fleet.publish_ban(ban)
                        self.fleet.commit()
            if source.kind == "journal":
                source.follower.commit()  # queued with the failures just counted
        self._save()
        return backlog

    @staticmethod
    def _collect_garbage_after(flood_over):
        """No cyclic GC while a backlog of lines is read: each collection walked the
        flood's fresh bans again (80 ms), between two bans. After it, what the flood
        left is frozen out of later collections (it is mostly bans, alive for hours)."""
        if flood_over:
            gc.freeze()
            gc.enable()
            give_back_memory()
        else:
            gc.disable()

    def _save(self):
        """Push queued bans to the kernel; when due, write one piece of queued state,
        and once none is left, the log positions it covers (so a crash re-reads
        lines whose failures were not written, never skips them)."""
        self._flush(write_state=False)
        now = time.monotonic()
        if now < self.next_state_write or self._writer_busy():
            return
        for source in self.sources:
            if source.kind == "file":
                source.follower.commit()  # queued: written with the last piece of state
        # In a backlog, the kernel first: state (within bounds) once it is read.
        written = self.bans.write_state(STATE_CHUNK_ROWS, backlog=self.backlog)
        if not self.bans.state_pending():
            self.next_state_write = now + STATE_WRITE_SECONDS
        elif not written:
            self.next_state_write = now + STATE_WRITE_SECONDS  # a write error: retry later

    def _writer_busy(self):
        """Enough batches wait for the state writer (without one, writes are synchronous)."""
        return self.state_writer is not None and self.state_writer.queued() >= STATE_BATCHES_QUEUED

    def _write_everything(self):
        """All queued state, then the positions it covers, written now (waits)."""
        self._flush(write_state=False)
        for source in self.sources:
            if source.follower:
                source.follower.commit()
        while self.bans.state_pending() and self.bans.write_state():
            pass
        if self.state_writer is not None:
            self.state_writer.wait()
            self.bans.state_written(self.state_writer.collect())

    def _flush(self, write_state=True):
        try:
            self.bans.flush(write_state)
        except (KernelError, OSError) as exc:
            self.metrics.kernel_errors.inc()
            log.error("kernel refused bans %s", kv(error=exc))

    def _housekeeping(self):
        """Never dies on what an operator can fix (a damaged state file, a full disk,
        a refusing kernel): the kernel keeps enforcing what it has, the log and
        `policyd status` say what is wrong, and the next turn tries again."""
        try:
            self._housekeeping_turn()
        except Exception as exc:  # noqa: BLE001 - see above; a bug is logged with its trace
            self._trouble("housekeeping", exc)
        else:
            self.problems.pop("housekeeping", None)
        self._publish_metrics()
        systemd.notify(f"STATUS={self._status_line()}")

    def _trouble(self, what, error):
        """Log `error` as one line, count it, and keep it for status until it clears."""
        if isinstance(error, (KernelError, OSError)):
            self.metrics.kernel_errors.inc()
        expected = isinstance(error, (PolicydError, OSError, sqlite3.Error))
        log.error("%s failed %s", what, kv(error=error), exc_info=not expected)
        self.problems[what] = str(error) or type(error).__name__

    def _housekeeping_turn(self):
        if self.bans is None:
            self._take_first_commit()
            return
        self._save()  # also retries a batch the kernel refused before; cheap when empty
        self.ban_log.flush(due_only=True)  # a summary of the last second's bans
        # The policy half (a newer committed policy, a trial's deadline, tables
        # gone or edited) runs on the worker; _upkept() takes its findings.
        policy = self.policy
        elements_drifted = self.elements.drifted  # the element watch's verdict, read here
        bans_in_force = self.bans.in_force_now  # read on the worker, from a snapshot
        self.chores.submit("upkeep", lambda nft: self._upkeep_job(nft, policy, elements_drifted,
                                                                   bans_in_force),
                           self._upkept)
        try:
            for ban in self.bans.expire(write_state=False):  # _save() writes it
                log.info("unban %s", kv(addr=ban.network, reason="expired"))
            if self.clock() >= self.next_reconcile:
                self.next_reconcile = self.clock() + RECONCILE_SECONDS
                readded = self.bans.reconcile()
                if readded:
                    log.warning("kernel lacked bans %s", kv(readded=readded))
        except (KernelError, OSError) as exc:
            self._trouble("housekeeping", exc)


def signal_handlers(daemon):
    """{signal number: handler}: SIGTERM and SIGINT stop the loop, SIGHUP reloads.

    A handler runs on the main thread between two bytecodes, possibly inside
    wake.wait() while that thread holds the Event's lock: wake.set() there would
    wait for its own thread forever. A short thread sets it once the lock is free."""
    def wake():
        threading.Thread(target=daemon.wake.set, name="policyd-signal", daemon=True).start()

    def stop(_signum, _frame):
        daemon.stopping = True
        wake()

    def reload(_signum, _frame):
        daemon.reload_requested = True
        wake()

    return {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload}


def run(policy_path, state_dir, run_dir, metrics_listen=None):
    """`policyd run`: start, loop until SIGTERM/SIGINT, stop; SIGHUP reloads."""
    daemon = Daemon(policy_path, state_dir, run_dir, metrics_listen)
    for signum, handler in signal_handlers(daemon).items():
        signal.signal(signum, handler)
    daemon.start()
    try:
        daemon.run()
    finally:
        daemon.stop()
