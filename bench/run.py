#!/usr/bin/env python3
"""`make bench`: every measurement of issue 7, policyd beside fail2ban, in one run.

Owns the order and the sizes: (a) filter throughput, (b) ban latency, (c)
restore, (d) apply time beside `nft -f` and a list change under the daemon,
(e) daemon memory, (f) doctor/status/bans/explain with 100k networks and 100k
bans; fail2ban runs as
bench/fail2ban_latency.py in its own namespaces. Prints the table, writes it to
bench/results/latest.md (and .json) and, for a full-size run, to bench/RESULTS.md.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from apply_time import measure_apply  # noqa: E402
from fleet_latency import measure_fleet  # noqa: E402
from flood import measure_fail2ban_flood, measure_policyd_floods  # noqa: E402
from cli_time import measure_cli  # noqa: E402
from policyd_latency import measure_policyd  # noqa: E402
from reload_latency import measure_reload_latency  # noqa: E402
from restore import measure_restore  # noqa: E402
from throughput import measure_mixes, measure_throughput  # noqa: E402

FULL = {"lines": 200000, "trials": 50, "allowlist": 100000, "restore": [2000, 100000],
        "apply_networks": 100000, "fail2ban_trials": 50, "fail2ban_restore": 2000,
        "fleet_trials": 100, "flood_sources": 100000, "fail2ban_flood_seconds": 60, "reload_trials": 60,
        "cli_bans": 100000}


def step(text):
    print(f"==> {text}", file=sys.stderr, flush=True)


def run_fail2ban(trials, restore_bans, workdir, quiet):
    """bench/fail2ban_latency.py's JSON; it keeps fail2ban inside its own namespaces."""
    if shutil.which("fail2ban-server") is None:
        return {"error": "fail2ban is not installed (make setup installs it)"}
    out = subprocess.run([sys.executable, str(BENCH / "fail2ban_latency.py"), "--trials", str(trials),
                          "--restore-bans", str(restore_bans), "--workdir", str(workdir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"fail2ban_latency.py failed ({out.returncode}): {(out.stderr or '')[-2000:]}")
    return json.loads(out.stdout)


def measure_all(sizes, workdir, quiet=False):
    workdir = Path(workdir)
    results = {"sizes": sizes}
    progress = None if quiet else (lambda n, s: print(f"   trial {n}: {s * 1000:.1f} ms", file=sys.stderr)
                                   if n % 10 == 0 else None)

    step(f"(a) filter throughput on {sizes['lines']:,} nginx error.log lines: policyd vs fail2ban-regex")
    results["throughput"] = measure_throughput(workdir / "throughput", sizes["lines"])

    step(f"(b) policyd ban latency, {sizes['trials']} trials through real nginx")
    results["latency"] = measure_policyd(workdir / "latency", sizes["trials"], progress=progress)
    step(f"(b) policyd ban latency with a {sizes['allowlist']:,}-network allowlist loaded")
    results["latency_allowlist"] = measure_policyd(workdir / "latency-allow", sizes["trials"],
                                                   allow_count=sizes["allowlist"], progress=progress)

    step(f"(b, c) fail2ban: {sizes['fail2ban_trials']} latency trials, restore of "
         f"{sizes['fail2ban_restore']:,} bans (fail2ban is slow; this takes a while)")
    results["fail2ban"] = run_fail2ban(sizes["fail2ban_trials"], sizes["fail2ban_restore"],
                                       workdir / "fail2ban", quiet)

    results["restore"] = []
    largest = max(sizes["restore"])
    for count in sizes["restore"]:
        step(f"(c{', e' if count == largest else ''}) policyd restore of {count:,} bans: cold start, "
             "restart, flushed ruleset" + (" ; daemon memory" if count == largest else ""))
        restore = measure_restore(workdir / f"restore-{count}", count, memory=count == largest)
        if count == largest:
            results["memory"] = {"bans": count, "rss_idle_mb": restore.pop("rss_idle_mb"),
                                 "rss_bans_mb": restore.pop("rss_bans_mb"),
                                 "peak_rss_bans_mb": restore.pop("peak_rss_bans_mb")}
        results["restore"].append(restore)

    step(f"(d) apply {sizes['apply_networks']:,} networks (list file, then YAML) beside nft -f "
         "of the same ruleset; a 1% list change under the daemon")
    results["apply"] = measure_apply(workdir / "apply", sizes["apply_networks"])

    if sizes.get("fleet_trials"):
        step(f"(f) fleet: {sizes['fleet_trials']} bans on one node -> kernels of all five, over Redis")
        results["fleet"] = measure_fleet(workdir / "fleet", sizes["fleet_trials"])
    step(f"(a) filter throughput in every mix of failures, {sizes['lines']:,} lines each")
    results["throughput_mixes"] = measure_mixes(workdir / "mixes", sizes["lines"])
    step(f"(f) flood: {sizes['flood_sources'] * 3:,} failure lines from {sizes['flood_sources']:,} sources "
         "at once; new attackers meanwhile; daemon memory")
    results["flood"] = measure_policyd_floods(workdir / "flood", sizes["flood_sources"])
    step(f"(f) fail2ban on the same flood, stopped after {sizes['fail2ban_flood_seconds']} s")
    results["fail2ban_flood"] = (measure_fail2ban_flood(workdir / "flood-f2b", sizes["flood_sources"],
                                                        bound=sizes["fail2ban_flood_seconds"])
                                 if shutil.which("fail2ban-server") else {"error": "fail2ban is not installed"})
    step(f"(g) ban latency while the daemon reloads a {sizes['allowlist']:,}-network policy in a loop")
    results["reload_latency"] = measure_reload_latency(workdir / "reloads", sizes["reload_trials"],
                                                       sizes["allowlist"])
    step(f"(f) doctor, status, bans, explain with {sizes['apply_networks']:,} networks and "
         f"{sizes['cli_bans']:,} bans")
    results["cli"] = measure_cli(workdir / "cli", sizes["apply_networks"], sizes["cli_bans"])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BENCH / "results"), help="where latest.md and latest.json go")
    parser.add_argument("--lines", type=int, default=FULL["lines"])
    parser.add_argument("--trials", type=int, default=FULL["trials"])
    parser.add_argument("--allowlist", type=int, default=FULL["allowlist"])
    parser.add_argument("--restore", default=",".join(map(str, FULL["restore"])),
                        help="comma-separated ban counts")
    parser.add_argument("--apply-networks", type=int, default=FULL["apply_networks"])
    parser.add_argument("--fail2ban-trials", type=int, default=FULL["fail2ban_trials"])
    parser.add_argument("--fail2ban-restore", type=int, default=FULL["fail2ban_restore"])
    parser.add_argument("--fleet-trials", type=int, default=FULL["fleet_trials"])
    parser.add_argument("--flood-sources", type=int, default=FULL["flood_sources"])
    parser.add_argument("--fail2ban-flood-seconds", type=float, default=FULL["fail2ban_flood_seconds"])
    parser.add_argument("--reload-trials", type=int, default=FULL["reload_trials"])
    parser.add_argument("--cli-bans", type=int, default=None,
                        help="bans for the (f) command timings (default: --apply-networks)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    sizes = {"lines": args.lines, "trials": args.trials, "allowlist": args.allowlist,
             "restore": [int(n) for n in args.restore.split(",")], "apply_networks": args.apply_networks,
             "fail2ban_trials": args.fail2ban_trials, "fail2ban_restore": args.fail2ban_restore,
             "fleet_trials": args.fleet_trials,
             "flood_sources": args.flood_sources, "fail2ban_flood_seconds": args.fail2ban_flood_seconds,
             "reload_trials": args.reload_trials,
             "cli_bans": args.apply_networks if args.cli_bans is None else args.cli_bans}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
    try:
        results = measure_all(sizes, workdir, args.quiet)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info = report.machine()
    results["machine"] = info
    results["seconds"] = round(time.monotonic() - started)
    table = report.markdown(results, info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(table)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    if sizes == FULL:
        # The committed copy carries only full-size runs, never a quick one.
        (BENCH / "RESULTS.md").write_text(
            "# Benchmark results\n\nWritten by `make bench` (bench/run.py); "
            "see bench/README.md for how each number is measured.\n\n" + table)
    print(table)
    missed = report.missed(results)
    print(f"{len(missed)} target(s) missed" + (": " + "; ".join(missed) if missed else "")
          + f" ({results['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
