#!/usr/bin/env python3
"""Ban latency while the daemon reloads a 100k-network policy over and over.

Owns the loop of reloads beside the shared ban latency measurement through real
nginx (bench/ban_latency.py), and the same measurement with no reloads on the
same daemon as the reference. The proxy's allowlist is the three documentation
/24s inline and a list file of 99,997 IPv6 /64s; each reload first rewrites the
list file (renamed over it, as cron jobs do), alternating between two versions
that differ in 1% of their lines (1,000 networks out, 1,000 in), then SIGHUPs
the daemon and waits for its `reloaded` line: the daemon's list watcher and the
reload both see a real change (parse 100k lines, compile, diff, load).
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
from policyd_daemon import POLICY, TimedDaemon, allowlist

CHURN = 0.01


def list_versions(count):
    """Two versions of the list file: the bench's /64s, and the same with CHURN of
    them replaced by /64s from 2001:db8:ff::/48 (outside the allowlist's range)."""
    networks = allowlist(count)[3:]
    changed = int(len(networks) * CHURN)
    other = [f"2001:db8:ff:{i:x}::/64" for i in range(changed)] + networks[changed:]
    return ["\n".join(networks) + "\n", "\n".join(other) + "\n"]


def write_list_policy(path, log_path, list_path, count):
    allow = [f'      - "{n}"' for n in allowlist(3)] + [f"      - file: {list_path}"]
    Path(list_path).write_text(list_versions(count)[0])
    Path(path).write_text(POLICY.format(log=log_path, allow="\n".join(allow)))
    return str(path)


class ReloadLoop:
    """In a thread: SIGHUP the daemon, wait for its `reloaded` line, again."""

    def __init__(self, daemon, list_path, versions, timeout=120.0):
        self.daemon, self.timeout = daemon, timeout
        self.list_path, self.versions = Path(list_path), versions
        self.seconds = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reloads(self):
        log = self.daemon.log()
        self.errors = log.count("reload failed")
        return log.count("reloaded ")

    def _run(self):
        turn = 0
        while not self._stop.is_set():
            turn += 1
            tmp = self.list_path.with_suffix(".new")
            tmp.write_text(self.versions[turn % 2])
            before = self._reloads()
            sent = time.monotonic()
            tmp.replace(self.list_path)
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
        list_path = workdir / "allow.txt"
        policy = write_list_policy(workdir / "policy.yaml", nginx.error_log, list_path, allow_count)
        daemon = TimedDaemon(world.lab, world.server, policy, workdir / "policyd.log")
        try:
            daemon.start(timeout=300)
            quiet = measure(world, min(40, trials), port=nginx.port, family=4, progress=progress)
            reloads = ReloadLoop(daemon, list_path, list_versions(allow_count))
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
    return {"allowlist": allow_count, "list_churn_lines": 2 * int((allow_count - 3) * CHURN),
            "quiet": quiet, "during_reloads": busy,
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
