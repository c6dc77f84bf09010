"""Offline filter throughput: `policyd test-filter` against `fail2ban-regex`, same file.

Owns generating the nginx error.log (bench/gen_nginx_error_log.py) in each mix
of failure lines, timing both tools as a user runs them (wall clock, start-up
included, best of a few runs; policyd as installed: its bytecode compiled, and
started by /usr/bin/python3 as fail2ban-regex is; policyd also pinned to one
CPU) and by their own account of the scan, and checking that both found the
same failures.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gen_nginx_error_log
from policyd_lab.netlab import INSTALLED_POLICYD

REPO = Path(__file__).resolve().parents[1]
FAIL2BAN_FILTER = "/etc/fail2ban/filter.d/nginx-http-auth.conf"


# Issue 14: every mix of lines, not one: 0.5%, 3%, 30% failures, and none at all.
MIXES = (0.005, 0.03, 0.3, 0.0)


def write_log(path, lines, failures=None):
    with open(path, "w", encoding="ascii") as out:
        for line in gen_nginx_error_log.lines(lines, failures=failures):
            out.write(line + "\n")
    return path


def _timed(args, **kwargs):
    started = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=True, **kwargs)
    return time.perf_counter() - started, out.stdout


def compile_policyd():
    """Bytecode for policyd's modules, as an installed package has it (Debian's
    py3compile): with PYTHONDONTWRITEBYTECODE set, a checkout would otherwise
    compile every module it imports on every run."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "policyd")], check=True,
                   stdout=subprocess.DEVNULL)


def _one_cpu():
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def policyd_scan(path, one_cpu=False):
    """One test-filter run; one_cpu: pinned to one CPU (it then scans in one process)."""
    wall, stdout = _timed([*INSTALLED_POLICYD, "test-filter", "nginx-auth", str(path), "--json"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)),
                          preexec_fn=_one_cpu if one_cpu else None)
    report = json.loads(stdout)
    return {"wall_seconds": round(wall, 3), "scan_seconds": report["seconds"],
            "lines": report["lines"], "matched": report["matched"]}


def fail2ban_scan(path):
    """One fail2ban-regex run."""
    wall, stdout = _timed(["fail2ban-regex", str(path), FAIL2BAN_FILTER])
    lines = re.search(r"^Lines: (\d+) lines, \d+ ignored, (\d+) matched", stdout, re.M)
    processed = re.search(r"\[processed in ([\d.]+) sec\]", stdout)
    if not lines or not processed:
        raise RuntimeError(f"cannot read fail2ban-regex's summary:\n{stdout[-2000:]}")
    return {"wall_seconds": round(wall, 3), "scan_seconds": float(processed.group(1)),
            "lines": int(lines.group(1)), "matched": int(lines.group(2))}


def _fastest(runs):
    return min(runs, key=lambda run: run["wall_seconds"])


def measure_mixes(workdir, lines=200000, mixes=MIXES, policyd_runs=3, fail2ban_runs=2):
    """measure_throughput for each share of failure lines in `mixes`, same run."""
    return [dict(measure_throughput(Path(workdir) / f"mix-{failures}", lines, policyd_runs,
                                    fail2ban_runs, failures=failures), failures=failures)
            for failures in mixes]


def measure_throughput(workdir, lines=200000, policyd_runs=3, fail2ban_runs=2, failures=None):
    Path(workdir).mkdir(parents=True, exist_ok=True)
    path = write_log(Path(workdir) / "error.log", lines, failures)
    compile_policyd()
    ours, one_cpu, theirs = [], [], []
    # The tools take turns and each keeps its fastest run: this host's speed moves
    # within minutes, and all of one tool's runs, then all of the other's, compared
    # the host's phases as much as the tools. test-filter scans a big log with
    # every usable CPU (two here); it runs on one CPU as well.
    for turn in range(max(policyd_runs, fail2ban_runs)):
        if turn < policyd_runs:
            ours.append(policyd_scan(path))
            one_cpu.append(policyd_scan(path, one_cpu=True))
        if turn < fail2ban_runs:
            theirs.append(fail2ban_scan(path))
    ours, one_cpu, theirs = _fastest(ours), _fastest(one_cpu), _fastest(theirs)
    if ours["matched"] != theirs["matched"] or ours["lines"] != lines or one_cpu["matched"] != ours["matched"]:
        raise RuntimeError(f"the tools disagree on {path}: policyd {ours}, fail2ban-regex {theirs}")
    return {
        "lines": lines, "matched": ours["matched"], "policyd": ours, "fail2ban": theirs,
        "policyd_one_cpu": one_cpu,
        "ratio_wall": round(theirs["wall_seconds"] / ours["wall_seconds"], 1),
        "ratio_wall_one_cpu": round(theirs["wall_seconds"] / one_cpu["wall_seconds"], 1),
        "ratio_scan": round(theirs["scan_seconds"] / ours["scan_seconds"], 1),
        "policyd_lines_per_second": round(lines / ours["wall_seconds"]),
        "fail2ban_lines_per_second": round(lines / theirs["wall_seconds"]),
    }


def main():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200000)
    parser.add_argument("--fail2ban-runs", type=int, default=2)
    args = parser.parse_args()
    import tempfile
    with tempfile.TemporaryDirectory(prefix="policyd-throughput-") as workdir:
        print(json.dumps(measure_mixes(workdir, args.lines, fail2ban_runs=args.fail2ban_runs), indent=2))


if __name__ == "__main__":
    main()
