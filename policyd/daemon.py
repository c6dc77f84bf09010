"""The daemon: wires logs -> filters -> bans -> kernel, and keeps the kernel converged.

One main thread owns every piece of state. Wake-ups (inotify), control
requests, signals and the worker's results (policyd.chores: parsing,
compiling, libnftables) only post to it, so nothing here needs a lock, and
no reload or drift repair stands between a log line and its ban.
"""
import gc
import hashlib
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

from policyd import (__version__, control, drift, fleet, lists, lockout, metrics, policystore,
                     systemd, trial)
from policyd.bans import BanManager
from policyd.chores import Chores, PolicyUpkeep, give_back_memory
from policyd.compile import compile_policy
from policyd.errors import InputError, KernelError, PolicydError
from policyd.filters import Outcome
from policyd.guard import failures_from
from policyd.journal import JournalSource
from policyd.listsync import ListSync
from policyd.lists import cidr_text as network_text
from policyd.nft import BanTable, Nft
from policyd.bandesk import BanDesk
from policyd.banlog import BanLog
from policyd.sources import LogSource, UnfollowedSource
from policyd.state import STATE_FILE, State
from policyd.logfmt import kv
from policyd.statewriter import QueuedPositions, StateWriter
from policyd.logwatch import LogWatcher

log = logging.getLogger(__name__)

# How often the main loop looks at the kernel and the clock when no log moves.
HOUSEKEEPING_SECONDS = 0.5
# A full comparison of kernel bans against state costs a set listing; rare.
RECONCILE_SECONDS = 300
# Lines taken from one log per turn of the loop: a flood in one log delays the
# bans of another log, control requests and housekeeping by one slice (a few
# ms), and each slice's bans reach the kernel before the next slice is read.
READ_SLICE_LINES = 500
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
# How long a `reload` control request waits for the worker's reload.
RELOAD_REPLY_SECONDS = 60.0


