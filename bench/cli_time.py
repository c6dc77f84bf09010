"""How long the operator's commands take with 100k networks and 100k bans, in a namespace.

Owns one throwaway namespace with a 100k-network list policy applied and 100k
bans restored by a running daemon, and times `doctor`, `status`, `bans` and
`explain` as an operator runs them (a fresh process each, start-up included):
with the daemon running, and `status`, `bans`, `explain` again without it.
"""
import json
import statistics
import time
from pathlib import Path

from apply_time import LIST_POLICY, networks
from policyd_lab.netlab import Lab
from policyd_daemon import TimedDaemon, seed_bans, state_dir

POLICY = LIST_POLICY + """\
bans:
  ports: [8080]
  logs:
    - path: {log}
      filter: nginx-auth
"""
RUNS = 5


def _time(host, *args, expect=(0,)):
    """Median seconds of RUNS runs, or the error of a run that failed."""
    seconds = []
    for _ in range(RUNS):
        started = time.perf_counter()
        out = host.policyd(*args, timeout=120)
        seconds.append(time.perf_counter() - started)
        if out.returncode not in expect:
            return f"failed ({out.returncode}): {out.stderr.strip()[-200:]}"
    return round(statistics.median(seconds), 3)


def measure_cli(workdir, count=100000, bans=100000):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    v4, v6 = networks(count)
    list_path = workdir / "allow.txt"
    list_path.write_text("\n".join(v4 + v6) + "\n")
    log = workdir / "error.log"
    log.write_text("")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY.format(path=list_path, log=log))
    lab = Lab(workdir)
    daemon = None
    try:
        host = lab.host("srv")
        if host.policyd("apply", str(policy), "--force", timeout=300).returncode != 0:
            raise RuntimeError("apply failed")
        seed = seed_bans(state_dir(lab, host) / "state.db", policy, bans)
        daemon = TimedDaemon(lab, host, policy, workdir / "policyd.log")
        daemon.start()
        daemon.status()  # start-up work (restore of the bans) is over
        banned = seed[-1].split("/")[0]
        result = {"networks": count, "bans": bans, "with_daemon": {
            # doctor exits 1 for its warnings here (nothing listens on 8080).
            "doctor": _time(host, "doctor", str(policy), expect=(0, 1)),
            "status": _time(host, "status"),
            "bans": _time(host, "bans"),
            "explain": _time(host, "explain", str(policy), v4[7].split("/")[0], "8080"),
            "explain_banned": _time(host, "explain", str(policy), banned, "8080"),
        }}
        daemon.stop()
        result["without_daemon"] = {
            "status": _time(host, "status"),
            "bans": _time(host, "bans"),
            "explain": _time(host, "explain", str(policy), v4[7].split("/")[0], "8080"),
        }
        return result
    finally:
        if daemon is not None:
            daemon.stop()
        lab.close()


if __name__ == "__main__":
    import sys
    print(json.dumps(measure_cli(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cli-bench")),
                     indent=1))
