"""Ban latency on real nginx in namespaces: last failing response -> next SYN unanswered.

Owns the measurement shared by the policyd and fail2ban benchmarks: a bench world
(the namespace lab, a stand-in Ollama, nginx with basic auth), a fresh source
address per trial, and 1 ms SYN probes from inside the client namespace. What
follows nginx's error.log and bans (policyd or fail2ban) is the caller's business.
"""
import contextlib
import math
import socket
import statistics
import time
import weakref
from pathlib import Path


from policyd_lab.world import SERVER_WAN_V4, SERVER_WAN_V6, World  # noqa: E402
from policyd_lab.netlab import Lab, in_namespace  # noqa: E402
from policyd_lab.proxies import start_nginx, start_ollama_standin  # noqa: E402
from policyd_lab.webclient import http_get, syn_answered  # noqa: E402

WRONG = ("ollama", "wrong")
# Fresh sources: IPv4 /32s from the stranger's own /24, IPv6 from a fresh /64 each,
# because policyd bans IPv6 offenders by /64 and a second address in a banned /64
# would be dropped before its trial starts.
V4_SOURCES = [f"198.51.100.{i}" for i in range(32, 255)]
V6_ROUTE = "2001:db8:2::/48"


@contextlib.contextmanager
def nginx_world(workdir, error_log_level="error"):
    """(world, nginx): the conftest world with a stand-in Ollama and nginx on 8080.

    error_log_level defaults to Debian's `error`, which logs the auth failures and
    not the info-level noise of every probe connection.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(workdir)
    nginx = None
    try:
        world = World(lab)
        start_ollama_standin(world.server)
        nginx = start_nginx(world.server, workdir / "nginx", error_log_level=error_log_level)
        yield world, nginx
    finally:
        # Stopped first so its master reaps the workers (see tests/netns/test_proxies.py).
        if nginx is not None:
            nginx.stop()
        lab.close()


class FreshSources:
    """Hands out source addresses on the stranger that no earlier trial has used.

    One per world and family (see for_world), so a second measure() on the same
    world does not reuse sources the first one got banned.
    """

    _per_world = weakref.WeakKeyDictionary()

    @classmethod
    def for_world(cls, world, family):
        per_family = cls._per_world.setdefault(world, {})
        if family not in per_family:
            per_family[family] = cls(world, family)
        return per_family[family]

    def __init__(self, world, family):
        self.world, self.family = world, family
        self.used = 0
        if family == 6:
            world.server.ip("-6", "route", "replace", V6_ROUTE, "dev", "wan0")

    def next(self):
        index, self.used = self.used, self.used + 1
        if self.family == 4:
            if index >= len(V4_SOURCES):
                raise RuntimeError(f"only {len(V4_SOURCES)} fresh IPv4 sources; use family=6")
            address, prefix, extra = V4_SOURCES[index], "32", []
        else:
            address, prefix, extra = f"2001:db8:2:{index + 1:x}::20", "128", ["nodad"]
        added = self.world.stranger.ip("addr", "add", f"{address}/{prefix}", "dev", "eth0", *extra,
                                       check=False)
        if added.returncode != 0:
            raise RuntimeError(f"cannot add source {address} to the stranger: {added.stderr.strip()}")
        return address


class ProbeSockets:
    """Sockets made in the client namespace in batches, so a 1 ms probe does not pay
    for entering the namespace (about 0.2 ms a socket)."""

    BATCH = 256

    def __init__(self, host, family):
        self.host = host
        self.family = socket.AF_INET if family == 4 else socket.AF_INET6
        self.ready = []

    def take(self):
        if not self.ready:
            self.ready = in_namespace(self.host.name, self._batch)
        return self.ready.pop()

    def _batch(self):
        return [socket.socket(self.family, socket.SOCK_STREAM) for _ in range(self.BATCH)]

    def close(self):
        for sock in self.ready:
            sock.close()
        self.ready = []


def one_trial(world, source, server, port, probes, *, maxretry, probe_interval, probe_timeout,
              give_up, confirm_timeout):
    """Seconds from the last 401 and from the last request's send to the first
    unanswered probe (None, None on a miss), and the number of false alarms.

    nginx logs a failure before it sends the 401, so a fast enough ban can drop
    the 401 itself: that trial counts 0 from the response and has no time from
    the request (the ban came somewhere before the 401 would have arrived).
    """
    url = f"http://[{server}]:{port}/api/tags" if ":" in server else f"http://{server}:{port}/api/tags"
    for attempt in range(maxretry):
        sent_at = time.perf_counter()
        status = http_get(world.stranger, url, auth=WRONG, timeout=2.0, source=source)
        if status is None and attempt == maxretry - 1:
            return 0.0, None, 0
        if status != 401:
            raise RuntimeError(f"failing request {attempt + 1} from {source} got {status}, not 401: "
                               "the world is broken or the source was banned early")
    answered_at = time.perf_counter()
    false_alarms = 0
    next_probe = answered_at
    while True:
        probe_at = time.perf_counter()
        if probe_at - answered_at > give_up:
            return None, None, false_alarms
        if not syn_answered(world.stranger, server, port, probe_timeout, source, probes.take()):
            # A SYN-ACK delayed past probe_timeout by load is not a ban: confirm it.
            if not syn_answered(world.stranger, server, port, confirm_timeout, source):
                return probe_at - answered_at, probe_at - sent_at, false_alarms
            false_alarms += 1
        next_probe += probe_interval
        delay = next_probe - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def percentile(values, fraction):
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def measure(world, n, *, port=8080, family=4, maxretry=5, warmup=1, probe_interval=0.001,
            probe_timeout=0.1, give_up=5.0, confirm_timeout=0.5, progress=None):
    """Ban latency over n trials, each from a fresh source on the stranger.

    The world must already have nginx on `port` and something following its
    error.log that bans after `maxretry` failures. `warmup` trials run first and
    are not counted (a ban engine may build its table on the first ban). A trial
    with no drop within `give_up` seconds is a miss and counts as `give_up` in the
    percentiles. Returns a JSON-ready dict.
    """
    server = SERVER_WAN_V4 if family == 4 else SERVER_WAN_V6
    sources = FreshSources.for_world(world, family)
    probes = ProbeSockets(world.stranger, family)
    latencies, from_request, misses, false_alarms, responses_dropped = [], [], 0, 0, 0
    try:
        for index in range(warmup + n):
            seconds, since_request, alarms = one_trial(
                world, sources.next(), server, port, probes, maxretry=maxretry,
                probe_interval=probe_interval, probe_timeout=probe_timeout, give_up=give_up,
                confirm_timeout=confirm_timeout)
            if index < warmup:
                continue
            false_alarms += alarms
            if seconds is None:
                misses += 1
                seconds = since_request = give_up
            latencies.append(seconds)
            if since_request is None:
                responses_dropped += 1
            else:
                from_request.append(since_request)
            if progress:
                progress(index - warmup + 1, seconds)
    finally:
        probes.close()
    in_ms = [round(s * 1000, 2) for s in latencies]
    return {
        "trials": n, "family": family, "maxretry": maxretry, "warmup": warmup,
        "probe_interval_ms": probe_interval * 1000, "give_up_s": give_up,
        "median_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "min_ms": min(in_ms), "max_ms": max(in_ms),
        # From sending the last failing request: still meaningful when the ban
        # is faster than nginx's response and the figures above sit at 0.
        "from_request_median_ms": round(statistics.median(from_request) * 1000, 2) if from_request else None,
        "from_request_p99_ms": round(percentile(from_request, 0.99) * 1000, 2) if from_request else None,
        "responses_dropped": responses_dropped, "misses": misses, "false_alarms": false_alarms,
        "latencies_ms": in_ms,
    }
