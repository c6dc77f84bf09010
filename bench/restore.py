"""policyd's restore of many bans: after a cold start, a restart, and a flushed ruleset.

Owns one throwaway namespace with the daemon, `count` bans written into its
state file, and the watch: sample keys looked up in the kernel every 2 ms
(bench/setcount.py) give the moment bans are back and whether any was missing,
and a full count at the end says how many were lost. Also the daemon's memory
idle and with the bans held.
"""
import ipaddress
import threading
import time
from pathlib import Path

from policyd_lab.netlab import Lab, wait_for
from policyd_daemon import BAN_TABLE, TimedDaemon, seed_bans, state_dir, write_policy
from setcount import SetCounter

SAMPLE_KEYS = 64
SAMPLE_INTERVAL = 0.001
SETTLE_SECONDS = 2.0


class BanWatch:
    """Samples, in a thread, how many of the seeded bans' sample keys the kernel lacks."""

    def __init__(self, namespace, networks):
        self.counter = SetCounter(namespace)
        self.total = {"ban4": 0, "ban6": 0}
        self.samples = {"ban4": [], "ban6": []}
        for network in networks:
            name = "ban4" if network.version == 4 else "ban6"
            self.total[name] += 1
            self.samples[name].append(network.network_address.packed)
        for name, keys in self.samples.items():
            # Spread over the set, plus the last key, which a batch writes last.
            stride = max(1, len(keys) // SAMPLE_KEYS)
            self.samples[name] = keys[::stride] + keys[-1:] if keys else []
        self.log = []
        self._stop = threading.Event()
        self._thread = None

    def missing_samples(self):
        return sum(self.counter.missing(BAN_TABLE, name, keys)
                   for name, keys in self.samples.items() if keys)

    def lost(self, settle=3.0):
        """How many seeded bans the kernel lacks, by a full count.

        A set-element dump taken while the kernel still resizes a hash set that
        just took 100k elements can miss thousands of them (seen on 6.18: 12k
        "missing" at once, 0 a second later, while sampled lookups never missed
        one). So a count that finds some missing is repeated for `settle`
        seconds and the best count stands: the daemon's next full reconcile is
        300 s away, so a ban really lost would still be missing then."""
        deadline = time.monotonic() + settle
        fewest = None
        while True:
            missing = sum(total - self.counter.count(BAN_TABLE, name)
                          for name, total in self.total.items() if total)
            fewest = missing if fewest is None else min(fewest, missing)
            if fewest <= 0 or time.monotonic() >= deadline:
                return fewest
            time.sleep(0.25)

    def start(self):
        self.log = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            missing = self.missing_samples()
            self.log.append((time.monotonic(), missing))
            time.sleep(SAMPLE_INTERVAL)

    def wait_complete(self, after, timeout):
        """Until a sample taken after `after` finds every key; False on timeout."""
        return wait_for(lambda: any(t > after and not m for t, m in self.log[-3:]), timeout, 0.005)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def summary(self, since, after=None):
        """restore_seconds: from `since` to the first complete sample taken after the
        last incomplete one (and after `after`, when the disruption ended); 0.0 if no
        sample was ever incomplete. max_sample_missing: the worst sample."""
        after = since if after is None else after
        last_gap = max((i for i, (_t, m) in enumerate(self.log) if m), default=None)
        if last_gap is None:
            back = 0.0
        else:
            complete = [t for i, (t, m) in enumerate(self.log) if i > last_gap and not m and t > after]
            back = complete[0] - since if complete else None
        return {"restore_seconds": None if back is None else round(back, 3),
                "lost": self.lost(),
                "max_sample_missing": max((m for _t, m in self.log), default=0),
                "sample_keys": sum(map(len, self.samples.values())), "samples": len(self.log)}

    def close(self):
        if self._thread is not None and self._thread.is_alive():
            self.stop()
        self.counter.close()


def measure_restore(workdir, count, timeout=60, memory=False):
    """Three restores of `count` bans; with memory=True also the daemon's RSS idle and with them."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(workdir)
    daemon = watch = None
    result = {"bans": count}
    try:
        host = lab.host("srv")
        log = workdir / "error.log"
        log.write_text("")
        policy = write_policy(workdir / "policy.yaml", log)
        daemon = TimedDaemon(lab, host, policy, workdir / "policyd.log")
        if memory:
            daemon.start()
            time.sleep(SETTLE_SECONDS)
            result["rss_idle_mb"], _peak = daemon.memory_mb()
            daemon.stop()

        seeded_at = time.monotonic()
        networks = [ipaddress.ip_network(n) for n in
                    seed_bans(state_dir(lab, host) / "state.db", policy, count)]
        result["seed_seconds"] = round(time.monotonic() - seeded_at, 1)
        watch = BanWatch(host.name, networks)

        # Cold start: the kernel has no ban table (a reboot, or the first start).
        host.nft("flush", "ruleset")
        watch.start()
        spawned = daemon.spawn()
        ready = daemon.wait_started(timeout)
        watch.wait_complete(spawned, timeout)
        watch.stop()
        result["cold_start"] = dict(watch.summary(spawned), daemon_ready_seconds=round(ready, 2))
        # `policyd status` is answered on the daemon's main loop: once it answers,
        # the start-up work (restore, first reconcile) is over.
        daemon.status()
        if memory:
            time.sleep(SETTLE_SECONDS)
            result["rss_bans_mb"], result["peak_rss_bans_mb"] = daemon.memory_mb()

        # Restart (systemctl restart): the bans must stay enforced throughout.
        watch.start()
        stopping = time.monotonic()
        daemon.stop()
        stop_seconds = time.monotonic() - stopping
        ready = daemon.start(timeout)
        watch.wait_complete(time.monotonic(), timeout)
        watch.stop()
        result["restart"] = dict(watch.summary(stopping), daemon_ready_seconds=round(ready, 2),
                                 stop_seconds=round(stop_seconds, 2))

        # Someone runs `nft flush ruleset` under the running, settled daemon.
        daemon.status()
        watch.start()
        time.sleep(0.05)
        flushing = time.monotonic()
        host.nft("flush", "ruleset")
        flushed = time.monotonic()
        watch.wait_complete(flushed, timeout)
        watch.stop()
        result["flush"] = dict(watch.summary(flushing, after=flushed),
                               flush_command_seconds=round(flushed - flushing, 3))
        daemon.stop()
        return result
    finally:
        if watch is not None:
            watch.close()
        if daemon is not None:
            try:
                daemon.stop()
            except RuntimeError:
                pass
        lab.close()
