"""The daemon: wires logs -> filters -> bans -> kernel, and keeps the kernel converged.

One main thread owns every piece of state. Wake-ups (inotify), control
requests and signals only post to it, so nothing here needs a lock.
"""
import hashlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

from policyd import __version__, control, fleet, metrics, systemd, trial
from policyd.addr import parse_host, parse_network
from policyd.bans import BanManager
from policyd.compile import compile_policy, skeleton
from policyd.errors import InputError, KernelError
from policyd.filters import Outcome, load_filter
from policyd.guard import Forgery, judge_for
from policyd.journal import JournalSource
from policyd.nft import BanTable, Nft
from policyd.policy import parse_duration
from policyd.state import State
from policyd.logfmt import kv
from policyd.tail import LogFollower, LogWatcher

log = logging.getLogger(__name__)

# How often the main loop looks at the kernel and the clock when no log moves.
HOUSEKEEPING_SECONDS = 0.5
# A full comparison of kernel bans against state costs a set listing; rare.
RECONCILE_SECONDS = 300
STATE_FILE = "state.db"


class LogSource:
    """One followed log file and the filter that reads it, with its counters."""

    kind = "file"
    broken = None

    def __init__(self, config, positions):
        self.path = config.path
        self.filter = load_filter(config.filter, mode=config.mode)
        self.filter_name = config.filter
        self.matched = 0
        self.malformed = 0
        fresh = positions.load(self.path) is None
        self.follower = LogFollower(self.path, positions)
        if fresh and os.path.exists(self.path):
            # A log seen for the first time is followed from its end: old
            # failures must not ban anyone today. One that appears later is
            # read from its start, since all of it is new.
            self.follower.skip_to_end()
            self.follower.commit()
        self.judge = judge_for(self.filter)
        self.forged = 0

    def stats(self):
        return dict(self.follower.stats, filter=self.filter.name, matched=self.matched,
                    malformed=self.malformed, forged=self.forged)


