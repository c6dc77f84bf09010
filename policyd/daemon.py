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
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

from policyd import __version__, control, metrics, systemd, trial
from policyd.addr import parse_host, parse_network
from policyd.bans import BanManager, active_in
from policyd.chores import Chores, PolicyUpkeep, give_back_memory
from policyd.errors import InputError, KernelError
from policyd.filters import Outcome, load_filter
from policyd.nft import BanTable, Nft
from policyd.policy import parse_duration
from policyd.state import State
from policyd.statewriter import QueuedPositions, StateWriter
from policyd.systemd import kv
from policyd.tail import LogFollower, LogWatcher

log = logging.getLogger("policyd")

# How often the main loop looks at the kernel and the clock when no log moves.
HOUSEKEEPING_SECONDS = 0.5
# A full comparison of kernel bans against state costs a set listing; rare.
RECONCILE_SECONDS = 300
# Lines taken from one log per turn of the loop: a flood in one log delays the
# bans of another log, control requests and housekeeping by one slice (a few
# ms), and each slice's bans reach the kernel before the next slice is read.
READ_SLICE_LINES = 500
# More bans than this from one slice are logged as one summary line: a flood of
# 100k bans must not become 100k journal lines (20 us each, on the ban path).
BAN_LOG_LINES = 20
# Bans reach the kernel at once; state (bans, failures, then the log positions
# they cover) is written at most this often while logs keep coming, at most
# STATE_CHUNK_ROWS rows per transaction and per turn of the loop, so that a
# flood's 100k bans are written between slices of lines, never in one stall.
STATE_WRITE_SECONDS = 0.25
STATE_CHUNK_ROWS = 1000
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
STATE_FILE = "state.db"


class LogSource:
    """One followed log and the filter that reads it, with its counters."""

    def __init__(self, config, positions):
        self.path = config.path
        self.filter = load_filter(config.filter)
        fresh = positions.load(self.path) is None
        self.follower = LogFollower(self.path, positions)
        if fresh and os.path.exists(self.path):
            # A log seen for the first time is followed from its end: old
            # failures must not ban anyone today. One that appears later is
            # read from its start, since all of it is new.
            self.follower.read_lines()
            self.follower.commit()
        self.matched = 0
        self.malformed = 0

    def stats(self):
        return dict(self.follower.stats, filter=self.filter.name, matched=self.matched,
                    malformed=self.malformed)


