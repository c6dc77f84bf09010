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

from policyd import __version__, control, drift, lists, metrics, systemd, trial
from policyd.addr import parse_host, parse_network
from policyd.bans import BanManager
from policyd.compile import compile_policy, skeleton
from policyd.errors import InputError, KernelError
from policyd.filters import Outcome, load_filter
from policyd.listsync import ListSync
from policyd.lists import cidr_text as network_text
from policyd.nft import BanTable, Nft
from policyd.policy import parse_duration
from policyd.state import State
from policyd.systemd import kv
from policyd.tail import LogFollower, LogWatcher

log = logging.getLogger("policyd")

# How often the main loop looks at the kernel and the clock when no log moves.
HOUSEKEEPING_SECONDS = 0.5
# A full comparison of kernel bans against state costs a set listing; rare.
RECONCILE_SECONDS = 300
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
        self.lists = None
        self.elements = None
        self._sets_key = self._sets = None
        self.control = None
        self.metrics_server = None
        self.next_reconcile = 0.0
        self._expected_key = None
        self._expected = {}

    # ------------------------------------------------------------ start and stop

    def start(self):
        lists.keep_last_good = True  # a list turning bad at runtime must not stop us
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.nft = Nft()
        self.store = trial.PolicyStore(self.state_dir)
        self.policy = self._committed_or_first_policy()
        self.state = State(self.state_dir / STATE_FILE)
        self.bans = BanManager(self.policy.bans, self.state, self._ban_table(self.policy))
        restored = self.bans.restore()
        # restore() just put every ban in: the first full comparison can wait.
        self.next_reconcile = self.clock() + RECONCILE_SECONDS
        self._follow(self.policy)
        self.lists = ListSync(self.nft, self.policy, self.wake.set, self._reload)
        self.elements = drift.ElementWatch(self.policy.table, self._expected_sets, self.wake.set,
                                           epoch=lambda: self.lists.epoch + self.nft.loads)
        self.elements.start()
        self.control = control.ControlServer(control.socket_path(self.run_dir), self.calls)
        self.control.start()
        if self.metrics_listen:
            self.metrics_server = metrics.MetricsServer(self.metrics_listen, self.registry)
            self.metrics_server.start()
        source = (self.store.meta() or {}).get("source", self.policy.source)
        log.info("started %s", kv(version=__version__, policy=source,
                                  sha256=self.policy.digest[:12], bans=restored,
                                  logs=len(self.sources)))
        self._warn_if_file_differs()
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
        self.sources = [LogSource(config, self.state) for config in policy.bans.logs]
        self.watcher = LogWatcher([s.path for s in self.sources], self._on_log_change,
                                  poll_interval=1.0)
        self.watcher.start()

    def stop(self):
        """Stop following and serving; every table and ban stays in the kernel."""
        systemd.notify("STOPPING=1")
        for closer in (self.watcher and self.watcher.stop, self.lists and self.lists.stop,
                       self.elements and self.elements.stop,
                       self.control and self.control.stop,
                       self.metrics_server and self.metrics_server.stop):
            if closer:
                closer()
        for source in self.sources:
            source.follower.commit()
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
            self.wake.wait(HOUSEKEEPING_SECONDS)
            self.wake.clear()
            self._read_logs()
            if self.lists.changed:
                self.lists.sync()
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
            lines = source.follower.read_lines()
            if not lines:
                continue
            self.metrics.log_lines.labels(log=source.path).inc(len(lines))
            for line in lines:
                outcome = source.filter.classify(line)
                if outcome is Outcome.IGNORED:
                    continue
                if outcome is Outcome.MALFORMED:
                    source.malformed += 1
                    self.metrics.log_malformed.labels(log=source.path).inc()
                    continue
                source.matched += 1
                self.metrics.failures.labels(filter=outcome.filter).inc()
                ban = self.bans.record_failure(outcome.host, outcome.filter)
                if ban is not None:
                    new_bans += 1
                    log.warning("ban %s", kv(addr=ban.network, filter=ban.filter,
                                             failures=ban.failures,
                                             duration=f"{round(ban.expires_at - ban.banned_at)}s"))
        if new_bans:
            self._flush()
            self.metrics.ban_latency.observe(time.perf_counter() - started)
            self.metrics.bans.labels(reason="auto").inc(new_bans)
        for source in self.sources:
            source.follower.commit()

    def _flush(self):
        try:
            self.bans.flush()
        except (KernelError, OSError) as exc:
            self.metrics.kernel_errors.inc()
            log.error("kernel refused bans %s", kv(error=exc))

    def _housekeeping(self):
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
        systemd.notify(f"STATUS={self._status_line()}")

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
            differences = self.elements.differences
            trial.restore_committed_locked(self.nft, self.store)
            self.elements.reset()
            count = self.bans.restore()
        self.metrics.table_restores.inc()
        log.warning("tables were gone or changed: restored %s", kv(
            policy=self.policy.digest[:12], bans=count, sets="; ".join(differences) or None,
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
        return (self.elements.drifted
                or any(self.nft.skeleton(table) != shape for table, shape in self._expected.items()))

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

    def _reload(self, load_kernel=True):
        """Take the committed policy again: SIGHUP loads it into the kernel too; after
        a confirm or apply by the CLI (load_kernel=False) the kernel has it already,
        and _converge() repairs anything that differs."""
        committed = self.store.committed()
        if committed is None:
            return
        if load_kernel and self.store.pending() is None:
            self.nft.load(compile_policy(committed))
            self.metrics.applies.labels(kind="restore").inc()
        changed_logs = committed.bans.logs != self.policy.bans.logs
        self.policy = committed
        self.bans.kernel = self._ban_table(committed)
        for ban in self.bans.reconfigure(committed.bans):
            log.info("unban %s", kv(addr=ban.network, reason="now ignored"))
        self._flush()
        if changed_logs:
            self._follow(committed)
        self.lists.follow(committed)
        self.elements.table = committed.table
        self.elements.reset()
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
                     "total": sum(self.bans.bans_total.values())},
            "logs": [source.stats() for source in self.sources],
            "lists": self.lists.stats(),
        }

    def ban_list(self):
        """Every ban as Ban.as_dict() gives it, plus seconds_left: built from keys,
        so 100k bans answer in a fraction of a second, not after the CLI gave up."""
        now = self.clock()
        return [{"network": network_text(version, number, prefixlen), "expires_at": expires_at,
                 "failures": failures, "filter": filter_name, "reason": reason,
                 "banned_at": banned_at, "seconds_left": round(max(0.0, expires_at - now), 1)}
                for (version, number, prefixlen), (expires_at, failures, filter_name, reason,
                                                   banned_at) in self.bans.active_rows()]


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
