#!/usr/bin/env python3
"""Ban latency while the daemon reloads a 100k-network policy over and over.

Owns the loop of reloads (SIGHUP, the next one as soon as the daemon logged the
last; each parses, compiles and loads 100k networks) beside the shared ban
latency measurement through real nginx (bench/ban_latency.py), and the same
measurement with no reloads on the same daemon as the reference.
"""
import argparse
import json
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from ban_latency import measure, nginx_world, percentile
from policyd_lab.netlab import wait_for
from policyd_daemon import TimedDaemon, write_policy


class ReloadLoop:
    """In a thread: SIGHUP the daemon, wait for its `reloaded` line, again."""

    def __init__(self, daemon, timeout=120.0):
        self.daemon, self.timeout = daemon, timeout
        self.seconds = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reloads(self):
        log = self.daemon.log()
        self.errors = log.count("reload failed")
        return log.count("reloaded ")

    def _run(self):
        while not self._stop.is_set():
            before = self._reloads()
            sent = time.monotonic()
            self.daemon.proc.send_signal(signal.SIGHUP)
            if not wait_for(lambda: self._reloads() > before or self._stop.is_set(), self.timeout, 0.02):
                return
            if self._reloads() > before:
                self.seconds.append(round(time.monotonic() - sent, 2))

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


# FreshSources has 223 IPv4 sources; the quiet run and warm-ups take some.
MAX_TRIALS = 160


def _merged(chunks):
    latencies = [ms / 1000 for c in chunks for ms in c["latencies_ms"]]
    return {"trials": len(latencies), "median_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2), "max_ms": max(c["max_ms"] for c in chunks),
            "misses": sum(c["misses"] for c in chunks)}


def measure_reload_latency(workdir, trials=50, allow_count=100000, progress=None, min_reloads=3,
                           pause=0.5):
    workdir = Path(workdir)
    with nginx_world(workdir) as (world, nginx):
        policy = write_policy(workdir / "policy.yaml", nginx.error_log, allow_count)
        daemon = TimedDaemon(world.lab, world.server, policy, workdir / "policyd.log")
        try:
            daemon.start(timeout=300)
            quiet = measure(world, min(40, trials), port=nginx.port, family=4, progress=progress)
            reloads = ReloadLoop(daemon)
            reloads.start()
            # The first reload is under way before the first counted trial.
            wait_for(lambda: "reloaded " in daemon.log() or reloads.seconds, 1.0, 0.05)
            try:
                # Trials in groups, paced so they span several reloads, not one.
                chunks = []
                while sum(c["trials"] for c in chunks) < trials or len(reloads.seconds) < min_reloads:
                    if sum(c["trials"] for c in chunks) + 10 > MAX_TRIALS:
                        break
                    chunks.append(measure(world, 10, port=nginx.port, family=4, warmup=0))
                    time.sleep(pause)
            finally:
                reloads.stop()
            busy = _merged(chunks)
            rss, peak = daemon.memory_mb()
        finally:
            daemon.stop()
    for result in (quiet, busy):
        result.pop("latencies_ms", None)
    return {"allowlist": allow_count, "quiet": quiet, "during_reloads": busy,
            "reloads": len(reloads.seconds), "reload_errors": reloads.errors,
            "reload_seconds": reloads.seconds, "rss_mb": rss, "peak_rss_mb": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--allowlist", type=int, default=100000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import tempfile
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="policyd-reload-"))

    def progress(n, s):
        if n % 10 == 0:
            print(f"trial {n}: {s * 1000:.1f} ms", file=sys.stderr)
    print(json.dumps(measure_reload_latency(workdir, args.trials, args.allowlist, progress), indent=2))


if __name__ == "__main__":
    main()