class Daemon:
    """policyd run: start() takes the kernel and the logs in hand, run() loops, stop() lets go."""

    def __init__(self, policy_path, state_dir, run_dir, metrics_listen=None, clock=time.time):
        self.policy_path = policy_path
        self.state_dir = Path(state_dir)
        self.run_dir = Path(run_dir)
        self.metrics_listen = metrics_listen
        self.clock = clock
        self.wake = threading.Event()
        self.calls = control.MainLoopCall(self._handle, wake=self.wake.set)
        self.stopping = False
        self.reload_requested = False
        self.started_at = clock()
        self.registry = metrics.Registry()
        self.metrics = metrics.standard_metrics(
            self.registry, bans_active=lambda: self.bans.active_count,
            trial_active=lambda: int(self.store.pending() is not None))
        self.sources = []
        self.watcher = None
        self.control = None
        self.metrics_server = None
        self.next_reconcile = 0.0
        self.next_state_write = 0.0
        self.backlog = False
        self.chores = None
        self._reload_again = None   # (load_kernel, replies) asked for while one ran

    # ------------------------------------------------------------ start and stop

    def start(self):
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        gc.set_threshold(*GC_THRESHOLDS)
        self.nft = Nft()
        self.store = trial.PolicyStore(self.state_dir)
        self.upkeep = PolicyUpkeep(self.store)
        self.chores = Chores(Nft, wake=self.wake.set)
        self.chores.start()
        self.policy = self._committed_or_first_policy()
        self.state = State(self.state_dir / STATE_FILE)
        self.state_writer = StateWriter(self.state.path, wake=self.wake.set)
        self.state_writer.start()
        self.positions = QueuedPositions(self.state, self.state_writer)
        self.bans = BanManager(self.policy.bans, self.state, self._ban_table(self.policy),
                               writer=self.state_writer)
        restored = self.bans.restore()
        # restore() just put every ban in: the first full comparison can wait.
        self.next_reconcile = self.clock() + RECONCILE_SECONDS
        self._follow(self.policy)
        self.control = control.ControlServer(control.socket_path(self.run_dir), self._control)
        self.control.start()
        if self.metrics_listen:
            self.metrics_server = metrics.MetricsServer(self.metrics_listen, self.registry)
            self.metrics_server.start()
        source = (self.store.meta() or {}).get("source", self.policy.source)
        log.info("started %s", kv(version=__version__, policy=source,
                                  sha256=self.policy.digest[:12], bans=restored,
                                  logs=len(self.sources)))
        self._warn_if_file_differs()
        gc.freeze()
        systemd.notify("READY=1", f"STATUS={self._status_line()}")

    def _committed_or_first_policy(self):
        """The committed policy, kept in the kernel; the policy file if none is committed."""
        committed = self.store.committed()
        if committed is None:
            log.info("nothing committed yet: applying %s", self.policy_path)
            # Nobody is connected to lint for: the operator chose this file.
            return trial.apply(self.nft, self.store, self.policy_path, force=True)
        if not self._tables_present(committed):
            trial.restore_committed(self.nft, self.store)
        else:
            # A live trial survives a daemon restart; one past its deadline ends.
            trial.enforce(self.nft, self.store)
        return committed

    def _warn_if_file_differs(self):
        """An edited policy file takes effect through `policyd apply`, never silently."""
        try:
            data = Path(self.policy_path).read_bytes()
        except OSError:
            return
        if hashlib.sha256(data).hexdigest() != self.policy.digest:
            log.warning("policy file differs from the committed policy %s", kv(
                file=self.policy_path, hint="policyd apply --confirm-timeout 60 to load it"))

    def _ban_table(self, policy):
        return BanTable(self.nft, policy.bans_table, policy.bans.ipv6_prefix)

    def _follow(self, policy):
        for source in self.sources:
            source.follower.close()
        if self.watcher is not None:
            self.watcher.stop()
        self.sources = [LogSource(config, self.positions) for config in policy.bans.logs]
        self.watcher = LogWatcher([s.path for s in self.sources], self._on_log_change,
                                  poll_interval=1.0)
        self.watcher.start()

    def stop(self):
        """Stop following and serving; every table and ban stays in the kernel."""
        systemd.notify("STOPPING=1")
        for closer in (self.watcher and self.watcher.stop,
                       self.control and self.control.stop,
                       self.metrics_server and self.metrics_server.stop,
                       self.chores and self.chores.stop):
            if closer:
                closer()
        self._flush(write_state=False)
        self.state_writer.stop()  # writes what it was given
        self.bans.state_written(self.state_writer.collect())
        self.bans.writer = None
        self.bans.flush()
        for source in self.sources:
            # After the state: a position never runs ahead of the failures it covers.
            if not self.bans.state_pending():
                source.follower.commit()
            source.follower.close()
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
                if self.bans.state_pending() and self.state_writer.queued() < STATE_BATCHES_QUEUED:
                    # The rest of a flood's state, piece by piece (a full writer wakes us).
                    pause = min(pause, max(0.0, self.next_state_write - time.monotonic()))
                self.wake.wait(pause)
            self.wake.clear()
            backlog = self._read_logs()
            if backlog != self.backlog:
                self._collect_garbage_after(flood_over=not backlog)
            self.backlog = backlog
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
            started = time.perf_counter()
            lines = source.follower.read_lines(max_lines=READ_SLICE_LINES)
            if not lines:
                continue
            backlog = backlog or len(lines) >= READ_SLICE_LINES
            self.metrics.log_lines.labels(log=source.path).inc(len(lines))
            failures = []
            malformed = 0
            classify = source.filter.classify
            for line in lines:
                outcome = classify(line)
                if outcome is Outcome.IGNORED:
                    continue
                if outcome is Outcome.MALFORMED:
                    malformed += 1
                    continue
                failures.append((outcome.host, outcome.filter))
            if malformed:
                source.malformed += malformed
                self.metrics.log_malformed.labels(log=source.path).inc(malformed)
            if failures:
                source.matched += len(failures)
                for name, count in Counter(name for _host, name in failures).items():
                    self.metrics.failures.labels(filter=name).inc(count)
                bans = self.bans.record_failures(failures)
                if bans:
                    self._flush(write_state=False)
                    self.metrics.ban_latency.observe(time.perf_counter() - started)
                    self.metrics.bans.labels(reason="auto").inc(len(bans))
                    self._log_bans(bans)
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
        if now < self.next_state_write or self.state_writer.queued() >= STATE_BATCHES_QUEUED:
            return
        written = self.bans.write_state(STATE_CHUNK_ROWS)
        if not self.bans.state_pending():
            for source in self.sources:
                source.follower.commit()
            self.next_state_write = now + STATE_WRITE_SECONDS
        elif not written:
            self.next_state_write = now + STATE_WRITE_SECONDS  # a write error: retry later

    def _write_everything(self):
        """All queued state, then the positions it covers, written now (waits)."""
        self._flush(write_state=False)
        while self.bans.state_pending() and self.bans.write_state():
            pass
        for source in self.sources:
            source.follower.commit()
        self.state_writer.wait()
        self.bans.state_written(self.state_writer.collect())

    @staticmethod
    def _log_bans(bans):
        if len(bans) <= BAN_LOG_LINES:
            for ban in bans:
                log.warning("ban %s", kv(addr=ban.network, filter=ban.filter,
                                         failures=ban.failures,
                                         duration=f"{round(ban.expires_at - ban.banned_at)}s"))
            return
        log.warning("bans %s", kv(count=len(bans), filter=",".join(bans.filters()),
                                  sample=" ".join(str(ban.network) for ban in bans[:5]),
                                  hint="policyd bans lists them all"))

    def _flush(self, write_state=True):
        try:
            self.bans.flush(write_state)
        except (KernelError, OSError) as exc:
            self.metrics.kernel_errors.inc()
            log.error("kernel refused bans %s", kv(error=exc))

    def _housekeeping(self):
        self._save()  # also retries a batch the kernel refused before; cheap when empty
        # The policy half (a newer committed policy, a trial's deadline, tables
        # gone or edited) runs on the worker; _upkept() takes its findings.
        policy = self.policy
        self.chores.submit("upkeep", lambda nft: self.upkeep.check(nft, policy), self._upkept)
        try:
            for ban in self.bans.expire(write_state=False):  # _save() writes it
                log.info("unban %s", kv(addr=ban.network, reason="expired"))
            if self.clock() >= self.next_reconcile:
                self.next_reconcile = self.clock() + RECONCILE_SECONDS
                readded = self.bans.reconcile()
                if readded:
                    log.warning("kernel lacked bans %s", kv(readded=readded))
        except (KernelError, OSError) as exc:
            self.metrics.kernel_errors.inc()
            log.error("housekeeping failed %s", kv(error=exc))
        systemd.notify(f"STATUS={self._status_line()}")

    def _upkept(self, found, error):
        """The worker's housekeeping findings, on the main thread."""
        if error is not None:
            self._worker_failed("housekeeping", error)
            return
        if found.get("committed") is not None:
            self._adopt(found["committed"])
        if found.get("rolled_back"):
            self.metrics.applies.labels(kind="rollback").inc()
            log.warning("trial ended %s", kv(reason="deadline passed unconfirmed"))
        if "restored_ms" in found:
            # The worker put the committed policy back; the bans are this thread's.
            started = time.perf_counter()
            try:
                count = self.bans.restore()
            except (KernelError, OSError) as exc:
                self._worker_failed("restoring bans", exc)
                return
            self.metrics.table_restores.inc()
            log.warning("tables were gone or changed: restored %s", kv(
                policy=self.policy.digest[:12], bans=count,
                ms=round(found["restored_ms"] + (time.perf_counter() - started) * 1000, 1)))

    def _worker_failed(self, what, error):
        if isinstance(error, (KernelError, OSError)):
            self.metrics.kernel_errors.inc()
        log.error("%s failed %s", what, kv(error=error))

    def _tables_present(self, policy):
        names = self.nft.tables()
        return policy.table in names and policy.bans_table in names

    def _reload(self, load_kernel=True, replies=()):
        """Take the committed policy again, on the worker: SIGHUP loads it into the
        kernel too; after a confirm or apply by the CLI (load_kernel=False) the
        kernel has it already. Each of `replies` (Futures) gets {"sha256"} once the
        policy is in use. Asked for while one runs, it runs once more afterwards."""
        replies = list(replies)
        if not self.chores.submit("reload", lambda nft: self.upkeep.reload(nft, load_kernel),
                                  lambda result, error: self._reloaded(result, error, replies)):
            again_kernel, again_replies = self._reload_again or (False, [])
            self._reload_again = (again_kernel or load_kernel, again_replies + replies)

    def _reloaded(self, result, error, replies):
        if error is not None:
            self._worker_failed("reload", error)
            for reply in replies:
                reply.set_exception(error)
        else:
            committed, loaded = result
            if loaded:
                self.metrics.applies.labels(kind="restore").inc()
            if committed is not None:
                self._adopt(committed)
            for reply in replies:
                reply.set_result({"sha256": self.policy.digest})
        if self._reload_again is not None:
            load_kernel, waiting = self._reload_again
            self._reload_again = None
            self._reload(load_kernel, waiting)

    def _adopt(self, committed):
        """Make `committed` the daemon's policy: ban settings, ban table, logs."""
        changed_logs = committed.bans.logs != self.policy.bans.logs
        self.policy = committed
        self.bans.kernel = self._ban_table(committed)
        for ban in self.bans.reconfigure(committed.bans):
            log.info("unban %s", kv(addr=ban.network, reason="now ignored"))
        self._flush()
        if changed_logs:
            self._write_everything()  # so a log followed anew resumes where it stopped
            self._follow(committed)
        gc.freeze()
        log.info("reloaded %s", kv(policy=committed.source, sha256=committed.digest[:12]))

    def _status_line(self):
        return (f"{self.bans.active_count} bans, {len(self.sources)} logs, "
                f"policy {self.policy.digest[:12]}")

    # ------------------------------------------------------------ control

    def _handle(self, command, args):
        """A control request, on the main thread."""
        desk = BanDesk(self.bans)
        handlers = {
            "status": self.status,
            "bans": self.ban_list,
            "ban": lambda: self._counted(desk.manual_ban(args.get("address"),
                                                         args.get("duration"))),
            "unban": lambda: desk.manual_unban(args.get("address")),
            "reload": self._reload_now,
            "applied": lambda: self._applied(args.get("kind")),
            "metrics": self.registry.render,
        }
        if command not in handlers:
            raise InputError(f"unknown command {command!r}", key="command")
        return handlers[command]()

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
                       "uptime": round(now - self.started_at, 1)},
            "policy": trial.status(self.store, now=now),
            "bans": {"active": self.bans.active_count,
                     "total": sum(self.bans.bans_total.values())},
            "logs": [source.stats() for source in self.sources],
        }

    def ban_list(self):
        """Answered off the main loop (see _control): it only takes a snapshot."""
        snapshot, now = self.bans.snapshot(), self.clock()
        return OffLoop(lambda: [dict(ban.as_dict(), seconds_left=round(ban.seconds_left(now), 1))
                                for ban in active_in(snapshot, now)])


