#!/usr/bin/env python3
"""Fleet propagation: a ban in the publishing node's kernel -> the same ban in the last node's kernel.

Owns the measurement of SPEC's fleet target: five `policyd run` daemons, each
in its own namespace, and a redis-server on one bridged network
(tests/netns/fleetlab.py). Each trial bans a fresh address on n1 through its
control socket; `nft monitor new elements` in every node's namespace stamps the
moment each kernel holds the element (one monotonic clock for all namespaces).
Beside it, in the same run, the floor under any Redis design: plain XADD on n1
to a blocking XREAD on n5 over the same links.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from policyd_lab.fleetlab import STREAM_PREFIX, FleetLab  # noqa: E402
from policyd_lab.netlab import Lab, in_namespace  # noqa: E402
from policyd.operator import control  # noqa: E402

ELEMENT = re.compile(r"add element inet policyd_bans ban4 \{ ([0-9.]+) ")
SOURCES = [f"{a}.{b}" for a in ("198.51.100", "203.0.113") for b in range(1, 255)]
CROWDSEC_POLL_SECONDS = 10.0
TRIAL_TIMEOUT = 5.0


class KernelWatch:
    """`nft monitor new elements` in one namespace; address -> monotonic time first seen."""

    def __init__(self, host):
        self.seen = {}
        self.proc = host.popen("stdbuf", "-oL", "nft", "monitor", "new", "elements",
                               stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            now = time.monotonic()
            match = ELEMENT.search(line)
            if match:
                self.seen.setdefault(match.group(1), now)


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def summary(values_ms):
    return {"trials": len(values_ms), "median_ms": round(statistics.median(values_ms), 2),
            "p99_ms": round(percentile(values_ms, 0.99), 2), "max_ms": round(max(values_ms), 2)}


def redis_floor(world, trials):
    """XADD from n1's namespace -> XREAD BLOCK in n5's, with the admin user: the engine alone."""
    key = STREAM_PREFIX + "bench-floor"
    sender, receiver = world.nodes[0], world.nodes[-1]
    writer = in_namespace(sender.name, lambda: _connected(world))
    reader = in_namespace(receiver.name, lambda: _connected(world))
    cursor = "0-0"
    latencies = []
    for n in range(trials):
        result = {}

        def read():
            reply = reader.xread({key: cursor}, count=1, block=5000)
            result["at"] = time.monotonic()
            result["id"] = reply[0][1][0][0] if reply else None
        thread = threading.Thread(target=read)
        thread.start()
        time.sleep(0.01)  # the reader is blocked in XREAD
        sent = time.monotonic()
        writer.xadd(key, {"n": n})
        thread.join()
        if result.get("id") is None:
            raise RuntimeError("the floor's XREAD got nothing")
        cursor = result["id"]
        latencies.append((result["at"] - sent) * 1000)
    writer.delete(key)
    return summary(latencies)


def _connected(world):
    from policyd_lab.fleetlab import ADMIN_PASSWORD
    client = world.client("admin", ADMIN_PASSWORD)
    client.ping()  # the socket is made now, inside the namespace
    return client


def measure_fleet(workdir, trials=100, nodes=5, progress=None):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(workdir)
    world = None
    watches = []
    try:
        world = FleetLab(lab, count=nodes)
        world.start_redis()
        world.start_daemons({host: world.policy(host) for host in world.nodes})
        watches = [KernelWatch(host) for host in world.nodes]
        time.sleep(1.0)  # every monitor subscribed
        run_dir = lab.policyd_env(world.nodes[0])["POLICYD_RUN_DIR"]
        latencies, per_node, misses = [], {host.role: [] for host in world.nodes[1:]}, 0
        for n, address in enumerate(SOURCES[:trials + 1]):
            control.request(run_dir, "ban", address=address, duration="10m")
            deadline = time.monotonic() + TRIAL_TIMEOUT
            while time.monotonic() < deadline and not all(address in w.seen for w in watches):
                time.sleep(0.002)
            if not all(address in w.seen for w in watches):
                misses += 1
                continue
            if n == 0:
                continue  # warm-up: first imports and connections
            origin = watches[0].seen[address]
            for host, watch in zip(world.nodes[1:], watches[1:]):
                per_node[host.role].append((watch.seen[address] - origin) * 1000)
            latencies.append((max(w.seen[address] for w in watches[1:]) - origin) * 1000)
            if progress:
                progress(n, latencies[-1])
            time.sleep(0.02)
        if not latencies:
            raise RuntimeError("no trial propagated")
        result = summary(latencies)
        result.update(nodes=nodes, misses=misses,
                      per_node_median_ms={role: round(statistics.median(v), 2)
                                          for role, v in per_node.items() if v},
                      redis_floor=redis_floor(world, min(trials, 100)),
                      crowdsec_poll_seconds=CROWDSEC_POLL_SECONDS)
        applied = world.status(world.nodes[-1])["fleet"]
        result["last_node_applied"] = applied["applied"]
        result["rss_mb_last_node"] = rss_mb(world.daemons[world.nodes[-1].role].proc.pid)
        return result
    finally:
        for watch in watches:
            watch.proc.kill()
        if world is not None:
            world.stop_all()
        lab.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="policyd-fleet-bench-") as workdir:
        result = measure_fleet(workdir, args.trials, args.nodes,
                               progress=lambda n, ms: print(f"   trial {n}: {ms:.1f} ms", file=sys.stderr)
                               if n % 20 == 0 else None)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
