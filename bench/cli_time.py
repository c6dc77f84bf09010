"""How long the operator's commands take with 100k networks and 100k bans, in a namespace.

Owns one throwaway namespace with a 100k-network list policy applied and 100k
bans restored by a running daemon, and times `doctor`, `status`, `bans` and
`explain` as an operator runs them (a fresh process each, start-up included):
with the daemon running (`bans` also right after a new ban, when the daemon
lists a changed book), and `status`, `bans`, `explain` again without it (`bans`
from the listing file the stopped daemon left, and with that file gone).
Also the daemon's ban latency (log line -> kernel element) while `policyd bans`
runs in a loop beside it, against the same latency with nothing else running:
answering an operator must not hold the main loop up.
"""
import compileall
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from apply_time import LIST_POLICY, networks
from policyd_lab.netlab import REPO, Lab, in_namespace
from policyd_daemon import TimedDaemon, seed_bans, state_dir

POLICY = LIST_POLICY + """\
bans:
  ports: [8080]
  logs:
    - path: {log}
      filter: nginx-auth
"""
RUNS = 5


BEST = {}  # "command [address]" -> the fastest of its RUNS runs, for result["best"]


def _time(host, *args, expect=(0,), before=None, name=None):
    """Median seconds of RUNS runs, or the error of a run that failed. before(i), if
    given, runs untimed ahead of each run (an error text from it ends the timing);
    `name` is the runs' key in BEST (default: the command and its address)."""
    seconds = []
    for i in range(RUNS):
        failed = before(i) if before is not None else None
        if failed:
            return failed
        started = time.perf_counter()
        out = host.policyd(*args, timeout=120, installed=True)
        seconds.append(time.perf_counter() - started)
        if out.returncode not in expect:
            return f"failed ({out.returncode}): {out.stderr.strip()[-200:]}"
    BEST[name or " ".join(args[:1] + args[2:3])] = round(min(seconds), 3)
    return round(statistics.median(seconds), 3)


def _time_reading_the_rows(host, listing):
    """`bans` without a daemon when no listing file matches the bans table (a
    daemon killed after a change): the rows are read again."""
    return _time(host, "bans", before=lambda _i: listing.unlink(missing_ok=True),
                 name="bans reading the rows")


def _time_after_a_ban(host):
    """`bans` right after a new ban each: the daemon has no listing of its book as
    it is then, and spells every ban again (the _time runs reuse it)."""
    def ban(i):
        if host.policyd("ban", f"2001:db8:1::{i + 1}", timeout=60).returncode != 0:
            return "failed: ban"
        return None
    return _time(host, "bans", before=ban, name="bans after a ban")


def _failure(address):
    return (f'{time.strftime("%Y/%m/%d %H:%M:%S")} [error] 1234#1234: *1 user "admin": '
            f'password mismatch, client: {address}, server: _, request: "GET / HTTP/1.1", '
            'host: "x"\n')


def _ban_latencies(host, log, addresses):
    """ms from appending maxretry+1 failures of each address to its ban in the kernel."""
    from policyd.kernel.nfnetlink import Netlink
    netlink = in_namespace(host.name, Netlink)
    out = []
    try:
        for address in addresses:
            key = bytes(int(part) for part in address.split("."))
            with open(log, "a") as file:
                file.write(_failure(address) * 6)
            started = time.perf_counter()
            while netlink.get_element("policyd_bans", "ban4", key) is None:
                if time.perf_counter() - started > 5:
                    break
                time.sleep(0.0005)
            out.append((time.perf_counter() - started) * 1000)
    finally:
        netlink.close()
    return out


def _summary(latencies):
    ordered = sorted(latencies)
    return {"n": len(ordered), "median_ms": round(statistics.median(ordered), 1),
            "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)], 1),
            "max_ms": round(ordered[-1], 1)}


def measure_stall(host, log, trials=60, runs_wanted=5):
    """Ban latency alone, then while `policyd bans` runs in a loop beside it (at
    least `runs_wanted` runs, one address per trial, spread over the runs)."""
    pool = [f"198.51.100.{i}" for i in range(1, 255)] + [f"192.0.2.{i}" for i in range(1, 255)]
    alone = _ban_latencies(host, log, pool[:trials // 2])
    pool = pool[trials // 2:]
    stop, runs = threading.Event(), []

    def operator():
        while not stop.is_set():
            runs.append(host.policyd("bans", timeout=120).returncode)
    thread = threading.Thread(target=operator)
    thread.start()
    during = []
    try:
        while (len(runs) < runs_wanted or len(during) < trials) and pool:
            during += _ban_latencies(host, log, [pool.pop(0)])
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    return {"alone": _summary(alone), "during_bans": _summary(during), "bans_runs": len(runs),
            "bans_failed": sum(1 for code in runs if code != 0)}


def measure_cli(workdir, count=100000, bans=100000):
    # The package ships byte-compiled modules (dh_python3); a checkout run with
    # PYTHONDONTWRITEBYTECODE would compile every module on every command instead.
    compileall.compile_dir(str(REPO / "policyd"), quiet=1)
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
            "bans_after_a_ban": _time_after_a_ban(host),
            "explain": _time(host, "explain", str(policy), v4[7].split("/")[0], "8080"),
            "explain_banned": _time(host, "explain", str(policy), banned, "8080"),
        }}
        result["best"] = {"with_daemon": dict(BEST)}
        BEST.clear()
        result["ban_latency"] = measure_stall(host, log)
        daemon.stop()
        result["without_daemon"] = {
            "status": _time(host, "status"),
            "bans": _time(host, "bans"),   # from the listing file the daemon left
            "bans_reading_the_rows": _time_reading_the_rows(
                host, state_dir(lab, host) / "bans.listing"),
            "explain": _time(host, "explain", str(policy), v4[7].split("/")[0], "8080"),
        }
        result["best"]["without_daemon"] = dict(BEST)
        return result
    finally:
        if daemon is not None:
            daemon.stop()
        lab.close()


if __name__ == "__main__":
    print(json.dumps(measure_cli(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cli-bench")),
                     indent=1))
