#!/usr/bin/env python3
"""A flood of failures: 300k lines from 100k sources written at once, policyd beside fail2ban.

Owns the flood log (nginx error.log lines with the current time, IPv6 sources in
distinct /64s of 2001:db8:8000::/33, order shuffled with a fixed seed), the
time until every source is banned in the kernel, new attackers' ban latency
through real nginx while the daemon works through the flood, the daemon's RSS
throughout and after, and fail2ban on the same lines (stopped after a bound).

The flood goes to a second log the daemon follows (another vhost's error.log);
the new attackers fail against real nginx, whose error.log is the first log.
A line behind 300k unread lines in the *same* file cannot be banned before they
are read; what this measures is that a flood does not stall the daemon.
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ban_latency import FreshSources, ProbeSockets, nginx_world, one_trial, percentile
from policyd_lab.world import SERVER_WAN_V4
from policyd_lab.netlab import wait_for
from policyd_lab.policies import ban_policy, log_file
from policyd_daemon import BAN_TABLE, TimedDaemon
from setcount import SetCounter

MAXRETRY = 3
SAMPLE_KEYS = 64
WATCH_KEYS = 16   # looked up per turn of the watch (every 2 ms)
# Floods per measurement, each with a fresh daemon: the median run is reported
# (this host's speed moves within minutes; one run is one draw of it).
FLOOD_RUNS = 3


def source(i):
    """The i-th flood source: one address in its own /64 (policyd bans IPv6 by /64)."""
    return f"2001:db8:{0x8000 + (i >> 16):x}:{i & 0xFFFF:x}::7"


def source_key(i):
    """The kernel key of the i-th source's ban: its /64's first address, packed."""
    return bytes.fromhex(f"20010db8{0x8000 + (i >> 16):04x}{i & 0xFFFF:04x}") + bytes(8)


def flood_lines(sources, per_source, seed=14):
    """(bytes of every line, order of sources by the line that completes them)."""
    order = [i for i in range(sources) for _ in range(per_source)]
    random.Random(seed).shuffle(order)
    stamp = time.strftime("%Y/%m/%d %H:%M:%S")
    seen, completed = {}, []
    lines = []
    for n, i in enumerate(order):
        lines.append(f'{stamp} [error] 4242#4242: *{n + 1} user "admin{n % 97}": password mismatch, '
                     f'client: {source(i)}, server: ollama.example.org, request: "POST /api/chat HTTP/1.1", '
                     f'host: "ollama.example.org"\n')
        seen[i] = seen.get(i, 0) + 1
        if seen[i] == per_source:
            completed.append(i)
    return "".join(lines).encode(), completed


def cpu_seconds(pid):
    """User + system CPU the process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_memory_mb(pid):
    """(RSS, PSS) of the process's children together (the lookahead child during a
    flood): its RSS counts the pages it shares with the daemon, its PSS a share."""
    rss = pss = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return rss, pss
    for child in children:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{child}/smaps_rollup").read_text()
                          .splitlines()[1:])
        except (OSError, ValueError):
            continue   # gone meanwhile
        rss += int(fields["Rss"].split()[0]) / 1024
        pss += int(fields["Pss"].split()[0]) / 1024
    return rss, pss