class UnfollowedSource:
    """A bans.logs entry whose filter or journal stopped loading since `apply` checked
    it (a file edited or removed): it costs this log only, and is reported."""

    kind = "unfollowed"
    follower = None

    def __init__(self, config, error):
        self.path = config.label
        self.filter_name = config.filter
        self.broken = error
        self.matched = 0
        self.malformed = 0

    def stats(self):
        return {"path": self.path, "filter": self.filter_name, "exists": None,
                "inode": None, "offset": 0, "lines": 0, "matched": 0, "malformed": 0,
                "forged": 0, "oversized": 0, "rotations": 0, "error": self.broken}


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
        self.bans = None
        self.sources = []
        self.watcher = None
        self.control = None
        self.metrics_server = None
        self.fleet = None
        self.next_reconcile = 0.0
        self._expected_key = None
        self._expected = {}

    # ------------------------------------------------------------ start and stop

    def start(self):
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = trial.PolicyStore(self.state_dir)
        # The first start's lint forks: before any thread of ours runs.
        first_lint = self._first_start_lint()
        # The control socket next: a second daemon on this run dir must refuse
        # before it touches the kernel, the bans or the state file.
        self.control = control.ControlServer(control.socket_path(self.run_dir), self.calls)
        self.control.start()
        if self.metrics_listen:
            self.metrics_server = metrics.MetricsServer(self.metrics_listen, self.registry)
            self.metrics_server.start()
        self.nft = Nft()
        self.policy = self._committed_or_first_policy(first_lint)
        if self.policy is None:
            systemd.notify("READY=1", f"STATUS={self._status_line()}")
            return
        self._start_enforcing()
        self._warn_if_file_differs()
        systemd.notify("READY=1", f"STATUS={self._status_line()}")

    def _start_enforcing(self):
        """The committed policy is in the kernel: restore its bans and follow its logs."""
        self.state = State(self.state_dir / STATE_FILE)
        self.bans = BanManager(self.policy.bans, self.state, self._ban_table(self.policy))
        restored = self.bans.restore()
        # restore() just put every ban in: the first full comparison can wait.
        self.next_reconcile = self.clock() + RECONCILE_SECONDS
        self._follow(self.policy)
        self._start_fleet()  # catches up with the other nodes before READY
        self.held_back = None
        source = (self.store.meta() or {}).get("source", self.policy.source)
        log.info("started %s", kv(version=__version__, policy=source,
                                  sha256=self.policy.digest[:12], bans=restored,
                                  logs=len(self.sources)))

    def _first_start_lint(self):
        """With nothing committed: the lint's verdict on the policy file, as a callable
        for trial.apply (it re-raises a refusal); None otherwise."""
        if self.store.committed() is not None or self.store.held_back() is not None:
            return None
        try:
            policy = trial.read_candidate(self.policy_path)[1]
            trial.lint_in_child(policy)
        except (trial.LockoutRisk, InputError) as exc:
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
            except (trial.LockoutRisk, InputError) as exc:
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
        for source in self.sources:
            if source.follower:
                source.follower.commit()
                source.follower.close()
        if self.sources:
            # A journal cursor is only queued until written with its failures;
            # the followers made below resume from what is written.
            self._flush()
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
                return JournalSource(config, self.state, self._on_log_change,
                                     self.bans.queue_position)
            return LogSource(config, self.state)
        except InputError as exc:
            return UnfollowedSource(config, f"filter {config.filter!r} does not load: {exc}")

    def stop(self):
        """Stop following and serving; every table and ban stays in the kernel."""
        systemd.notify("STOPPING=1")
        for closer in (self.watcher and self.watcher.stop,
                       self.control and self.control.stop,
                       self.metrics_server and self.metrics_server.stop,
                       self.fleet and self.fleet.stop):
            if closer:
                closer()
        for source in self.sources:
            if source.follower:
                source.follower.commit()
                source.follower.close()
        if self.bans is None:
            log.info("stopped %s", kv(enforcing="no"))
            return
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
            self.wake.wait(HOUSEKEEPING_SECONDS)
            self.wake.clear()
            self._read_logs()
            if self.fleet is not None and self.fleet.pump():
                self._flush()
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
        started = time.perf_counter()
        new_bans = 0
        for source in self.sources:
            if source.broken:
                continue
            if source.kind == "journal":
                new_bans += self._read_journal(source)
                continue
            lines = source.follower.read_lines()
            if not lines and not source.judge.holding:
                continue
            self.metrics.log_lines.labels(log=source.path).inc(len(lines))
            for outcome in source.judge.judge(lines, source.follower.mid_write):
                if outcome is Outcome.MALFORMED:
                    source.malformed += 1
                    self.metrics.log_malformed.labels(log=source.path).inc()
                    continue
                if isinstance(outcome, Forgery):
                    if not self._forged(source, outcome):
                        continue
                    outcome = outcome.failure()
                else:
                    source.matched += 1
                    self.metrics.failures.labels(filter=outcome.filter).inc()
                ban = self.bans.record_failure(outcome.host, outcome.filter, outcome.time)
                if ban is not None:
                    new_bans += 1
                    if self.fleet is not None:
                        self.fleet.publish_ban(ban)
                    log.warning("ban %s", kv(addr=ban.network, filter=ban.filter,
                                             failures=ban.failures,
                                             duration=f"{round(ban.expires_at - ban.banned_at)}s"))
        if new_bans:
            self._flush()
            self.metrics.ban_latency.observe(time.perf_counter() - started)
            self.metrics.bans.labels(reason="auto").inc(new_bans)
            if self.fleet is not None:
                self.fleet.commit()
        for source in self.sources:
            if source.follower:
                source.follower.commit()

    def _read_journal(self, source):
        """Like the file path, with each entry's own time; returns how many bans it made."""
        new_bans = 0
        outcomes = source.read()
        if outcomes:
            self.metrics.log_lines.labels(log=source.path).inc(len(outcomes))
        for outcome, when in outcomes:
            if outcome is Outcome.IGNORED:
                continue
            if outcome is Outcome.MALFORMED:
                source.malformed += 1
                self.metrics.log_malformed.labels(log=source.path).inc()
                continue
            source.matched += 1
            self.metrics.failures.labels(filter=outcome.filter).inc()
            ban = self.bans.record_failure(outcome.host, outcome.filter, when=when)
            if ban is not None:
                new_bans += 1
                if self.fleet is not None:
                    self.fleet.publish_ban(ban)
                log.warning("ban %s", kv(addr=ban.network, filter=ban.filter, failures=ban.failures,
                                         duration=f"{round(ban.expires_at - ban.banned_at)}s"))
        return new_bans

    def _forged(self, source, forgery):
        """Count and report a request that wrote lines into another entry; True if
        its sender is known, so that it counts as a failure of that sender."""
        source.forged += 1
        self.metrics.log_forged.labels(log=source.path).inc()
        log.warning("forged-lines %s", kv(log=source.path, filter=forgery.filter,
                                          sender=forgery.sender or "unknown",
                                          dropped=forgery.dropped, reason=forgery.reason))
        return forgery.sender is not None

    def _flush(self):
        try:
            self.bans.flush()
        except (KernelError, OSError) as exc:
            self.metrics.kernel_errors.inc()
            log.error("kernel refused bans %s", kv(error=exc))

    def _housekeeping(self):
        if self.bans is None:
            self._take_first_commit()
            self._publish_metrics()
            systemd.notify(f"STATUS={self._status_line()}")
            return
        self._flush()  # retries a batch the kernel refused before; cheap when empty
        try:
            meta = self.store.meta()
            if meta and meta.get("sha256") != self.policy.digest:
                self._reload(load_kernel=False)
            if trial.enforce(self.nft, self.store):
                self.metrics.applies.labels(kind="rollback").inc()
                log.warning("trial ended %s", kv(reason="deadline passed unconfirmed"))
            self._converge()
            for ban in self.bans.expire():
                log.info("unban %s", kv(addr=ban.network, reason="expired"))
            if self.clock() >= self.next_reconcile:
                self.next_reconcile = self.clock() + RECONCILE_SECONDS
                readded = self.bans.reconcile()
                if readded:
                    log.warning("kernel lacked bans %s", kv(readded=readded))
        except (KernelError, OSError) as exc:
            self.metrics.kernel_errors.inc()
            log.error("housekeeping failed %s", kv(error=exc))
        self._publish_metrics()
        systemd.notify(f"STATUS={self._status_line()}")

    def _take_first_commit(self):
        """While held back: an operator's apply committed a policy; enforce from now on."""
        try:
            trial.enforce(self.nft, self.store)  # a first trial past its deadline ends
            committed = self.store.committed()
        except InputError as exc:
            log.error("committed policy unreadable %s", kv(error=exc))
            return
        except (KernelError, OSError) as exc:
            self.metrics.kernel_errors.inc()
            log.error("housekeeping failed %s", kv(error=exc))
            return
        if committed is None:
            return
        self.policy = committed
        try:
            self._start_enforcing()
        except (KernelError, OSError) as exc:
            # Still held back; the next housekeeping tries again.
            self.metrics.kernel_errors.inc()
            log.error("could not start enforcing %s", kv(error=exc))
            self.bans = None
            self.state.close()

    def _converge(self):
        """Put the committed policy and every ban back if the tables are gone or edited.

        Compares chains, rule counts and set names over netlink (well under a
        millisecond, whatever the allowlist's size) with what the policy loads.
        """
        if not self._drifted():
            return
        with self.store.locked(wait=False) as got:
            # A CLI apply holds the lock while it changes the kernel: look again later.
            if not got or not self._drifted():
                return
            started = time.perf_counter()
            trial.restore_committed_locked(self.nft, self.store)
            count = self.bans.restore()
        self.metrics.table_restores.inc()
        log.warning("tables were gone or changed: restored %s", kv(
            policy=self.policy.digest[:12], bans=count,
            ms=round((time.perf_counter() - started) * 1000, 1)))

    def _drifted(self):
        pending = self.store.pending()
        key = (self.policy.digest, pending and pending.sha256)
        if key != self._expected_key:
            document = (compile_policy(self.policy, pending.policy(), pending.seconds)
                        if pending else compile_policy(self.policy))
            self._expected = {table: skeleton(document, table)
                              for table in (self.policy.table, self.policy.bans_table)}
            self._expected_key = key
        return any(self.nft.skeleton(table) != shape for table, shape in self._expected.items())

    def _tables_present(self, policy):
        names = self.nft.tables()
        return policy.table in names and policy.bans_table in names

    def _reload(self, load_kernel=True):
        """Take the committed policy again: SIGHUP loads it into the kernel too; after
        a confirm or apply by the CLI (load_kernel=False) the kernel has it already,
        and _converge() repairs anything that differs."""
        if self.bans is None:
            self._take_first_commit()
            return
        committed = self.store.committed()
        if committed is None:
            return
        if load_kernel and self.store.pending() is None:
            self.nft.load(compile_policy(committed))
            self.metrics.applies.labels(kind="restore").inc()
        changed_logs = committed.bans.logs != self.policy.bans.logs
        changed_fleet = committed.fleet != self.policy.fleet
        previous, self.policy = self.policy, committed
        self.bans.kernel = self._ban_table(committed)
        if previous.bans_table != committed.bans_table:
            # `table:` changed: the bans move to the new ban table, then the old goes.
            self.bans.restore()
            trial.retire_table(self.nft, previous.bans_table)
            self._expected_key = None
        for ban in self.bans.reconfigure(committed.bans):
            log.info("unban %s", kv(addr=ban.network, reason="now ignored"))
        self._flush()
        if changed_logs:
            self._follow(committed)
        if changed_fleet:
            if self.fleet is not None:
                self.fleet.stop()
                self.fleet = None
            self._start_fleet()
        log.info("reloaded %s", kv(policy=committed.source, sha256=committed.digest[:12]))

    def _status_line(self):
        if self.bans is None:
            return f"NOT ENFORCING: {self.held_back['reason'] if self.held_back else '?'}"
        return (f"{self.bans.active_count} bans, {len(self.sources)} logs, "
                f"policy {self.policy.digest[:12]}")

    # ------------------------------------------------------------ control

    def _handle(self, command, args):
        """A control request, on the main thread."""
        if self.bans is None and command in ("ban", "unban"):
            raise InputError("nothing is enforced yet (see `policyd status`): apply a policy "
                             "first", key="policy")
        desk = BanDesk(self.bans, publish=self.fleet and self.fleet.publish)
        handlers = {
            "status": self.status,
            "bans": self.ban_list,
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
        thread, so the HTTP thread never runs daemon code (nor parses a trial)."""
        self.metrics.snapshot.publish({
            "policyd_bans_active": self.bans.active_count if self.bans else 0,
            "policyd_trial_active": int(self.store.pending() is not None),
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
        self._reload()
        return {"sha256": self.policy.digest}

    def status(self):
        now = self.clock()
        return {
            "daemon": {"pid": os.getpid(), "version": __version__,
                       "started_at": self.started_at,
                       "uptime": round(now - self.started_at, 1)},
            "policy": trial.status(self.store, now=now),
            "bans": {"active": self.bans.active_count,
                     "total": sum(self.bans.bans_total.values())} if self.bans else None,
            "logs": [source.stats() for source in self.sources],
            "fleet": self.fleet.status() if self.fleet is not None else None,
        }

    def ban_list(self):
        if self.bans is None:
            return []
        now = self.clock()
        return [dict(ban.as_dict(), seconds_left=round(ban.seconds_left(now), 1))
                for ban in self.bans.active()]


# bans.py names a refusal after its own parameter; the operator typed ADDR or --for.
_OPERATOR_KEYS = {"address": "ADDR", "duration": "--for"}


class BanDesk:
    """Manual ban and unban on a BanManager: the daemon's, or the CLI's when none runs."""

    def __init__(self, bans, publish=None):
        self.bans = bans
        self.publish = publish  # the fleet's: (op, network, expires_at, reason)

    def manual_ban(self, address, duration):
        target = _target(address)
        seconds = parse_duration(duration, key="--for") if duration is not None else None
        try:
            ban = self.bans.ban(target, seconds, reason="manual")
        except InputError as exc:
            exc.key = _OPERATOR_KEYS.get(exc.key, exc.key)
            raise
        self.bans.flush()
        if self.publish:
            self.publish("ban", ban.network, ban.expires_at, "manual")
        log.warning("ban %s", kv(addr=ban.network, reason="manual",
                                 duration=f"{round(ban.expires_at - ban.banned_at)}s"))
        return ban.as_dict()

    def manual_unban(self, address):
        lifted = self.bans.unban(_target(address))
        self.bans.flush()
        if self.publish:
            self.publish("unban", _target(address), None, "manual")
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
        # With a fleet, what is banned here waits in the outbox for the daemon.
        publish = fleet.outbox_writer(state) if committed.fleet is not None else None
        return action(BanDesk(bans, publish=publish))
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
