"""The daemon's text -> failures step on a flood: CPU microseconds per line.

Owns measuring what `Daemon._file_failures` does between reading a slice of
lines and handing failures to the ban engine (the forged-line judge and the
filter), on bench/flood.py's lines (300k failures from 100k sources), in slices
of the daemon's READ_SLICE_LINES. `--per-line` times the per-line loop the
daemon ran before policyd.logs.guard.failures_from (it runs on any checkout, for a
before/after in one run: PYTHONPATH=OLD_CHECKOUT python bench/flood_classify.py --per-line).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flood import flood_lines  # noqa: E402

from policyd.logs.filters import _HOST_CACHE, Failure, Outcome, load_filter  # noqa: E402
from policyd.logs.guard import judge_for  # noqa: E402

SLICE = 500   # policyd.daemon.logs.READ_SLICE_LINES


def per_line(judge, lines):
    """The daemon's loop before failures_from, outcome by outcome."""
    failures, malformed = [], 0
    for outcome in judge.judge(lines, False):
        if outcome is Outcome.MALFORMED:
            malformed += 1
        elif isinstance(outcome, Failure):
            failures.append((outcome.host, outcome.filter, outcome.time))
    return failures


def bulk(judge, lines):
    from policyd.logs.guard import failures_from
    return failures_from(judge, lines, False)[0]


def measure(step, lines, runs):
    best, found = None, None
    for _ in range(runs):
        judge = judge_for(load_filter("nginx-auth"))
        _HOST_CACHE.clear()   # each run starts cold, as the daemon meets a flood
        started = time.process_time()
        found = []
        for at in range(0, len(lines), SLICE):
            found.extend(step(judge, lines[at:at + SLICE]))
        spent = time.process_time() - started
        best = spent if best is None else min(best, spent)
    return best, found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=100000)
    parser.add_argument("--per-source", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-line", action="store_true", help="only the per-line loop")
    args = parser.parse_args()
    lines = flood_lines(args.sources, args.per_source)[0].split(b"\n")[:-1]
    report = {"lines": len(lines)}
    steps = {"per_line": per_line} if args.per_line else {"per_line": per_line, "bulk": bulk}
    results = {}
    for name, step in steps.items():
        seconds, results[name] = measure(step, lines, args.runs)
        report[f"{name}_us_per_line"] = round(seconds / len(lines) * 1e6, 2)
        report[f"{name}_failures"] = len(results[name])
    if len(results) == 2 and [tuple(f) for f in results["bulk"]] != results["per_line"]:
        raise SystemExit("the bulk step and the per-line loop disagree")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
