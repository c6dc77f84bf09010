"""policyd's ban latency on real nginx, by the shared method of bench/ban_latency.py.

Owns running `policyd run` beside nginx in the bench world, optionally with a
100k-network allowlist on the proxy port, and checking that every trial's ban
shows up in the daemon's log as one `ban addr=...` line.
"""
from pathlib import Path

from ban_latency import measure, nginx_world
from policyd_daemon import TimedDaemon, write_policy


def measure_policyd(workdir, trials, allow_count=0, progress=None, warmup=1):
    """Ban latency over `trials` fresh sources; a JSON-ready dict (see ban_latency.measure)."""
    workdir = Path(workdir)
    with nginx_world(workdir) as (world, nginx):
        policy = write_policy(workdir / "policy.yaml", nginx.error_log, allow_count)
        daemon = TimedDaemon(world.lab, world.server, policy, workdir / "policyd.log")
        try:
            started_in = daemon.start()
            result = measure(world, trials, port=nginx.port, family=4, warmup=warmup,
                             progress=progress)
            result["allowlist"] = allow_count
            result["daemon_started_seconds"] = round(started_in, 2)
            result["rss_mb"], result["peak_rss_mb"] = daemon.memory_mb()
        finally:
            daemon.stop()
        ban_lines = daemon.log().count(" ban addr=")
        if ban_lines != trials + warmup:
            raise RuntimeError(f"{trials + warmup} trials but the daemon logged {ban_lines} bans:\n"
                               + daemon.log()[-3000:])
        return result