def rss_mb(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


class FloodWatch:
    """In a thread: the moment the last flood sources are banned, and the daemon's RSS."""

    def __init__(self, namespace, keys, pid):
        self.counter = SetCounter(namespace)
        self.keys, self.pid = keys, pid
        self.done_at = self.done_cpu = None
        self.rss = []
        self.children = []   # (RSS, PSS) of the daemon's children, when it had any
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        last_rss = 0.0
        waiting = list(self.keys)
        while not self._stop.is_set():
            now = time.monotonic()
            if waiting:
                # A ban stays (bantime 1h): only keys not seen banned yet are looked up,
                # WATCH_KEYS a time, so the watch takes little of the CPU the daemon
                # works with (all 72 every 2 ms kept a CPU half busy).
                waiting[:WATCH_KEYS] = self.counter.absent(BAN_TABLE, "ban6", waiting[:WATCH_KEYS])
                if not waiting:
                    self.done_at = now
                    self.done_cpu = cpu_seconds(self.pid)
            if now - last_rss >= 0.05:
                last_rss = now
                self.rss.append((now, rss_mb(self.pid)[0]))
                children = children_memory_mb(self.pid)
                if children[0]:
                    self.children.append(children)
            time.sleep(0.002)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.counter.close()


def measure_policyd_flood(workdir, sources=100000, per_source=3, settle=2.0, give_up=60.0):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, completed = flood_lines(sources, per_source)
    with nginx_world(workdir / "world") as (world, nginx):
        flood_log = workdir / "flood.log"
        flood_log.write_text("")
        policy = workdir / "policy.yaml"
        policy.write_text(ban_policy(log_file(nginx.error_log), log_file(flood_log), ollama=True,
                                     maxretry=MAXRETRY))
        daemon = TimedDaemon(world.lab, world.server, policy, workdir / "policyd.log")
        watch = None
        try:
            daemon.start()
            pid = daemon.pid
            time.sleep(settle)
            idle_rss, _ = rss_mb(pid)
            # The last sources to reach maxretry, and some spread over the flood.
            stride = max(1, len(completed) // SAMPLE_KEYS)
            keys = [source_key(i) for i in completed[::stride] + completed[-8:]]
            watch = FloodWatch(world.server.name, keys, pid)
            sources_v4 = FreshSources.for_world(world, 4)
            probes = ProbeSockets(world.stranger, 4)
            server = SERVER_WAN_V4
            # Warm the path once (first ban, probe sockets) before the flood.
            one_trial(world, sources_v4.next(), server, nginx.port, probes, maxretry=MAXRETRY,
                      probe_interval=0.001, probe_timeout=0.1, give_up=5.0, confirm_timeout=0.5)
            watch.start()
            cpu_at_write = cpu_seconds(pid)
            written_at = time.monotonic()
            with open(flood_log, "ab") as out:
                out.write(data)
            write_seconds = time.monotonic() - written_at
            latencies, misses = [], 0
            while watch.done_at is None and time.monotonic() - written_at < give_up:
                seconds, _since_request, _alarms = one_trial(
                    world, sources_v4.next(), server, nginx.port, probes, maxretry=MAXRETRY,
                    probe_interval=0.001, probe_timeout=0.1, give_up=5.0, confirm_timeout=0.5)
                if seconds is None:
                    misses += 1
                    seconds = 5.0
                latencies.append(seconds)
            wait_for(lambda: watch.done_at is not None, timeout=max(0.0, give_up - (time.monotonic() - written_at)),
                     interval=0.01)
            done_at = watch.done_at
            time.sleep(settle)
            after_rss, peak = rss_mb(pid)
            watch.stop()
            probes.close()
            banned = SetCounter(world.server.name)
            try:
                kernel_bans = banned.count(BAN_TABLE, "ban6")
            finally:
                banned.close()
            during = [mb for t, mb in watch.rss]
            return {
                "lines": sources * per_source, "sources": sources, "maxretry": MAXRETRY,
                "bytes": len(data), "write_seconds": round(write_seconds, 3),
                "all_banned_seconds": None if done_at is None else round(done_at - written_at, 2),
                # The daemon's CPU (all threads) from the write until all were banned: what a
                # shared, loaded machine distorts far less than the wall time.
                "all_banned_cpu_seconds": None if watch.done_cpu is None
                else round(watch.done_cpu - cpu_at_write, 2),
                "kernel_bans": kernel_bans,
                "latency": _latency_summary(latencies, misses),
                "rss_idle_mb": round(idle_rss, 1), "rss_max_during_mb": round(max(during), 1) if during else None,
                "rss_after_mb": round(after_rss, 1), "rss_peak_mb": round(peak, 1),
                "child_rss_max_mb": round(max((rss for rss, _pss in watch.children), default=0.0), 1),
                "child_pss_max_mb": round(max((pss for _rss, pss in watch.children), default=0.0), 1),
            }
        finally:
            if watch is not None and watch._thread.is_alive():
                watch.stop()
            daemon.stop()


def measure_policyd_floods(workdir, sources=100000, per_source=3, runs=FLOOD_RUNS):
    """measure_policyd_flood `runs` times: the run with the median time to all banned,
    the time and CPU of every run, new attackers' latencies of all runs together,
    and the most RSS any run had."""
    taken = [measure_policyd_flood(Path(workdir) / f"run-{number}", sources, per_source)
             for number in range(runs)]
    timed = sorted(taken, key=lambda run: (run["all_banned_seconds"] is None, run["all_banned_seconds"] or 0))
    result = dict(timed[len(timed) // 2])
    result["runs"] = [{key: run[key] for key in ("all_banned_seconds", "all_banned_cpu_seconds", "kernel_bans",
                                                  "rss_peak_mb")} for run in taken]
    result["kernel_bans"] = min(run["kernel_bans"] for run in taken)
    for key in ("rss_max_during_mb", "rss_after_mb", "rss_peak_mb", "child_rss_max_mb", "child_pss_max_mb"):
        result[key] = max(run[key] or 0 for run in taken)
    latencies = [ms / 1000 for run in taken for ms in run["latency"]["latencies_ms"]]
    misses = sum(run["latency"]["misses"] for run in taken)
    result["latency"] = _latency_summary(latencies, misses)
    return result


def _latency_summary(latencies, misses):
    in_ms = [round(s * 1000, 2) for s in latencies]
    return {"trials": len(latencies), "misses": misses,
            "median_ms": round(sorted(latencies)[len(latencies) // 2] * 1000, 2) if latencies else None,
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
            "max_ms": max(in_ms) if in_ms else None, "latencies_ms": in_ms}


def measure_fail2ban_flood(workdir, sources=100000, per_source=3, bound=60.0):
    """fail2ban-server on the same flood: how many sources it banned within `bound` seconds."""
    from fail2ban_latency import JAIL, SET_V6, Fail2ban, fail2ban_version, set_size
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, _completed = flood_lines(sources, per_source)
    result = {"tool": f"fail2ban {fail2ban_version()}", "bound_seconds": bound}
    with nginx_world(workdir / "world") as (world, nginx):
        flood_log = workdir / "flood.log"
        flood_log.write_text("")
        fail2ban = Fail2ban(world.server, workdir / "fail2ban", flood_log, nginx.port)
        jail = fail2ban.conf / "jail.local"
        jail.write_text(jail.read_text().replace("maxretry = 5", f"maxretry = {MAXRETRY}"))
        try:
            fail2ban.start()
            written_at = time.monotonic()
            with open(flood_log, "ab") as out:
                out.write(data)
            samples = []
            while time.monotonic() - written_at < bound:
                time.sleep(5.0)
                samples.append((round(time.monotonic() - written_at, 1), set_size(world.server, SET_V6)))
                if samples[-1][1] >= sources:
                    break
            try:
                status = fail2ban.host.exec("fail2ban-client", *fail2ban._paths(), "status", JAIL,
                                            check=False, timeout=60).stdout
            except subprocess.TimeoutExpired:
                status = ""  # too busy to answer: the kernel's count stands
            result.update({
                "seconds": samples[-1][0], "kernel_bans": samples[-1][1],
                "banned_per_second": round(samples[-1][1] / samples[-1][0], 1),
                "total_failed": _status_number(status, "Total failed"),
                "total_banned": _status_number(status, "Total banned"),
                "all_banned": samples[-1][1] >= sources, "samples": samples,
            })
        finally:
            fail2ban.kill()
    return result


def _status_number(text, label):
    found = re.search(rf"{label}:\s*(\d+)", text)
    return int(found.group(1)) if found else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=100000)
    parser.add_argument("--per-source", type=int, default=MAXRETRY)
    parser.add_argument("--runs", type=int, default=FLOOD_RUNS)
    parser.add_argument("--fail2ban-bound", type=float, default=60.0, help="0 skips fail2ban")
    parser.add_argument("--workdir", help="keep files here instead of a temporary directory")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="policyd-flood-"))
    try:
        result = {"policyd": measure_policyd_floods(workdir / "policyd", args.sources, args.per_source, args.runs)}
        print(json.dumps(result["policyd"]), file=sys.stderr, flush=True)
        if args.fail2ban_bound and shutil.which("fail2ban-server"):
            result["fail2ban"] = measure_fail2ban_flood(workdir / "fail2ban", args.sources, args.per_source,
                                                        args.fail2ban_bound)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