class OffLoop:
    """A control answer the main loop leaves to the server thread: work() builds it
    from data the main loop copied (100k bans formatted would hold bans up 1 s)."""

    def __init__(self, work):
        self.work = work


class BanDesk:
    """Manual ban and unban on a BanManager: the daemon's, or the CLI's when none runs."""

    def __init__(self, bans):
        self.bans = bans

    def manual_ban(self, address, duration):
        target = _target(address)
        seconds = parse_duration(duration, key="--for") if duration is not None else None
        ban = self.bans.ban(target, seconds, reason="manual")
        self.bans.flush()
        log.warning("ban %s", kv(addr=ban.network, reason="manual",
                                 duration=f"{round(ban.expires_at - ban.banned_at)}s"))
        return ban.as_dict()

    def manual_unban(self, address):
        lifted = self.bans.unban(_target(address))
        self.bans.flush()
        if lifted:
            log.info("unban %s", kv(addr=address, reason="manual"))
        return {"unbanned": lifted}


def offline(state_dir, action):
    """Run action(BanDesk) on the committed policy's bans when no daemon runs."""
    committed = trial.PolicyStore(state_dir).committed()
    if committed is None:
        raise InputError("nothing committed yet: run `policyd apply` first", key="policy")
    nft = Nft()
    state = State(Path(state_dir) / STATE_FILE)
    try:
        bans = BanManager(committed.bans, state,
                          BanTable(nft, committed.bans_table, committed.bans.ipv6_prefix))
        return action(BanDesk(bans))
    finally:
        state.close()


def _target(text):
    if not text:
        raise InputError("an address is required", key="ADDR")
    address = parse_host(str(text))
    if address is not None:
        return address
    try:
        return parse_network(str(text))
    except ValueError:
        raise InputError(f"{text!r} is not an address or network", key="ADDR") from None


def run(policy_path, state_dir, run_dir, metrics_listen=None):
    """`policyd run`: start, loop until SIGTERM/SIGINT, stop; SIGHUP reloads."""
    daemon = Daemon(policy_path, state_dir, run_dir, metrics_listen)

    def stop(_signum, _frame):
        daemon.stopping = True
        daemon.wake.set()

    def reload(_signum, _frame):
        daemon.reload_requested = True
        daemon.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    daemon.start()
    try:
        daemon.run()
    finally:
        daemon.stop()
