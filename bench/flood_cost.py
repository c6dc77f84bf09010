#!/usr/bin/env python3
"""The flood's ban path alone, in one process: microseconds per failure from record to kernel to state.

Owns a namespace holding the bench policy's tables, the flood's failures as
the filters hand them over ((address, filter, line time), classification not
timed), and driving them through the daemon's own ban path (policyd.intake, in
slices of READ_SLICE_LINES) against the real kernel and a real state file with
its writer thread. Reports main-thread CPU per failure split by section, the
wall time until the state writer is done, and optionally a cProfile.
"""
import argparse
import cProfile
import gc
import inspect
import ipaddress
import json
import logging
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "netns"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flood import MAXRETRY, source  # noqa: E402
from policyd_lab.netlab import Lab, in_namespace  # noqa: E402
from policyd_lab.policies import ban_policy, log_file  # noqa: E402


def flood_failures(sources, per_source, seed=14):
    """[(address, "nginx-auth", line time)] in the flood's shuffled order."""
    import random
    order = [i for i in range(sources) for _ in range(per_source)]
    random.Random(seed).shuffle(order)
    when = float(int(time.time()))
    addresses = {}
    return [(addresses.get(i) or addresses.setdefault(i, ipaddress.ip_address(source(i))),
             "nginx-auth", when) for i in order]


def measure(workdir, sources=100000, per_source=MAXRETRY, profile=None):
    from policyd.policy import reader as policy_mod
    from policyd.kernel.nft import Nft
    workdir = Path(workdir)
    lab = Lab(workdir)
    try:
        host = lab.host("cost")
        log_path = workdir / "flood.log"
        log_path.write_text("")
        policy_path = workdir / "policy.yaml"
        policy_path.write_text(ban_policy(log_file(workdir / "other.log"), log_file(log_path), ollama=True,
                                           maxretry=MAXRETRY))
        applied = host.policyd("apply", str(policy_path))
        if applied.returncode != 0:
            raise RuntimeError(f"policyd apply failed: {applied.stderr}")
        settings = policy_mod.load(str(policy_path)).bans
        nft = in_namespace(host.name, Nft)  # its netlink socket stays in the namespace
        failures = flood_failures(sources, per_source)
        return _drive(nft, settings, workdir / "state", failures, host, profile)
    finally:
        lab.close()


def _drive(nft, settings, state_dir, failures, host, profile):
    from policyd.daemon import core as daemon_mod, logs as daemon_logs
    from policyd.banning.banlog import BanLog
    from policyd.banning.bans import BanManager
    from policyd.kernel.nft import BanTable
    from policyd.banning.state import State
    from policyd.banning.statewriter import StateWriter
    state_dir.mkdir(parents=True)
    state = State(state_dir / "bans.sqlite")
    writer = StateWriter(state.path)
    writer.start()
    manager = BanManager(settings, state, BanTable(nft, "policyd_bans", settings.ipv6_prefix),
                         writer=writer)
    slice_lines = daemon_logs.READ_SLICE_LINES
    log_bans = BanLog().record
    # As the daemon does while a backlog is read (where the ban path knows how).
    hold = {"backlog": True} if "backlog" in inspect.signature(manager.write_state).parameters else {}
    profiler = cProfile.Profile() if profile else None
    sections = {"record": 0.0, "kernel": 0.0, "log": 0.0, "state": 0.0}
    slices = []
    # As the daemon runs a backlog: its GIL switch interval, no cyclic GC.
    sys.setswitchinterval(daemon_mod.GIL_SWITCH_SECONDS)
    gc.disable()
    started_wall, started_cpu = time.perf_counter(), time.thread_time()
    started_process = time.process_time()
    if profiler:
        profiler.enable()
    for start in range(0, len(failures), slice_lines):
        part = failures[start:start + slice_lines]
        began = time.thread_time()
        a = time.thread_time()
        bans = manager.record_failures(part)
        b = time.thread_time()
        if bans:
            manager.flush(write_state=False)
        c = time.thread_time()
        if bans:
            log_bans(bans)
        d = time.thread_time()
        manager.state_written(writer.collect())
        if writer.queued() < daemon_mod.STATE_BATCHES_QUEUED:
            manager.write_state(daemon_mod.STATE_CHUNK_ROWS, **hold)
        e = time.thread_time()
        sections["record"] += b - a
        sections["kernel"] += c - b
        sections["log"] += d - c
        sections["state"] += e - d
        slices.append(e - began)
    main_done = time.perf_counter()
    process_at_main_done = time.process_time() - started_process
    while manager.state_pending() or manager.state_in_flight():
        manager.state_written(writer.collect())
        if manager.state_pending() and writer.queued() < daemon_mod.STATE_BATCHES_QUEUED:
            manager.write_state(daemon_mod.STATE_CHUNK_ROWS)
        time.sleep(0.001)
    if profiler:
        profiler.disable()
    cpu = time.thread_time() - started_cpu
    process_cpu = time.process_time() - started_process
    gc.enable()
    state_done = time.perf_counter()
    writer.stop()
    kernel_bans = len(manager.kernel.list_ban_keys())
    rows = state.load_bans(time.time())
    failure_rows = len(state.load_failures(0.0))
    stored = state._read("SELECT count(*) FROM failures")[0][0]
    state.close()
    if profiler:
        profiler.dump_stats(profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    count = len(failures)
    slices.sort()
    return {
        "failures": count, "slice_lines": slice_lines,
        "main_cpu_us_per_failure": round(sum(sections.values()) / count * 1e6, 2),
        "sections_us_per_failure": {k: round(v / count * 1e6, 2) for k, v in sections.items()},
        "slice_cpu_ms": {"median": round(slices[len(slices) // 2] * 1000, 2),
                         "max": round(slices[-1] * 1000, 2)},
        "main_loop_seconds": round(main_done - started_wall, 2),
        "state_written_seconds": round(state_done - started_wall, 2),
        "main_thread_cpu_seconds_incl_drain": round(cpu, 2),
        "process_cpu_seconds_main_loop": round(process_at_main_done, 2),
        "process_cpu_seconds_incl_drain": round(process_cpu, 2),
        "kernel_bans": kernel_bans, "state_bans": len(rows),
        "state_failure_rows": stored, "state_failure_rows_live": failure_rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=100000)
    parser.add_argument("--per-source", type=int, default=MAXRETRY)
    parser.add_argument("--profile", help="write a cProfile of the ban path here and print its top")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    # The daemon logs to stderr or the journal; here the ban lines are formatted and dropped.
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="policyd-flood-cost-"))
    try:
        result = measure(workdir, args.sources, args.per_source, args.profile)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