class Daemon:
    """policyd run: start() takes the kernel and the logs in hand, run() loops, stop() lets go."""

    def __init__(self, policy_path, state_dir, run_dir, metrics_listen=None, clock=time.time):
        self.policy_path = os.path.abspath(policy_path)
        self.state_dir = Path(state_dir)
        self.run_dir = Path(run_dir)
        self.metrics_listen = metrics_listen
        self.clock = clock
        self.wake = threading.Event()
        self.calls = control.MainLoopCall(self._handle, wake=self.wake.set)
        self.stopping = False
        self.reload_requested = False
        self.started_at = clock()
        self.registry = metrics.new_registry()
        self.metrics = metrics.standard_metrics(self.registry)
        self.held_back = None  # why nothing is enforced yet, or None
        self.trial_active = False  # as the worker's last housekeeping found
        self.problems = {}  # what failed -> why, until it works again (status)
        self.bans = None
        self.sources = []
        self.watcher = None
        self.lists = None
        self.elements = None
        self._sets_key = self._sets = None
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
        self.lists = None           # the list files' follower (policyd.listsync)
        self.elements = None        # the guard sets' element watch (policyd.drift)
        self._sets_key = self._sets = None
        self._reload_again = None   # (load_kernel, replies) asked for while one ran
        self.ban_log = BanLog()

    # ------------------------------------------------------------ start and stop

    def start(self):
        lists.keep_last_good = True  # a list turning bad at runtime must not stop us
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = policystore.PolicyStore(self.state_dir)
        # The first start's lint forks: before any thread of ours runs.
        first_lint = self._first_start_lint()
        # The control socket next: a second daemon on this run dir must refuse
        # before it touches the kernel, the bans or the state file.
        self.control = control.ControlServer(control.socket_path(self.run_dir), self._control)
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
        self._start_enforcing()
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
        restored = self.bans.restore()
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

    def _first_start_lint(self):
        """With nothing committed: the lint's verdict on the policy file, as a callable
        for trial.apply (it re-raises a refusal); None otherwise."""
        if self.store.committed() is not None or self.store.held_back() is not None:
            return None
        try:
            policy = trial.read_candidate(self.policy_path)[1]
            lockout.lint_in_child(policy)
        except (lockout.LockoutRisk, InputError) as exc:
            refusal = exc

            def refuse(_policy):
                raise refusal
            return refuse
        return lambda _policy: None

    def _committed_or_first_policy(self, first_lint=None):
        """The committed policy, kept in the kernel; else the policy file, applied as
        `policyd apply` would: after the anti-lockout lint. None when the first policy
        is held back (it would cut a connected client, or it does not load); the daemon
        then enforces nothing and waits for an operator's `policyd apply`."""
        committed = self.store.committed()
        earlier = self.store.held_back() if committed is None else None
        if earlier is not None:
            # Once held back, only an operator's apply enforces: a restart or a
            # reboot (no connections yet to lint) must not cut those clients later.
            self._hold_back(f"{earlier['reason']} (held back since "
                            f"{trial.format_time(earlier['at'])})", earlier["at"])
            return None
        if committed is None:
            log.info("nothing committed yet %s", kv(applying=self.policy_path))
            try:
                return trial.apply(self.nft, self.store, self.policy_path, lint=first_lint)
            except (lockout.LockoutRisk, InputError) as exc:
                self._hold_back(exc)
                return None
        if not self._tables_present(committed):
            trial.restore_committed(self.nft, self.store)
        else:
            # A live trial survives a daemon restart; one past its deadline ends.
            trial.enforce(self.nft, self.store)
        return committed

    def _hold_back(self, exc, since=None):
        """Enforce nothing, say so plainly, and remember it for status and doctor."""
        reason = str(exc)
        since = self.clock() if since is None else since
        self.held_back = {"source": self.policy_path, "reason": reason, "at": since}
        if self.store.held_back() is None:
            self.store.hold_back(self.policy_path, reason, since)
        log.error("NOT ENFORCING %s", kv(
            policy=self.policy_path, reason=reason,
            fix="fix the policy (or add the client to its allow list), then "
                "`policyd apply --confirm-timeout 120`; the daemon takes it at once"))

    def _warn_if_file_differs(self):
        """An edited policy file takes effect through `policyd apply`, never silently."""
        try:
            data = Path(self.policy_path).read_bytes()
        except OSError:
            return
        if hashlib.sha256(data).hexdigest() != self.policy.digest:
            log.warning("policy file differs from the committed policy %s", kv(
                file=self.policy_path, hint="policyd apply --confirm-timeout 60 to load it"))

    def _start_fleet(self):
        if self.policy.fleet is not None:
            self.fleet = fleet.Fleet(self.policy.fleet, self.state, self.bans, self.registry,
                                     wake=self.wake.set, clock=self.clock)
            if self.fleet.start():
                self._flush()

    def _ban_table(self, policy):
        return BanTable(self.nft, policy.bans_table, policy.bans.ipv6_prefix)

    def _follow(self, policy):
        """Follow the policy's logs (the old ones' state and positions are written
        first, by _write_everything, so a log followed anew resumes where it stopped)."""
        for source in self.sources:
            if source.follower:
                source.follower.close()
        if self.watcher is not None:
            self.watcher.stop()
        self.sources = [self._source(config) for config in policy.bans.logs]
        for source in self.sources:
            if source.broken:
                log.error("log not followed %s", kv(log=source.path, error=source.broken))
            elif source.kind == "file" and not os.path.exists(source.path):
                log.warning("log missing %s", kv(log=source.path, filter=source.filter_name,
                                                 action="followed from its start once it "
                                                        "appears"))
        followed = [s for s in self.sources if not s.broken and s.kind == "file"]
        self.watcher = LogWatcher([s.path for s in followed], self._on_log_change,
                                  poll_interval=1.0)
        self.watcher.start()

    def _source(self, config):
        try:
            if config.journal:
                # A journal cursor is queued with the failures read up to it and
                # written in their transaction (BanManager.queue_position).
                return JournalSource(config, self.positions, self._on_log_change,
                                     self.bans.queue_position)
            return LogSource(config, self.positions)
        except InputError as exc:
            return UnfollowedSource(config, f"filter {config.filter!r} does not load: {exc}")

    def stop(self):
        """Stop following and serving; every table and ban stays in the kernel."""
        systemd.notify("STOPPING=1")
        for closer in (self.watcher and self.watcher.stop, self.lists and self.lists.stop,
                       self.elements and self.elements.stop,
                       self.control and self.control.stop,
                       self.metrics_server and self.metrics_server.stop,
                       self.fleet and self.fleet.stop,
                       self.lists and self.lists.stop,
                       self.elements and self.elements.stop,
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
                source.follower.close()
        self.bans.flush()
        self.state.close()
        log.info("stopped %s", kv(bans=self.bans.active_count))

    # ------------------------------------------------------------ the loop

    def _on_log_change(self, _path):
        self.wake.set()

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
                    self._log_bans(bans)
                    if self.fleet is not None:
                        for ban in bans:
                            self.fleet.publish_ban(ban)
                        self.fleet.commit()
            if source.kind == "journal":
                source.follower.commit()  # queued with the failures just counted
        self._save()
        return backlog

    def _file_failures(self, source):
        """([(host, filter, time)], more lines waiting) from one slice of a log file;
        lines a request forged into another entry are dropped and reported."""
        lines = source.follower.read_lines(max_lines=READ_SLICE_LINES)
        if not lines and not source.judge.holding:
            return [], False
        if lines:
            self.metrics.log_lines.labels(log=source.path).inc(len(lines))
        failures, malformed, forgeries = failures_from(source.judge, lines, source.follower.mid_write)
        source.matched += len(failures)
        made = [(before, forgery.failure()) for before, forgery in forgeries
                if self._forged(source, forgery)]
        for before, failure in reversed(made):   # each where the log has it
            failures.insert(before, failure)
        self._count_outcomes(source, failures, malformed)
        return failures, len(lines) >= READ_SLICE_LINES

    def _journal_failures(self, source):
        """[(host, filter, time)] from the journal's new entries (the follower reads a
        bounded batch and wakes the loop again when more wait)."""
        outcomes = source.read()
        if outcomes:
            self.metrics.log_lines.labels(log=source.path).inc(len(outcomes))
        failures = []
        malformed = 0
        for outcome, when in outcomes:
            if outcome is Outcome.MALFORMED:
                malformed += 1
            elif outcome is not Outcome.IGNORED:
                source.matched += 1
                failures.append((outcome.host, outcome.filter, when))
        self._count_outcomes(source, failures, malformed)
        return failures

    def _count_outcomes(self, source, failures, malformed):
        if malformed:
            source.malformed += malformed
            self.metrics.log_malformed.labels(log=source.path).inc(malformed)
        for name, count in Counter(name for _host, name, _when in failures).items():
            self.metrics.failures.labels(filter=name).inc(count)

    def _forged(self, source, forgery):
        """Count and report a request that wrote lines into another entry; True if
        its sender is known, so that it counts as a failure of that sender."""
        source.forged += 1
        self.metrics.log_forged.labels(log=source.path).inc()
        log.warning("forged-lines %s", kv(log=source.path, filter=forgery.filter,
                                          sender=forgery.sender or "unknown",
                                          dropped=forgery.dropped, reason=forgery.reason))
        return forgery.sender is not None

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

    def _log_bans(self, bans):
        self.ban_log.record(bans)

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
        self.chores.submit("upkeep", lambda nft: self._upkeep_job(nft, policy, elements_drifted),
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

    def _upkeep_job(self, nft, policy, elements_drifted):
        """On the worker: housekeeping's policy half, and the list files of a newer
        committed policy read there too (100k lines parsed on the main loop would
        hold bans up)."""
        found = self.upkeep.check(nft, policy, elements_drifted)
        if found.get("committed") is not None:
            self.lists.epoch += 1
            try:
                found["lists"] = self.lists.prepare(found["committed"])
                self.lists.take(found["lists"])
            finally:
                self.lists.epoch += 1
        return found

    def _take_first_commit(self):
        """While held back: an operator's apply committed a policy; enforce from now on."""
        try:
            trial.enforce(self.nft, self.store)  # a first trial past its deadline ends
            committed = self.store.committed()
        except (PolicydError, OSError) as exc:  # an unreadable committed policy included
            self._trouble("taking the committed policy", exc)
            return
        if committed is None:
            return
        self.policy = committed
        try:
            self._start_enforcing()
        except (PolicydError, OSError, sqlite3.Error) as exc:
            # Still held back (a damaged state file, a refusing kernel): the next
            # housekeeping tries again.
            self._trouble("starting to enforce", exc)
            self._stop_enforcing()
            return
        self.problems.pop("taking the committed policy", None)
        self.problems.pop("starting to enforce", None)

    def _upkept(self, found, error):
        """The worker's housekeeping findings, on the main thread."""
        if error is not None:
            self._trouble("policy upkeep", error)
            return
        self.problems.pop("policy upkeep", None)
        self.trial_active = found.get("trial_active", False)
        if found.get("committed") is not None:
            self._adopt(found["committed"], found.get("lists"))
        if found.get("rolled_back"):
            self.metrics.applies.labels(kind="rollback").inc()
            log.warning("trial ended %s", kv(reason="deadline passed unconfirmed"))
        if "restored_ms" in found:
            # The worker put the committed policy back; the bans are this thread's.
            started = time.perf_counter()
            try:
                count = self.bans.restore()
            except (KernelError, OSError) as exc:
                self._trouble("restoring bans", exc)
                return
            differences = self.elements.differences
            self.elements.reset()
            self.metrics.table_restores.inc()
            log.warning("tables were gone or changed: restored %s", kv(
                policy=self.policy.digest[:12], bans=count, sets="; ".join(differences) or None,
                ms=round(found["restored_ms"] + (time.perf_counter() - started) * 1000, 1)))

    def _kernel_epoch(self):
        """For the drift check: moves whenever the list follower's epoch or the loads
        do, and is odd while either is (both can be at once, on the worker)."""
        lists_epoch, loads = self.lists.epoch, Nft.loads
        return 2 * (lists_epoch + loads) + ((lists_epoch | loads) & 1)

    def _expected_sets(self):
        """What the guard table's interval sets should hold (on the drift thread):
        the committed policy's, with list-fed sets as the list follower loaded them.
        Nothing during a trial: a false alarm there would end the trial."""
        policy = self.policy
        if self.store.pending() is not None:
            return {}
        list_fed = {kernel_set.name: kernel_set for kernel_set in self.lists.sets}
        if self._sets_key != policy.digest:
            self._sets = drift.expected_intervals(compile_policy(policy), policy.table,
                                                  skip=list_fed)
            self._sets_key = policy.digest
        sets = dict(self._sets)
        for name, kernel_set in list_fed.items():
            if len(kernel_set):  # an empty set is not in the ruleset at all
                sets[name] = (kernel_set.bits // 8, kernel_set.intervals())
        return sets

    def _tables_present(self, policy):
        names = self.nft.tables()
        return policy.table in names and policy.bans_table in names

    def _reload(self, load_kernel=True, replies=()):
        """Take the committed policy again, on the worker: SIGHUP loads it into the
        kernel too; after a confirm or apply by the CLI (load_kernel=False) the
        kernel has it already. Each of `replies` (Futures) gets {"sha256"} once the
        policy is in use. Asked for while one runs, it runs once more afterwards."""
        if self.bans is None:
            self._take_first_commit()
            for reply in replies:
                reply.set_result({"sha256": self.policy.digest if self.policy else None})
            return
        current = self.policy
        replies = list(replies)
        if not self.chores.submit("reload", lambda nft: self._reload_job(nft, load_kernel, current),
                                  lambda result, error: self._reloaded(result, error, replies)):
            again_kernel, again_replies = self._reload_again or (False, [])
            self._reload_again = (again_kernel or load_kernel, again_replies + replies)

    def _reload_job(self, nft, load_kernel, current):
        """On the worker: everything a reload parses, compiles and loads. A policy
        whose chains and rules the kernel has goes in as only the elements that
        differ (a small transaction: the kernel's commit lock, which ban adds wait
        for, is held milliseconds, not the 0.3 s of 100k elements), and its list
        files are read here, not on the main loop."""
        self.lists.epoch += 1  # odd: the drift check does not compare meanwhile
        try:
            committed, loaded = self.upkeep.reload(nft, load_kernel, current,
                                                   self._expected_sets)
            prepared = self.lists.prepare(committed) if committed is not None else None
            if prepared is not None:
                self.lists.take(prepared)
        finally:
            self.lists.epoch += 1
        return committed, loaded, prepared

    def _reloaded(self, result, error, replies):
        if error is not None:
            self._trouble("reload", error)
            for reply in replies:
                reply.set_exception(error)
        else:
            committed, loaded, prepared = result
            if loaded:
                self.metrics.applies.labels(kind="restore").inc()
            if committed is not None:
                self._adopt(committed, prepared)
            for reply in replies:
                reply.set_result({"sha256": self.policy.digest})
        if self._reload_again is not None:
            load_kernel, waiting = self._reload_again
            self._reload_again = None
            self._reload(load_kernel, waiting)

    def _adopt(self, committed, lists_prepared=None):
        """Make `committed` the daemon's policy: ban settings, ban table, logs, and
        list files (as ListSync.prepare read them on the worker, if it did)."""
        changed_logs = committed.bans.logs != self.policy.bans.logs
        changed_fleet = committed.fleet != self.policy.fleet
        changed_prefix = committed.bans.ipv6_prefix != self.policy.bans.ipv6_prefix
        previous, self.policy = self.policy, committed
        self.bans.kernel = self._ban_table(committed)
        if previous.bans_table != committed.bans_table or changed_prefix:
            # `table:` changed: the bans move to the new ban table, then the old goes.
            # ipv6_prefix changed: the IPv6 elements mean other networks now, and
            # are replaced in one transaction.
            try:
                self.bans.restore(flush_ipv6=changed_prefix)
            except (KernelError, OSError) as error:  # reconcile retries what is missing
                log.error("could not move the bans to the new ban table %s", kv(
                    table=committed.bans_table, ipv6_prefix=committed.bans.ipv6_prefix,
                    error=error))
            if previous.bans_table != committed.bans_table:
                trial.retire_table(self.nft, previous.bans_table)
        for ban in self.bans.reconfigure(committed.bans):
            log.info("unban %s", kv(addr=ban.network, reason="now ignored"))
        self._flush()
        if changed_logs:
            self._write_everything()  # so a log followed anew resumes where it stopped
            self._follow(committed)
        if changed_fleet:
            if self.fleet is not None:
                self.fleet.stop()
                self.fleet = None
            self._start_fleet()
        gc.freeze()
        self.lists.follow(committed, lists_prepared)
        self.elements.table = committed.table
        self.elements.reset()
        log.info("reloaded %s", kv(policy=committed.source, sha256=committed.digest[:12]))

    def _status_line(self):
        if self.bans is None:
            return f"NOT ENFORCING: {self.held_back['reason'] if self.held_back else '?'}"
        problems = f"; {len(self.problems)} problem(s), see policyd status" if self.problems else ""
        return (f"{self.bans.active_count} bans, {len(self.sources)} logs, "
                f"policy {self.policy.digest[:12]}{problems}")

    # ------------------------------------------------------------ control

    def _handle(self, command, args):
        """A control request, on the main thread."""
        if self.bans is None and command in ("ban", "unban"):
            raise InputError("nothing is enforced yet (see `policyd status`): apply a policy "
                             "first", key="policy")
        desk = BanDesk(self.bans, publish=self.fleet and self.fleet.publish)
        handlers = {
            "status": self.status,
            "bans": lambda: self.ban_list(args.get("form")),
            "ban": lambda: self._counted(desk.manual_ban(args.get("address"),
                                                         args.get("duration"))),
            "unban": lambda: desk.manual_unban(args.get("address")),
            "reload": self._reload_now,
            "applied": lambda: self._applied(args.get("kind")),
            "metrics": self._metrics_text,
        }
        if command not in handlers:
            raise InputError(f"unknown command {command!r}", key="command")
        return handlers[command]()

    def _publish_metrics(self):
        """The gauges scrapes read until the next call: made here, on the main
        thread, so the HTTP thread never runs daemon code (the trial's state comes
        from the worker's last housekeeping: no policy is parsed here either)."""
        self.metrics.snapshot.publish({
            "policyd_bans_active": self.bans.active_count if self.bans else 0,
            "policyd_trial_active": int(self.trial_active),
            "policyd_enforcing": int(self.held_back is None),
            "policyd_log_errors": {source.path: int(source.stats()["error"] is not None)
                                   for source in self.sources},
        })
        if self.fleet is not None:
            self.fleet.publish_metrics()

    def _metrics_text(self):
        self._publish_metrics()
        return metrics.render(self.registry)

    def _counted(self, ban):
        self.metrics.bans.labels(reason="manual").inc()
        return ban

    def _applied(self, kind):
        """The CLI changed the kernel and the state dir (it tells us, for the metrics)."""
        if kind not in metrics.APPLY_KINDS:
            raise InputError(f"unknown apply kind {kind!r}", key="kind")
        self.metrics.applies.labels(kind=kind).inc()
        log.info("policy %s", kv(change=kind))
        return {}

    def _reload_now(self):
        """Answered once the worker's reload is in use; _control() waits for it."""
        reply = Future()
        self._reload(replies=[reply])
        return reply

    def _control(self, command, args):
        """ControlServer's handler, on a server thread: the command runs on the main
        loop; a reload is answered when done, without the main loop waiting for it."""
        answer = self.calls(command, args)
        if isinstance(answer, Future):
            return answer.result(RELOAD_REPLY_SECONDS)
        if isinstance(answer, OffLoop):
            return answer.work()
        return answer

    def status(self):
        now = self.clock()
        return {
            "daemon": {"pid": os.getpid(), "version": __version__,
                       "started_at": self.started_at,
                       "uptime": round(now - self.started_at, 1),
                       "problems": [f"{what}: {why}" for what, why in sorted(self.problems.items())]},
            "policy": trial.status(self.store, now=now),
            "bans": {"active": self.bans.active_count,
                     "total": sum(self.bans.bans_total.values())} if self.bans else None,
            "logs": [source.stats() for source in self.sources],
            "fleet": self.fleet.status() if self.fleet is not None else None,
            "kernel": self.kernel_features,
            "lists": self.lists.stats() if self.lists is not None else [],
        }

    def ban_list(self, form=None):
        """Answered off the main loop (see _control): the main loop only takes a
        snapshot. Asked for columns (policyd.banlist.WIRE), a control.Stream of
        them, soonest expiry first, each part made while the client prints the
        one before and in steps that give the main loop the GIL between them;
        else the list of objects older clients read."""
        from policyd import banlist
        if self.bans is None:
            return []
        snapshot, now = self.bans.snapshot(), self.clock()
        if form == banlist.WIRE:
            return OffLoop(lambda: control.Stream(
                banlist.parts_from_snapshot(snapshot, now, network_text), {"form": form}))
        return OffLoop(lambda: banlist.rows_from_snapshot(snapshot, now, network_text))


class OffLoop:
    """A control answer the main loop leaves to the server thread: work() builds it
    from data the main loop copied (100k bans formatted would hold bans up 1 s)."""

    def __init__(self, work):
        self.work = work


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
