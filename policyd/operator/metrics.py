"""The daemon's Prometheus metrics: the metric sets, the daemon's and the fleet's
(their names are a contract, see README), the snapshot the main loop publishes for the gauges, and the
loopback-only HTTP endpoint. Exposition and process metrics: python3-prometheus-client.
"""

import ipaddress
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# 0.16 adds a `_created` series to every counter and histogram unless this is set
# when the library is first imported (0.17 has disable_created_metrics()): twice
# the lines, for a timestamp nothing of ours reads.
os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter,  # noqa: E402
                               Histogram, ProcessCollector, generate_latest)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

from policyd.errors import InputError  # noqa: E402

log = logging.getLogger(__name__)

STOP_POLL_SECONDS = 0.1  # how quickly stop() is noticed by serve_forever
CONTENT_TYPE = CONTENT_TYPE_LATEST
LISTEN = re.compile(r"(?:\[(?P<v6>[^\[\]]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})\Z")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
APPLY_KINDS = ("plain", "trial", "confirm", "rollback", "restore")


def new_registry() -> CollectorRegistry:
    """A registry of our own (never the library's global one), with the process's
    resident memory, CPU seconds and open file descriptors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


@dataclass(frozen=True)
class SnapshotGauge:
    name: str
    help: str
    label: str | None = None  # one label: the published value is {label value: number}


class Snapshot:
    """Gauge values the main loop publishes and the HTTP thread only reads.

    A scrape runs no daemon code: it reads the last published dict (replaced
    whole, so a reader sees one publication or the next, never half of one).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self._gauges: dict[str, SnapshotGauge] = {}
        self._values: dict[str, object] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def gauge(self, name: str, help: str, label: str | None = None) -> None:
        with self._lock:
            self._gauges.setdefault(name, SnapshotGauge(name, help, label))

    def publish(self, values: dict[str, object]) -> None:
        """Replace the published values; gauges left out read 0 (or no series)."""
        unknown = set(values) - set(self._gauges)
        if unknown:
            raise ValueError(f"no snapshot gauge named {sorted(unknown)}")
        # Labelled values are copied too: a scrape must not read a dict the main
        # loop goes on changing.
        self._values = {name: dict(value.items()) if isinstance(value, dict) else value
                        for name, value in values.items()}

    def describe(self):
        return list(self.collect())

    def collect(self):
        values = self._values
        with self._lock:
            gauges = list(self._gauges.values())
        for gauge in gauges:
            value = values.get(gauge.name)
            if gauge.label is None:
                yield GaugeMetricFamily(gauge.name, gauge.help, value=float(value or 0))
                continue
            family = GaugeMetricFamily(gauge.name, gauge.help, labels=[gauge.label])
            for label_value, number in sorted((value or {}).items()):
                family.add_metric([str(label_value)], float(number))
            yield family


@dataclass(frozen=True)
class StandardMetrics:
    log_lines: Counter
    log_malformed: Counter
    log_forged: Counter
    failures: Counter
    bans: Counter
    ban_latency: Histogram
    applies: Counter
    kernel_errors: Counter
    table_restores: Counter
    snapshot: Snapshot


def standard_metrics(registry: CollectorRegistry) -> StandardMetrics:
    """The daemon's metric set. The gauges are the snapshot's: the main loop
    publishes them (Daemon._publish_metrics)."""
    snapshot = Snapshot(registry)
    snapshot.gauge("policyd_bans_active", "Bans currently in the kernel's sets.")
    snapshot.gauge("policyd_trial_active", "1 while a policy is on trial, else 0.")
    snapshot.gauge("policyd_log_errors", "1 while a log is not followed: its filter does not "
                   "load or its path cannot be read; the daemon runs on with the other logs.",
                   label="log")
    snapshot.gauge("policyd_enforcing", "1 while a committed policy is in force; 0 while the "
                   "daemon waits because the first policy would cut a connected client or does "
                   "not load.")
    metrics = StandardMetrics(
        log_lines=Counter("policyd_log_lines_total", "Complete lines read from each log.", ["log"],
                          registry=registry),
        log_malformed=Counter("policyd_log_malformed_total",
                              "Lines skipped as malformed, huge, binary or not UTF-8.", ["log"],
                              registry=registry),
        log_forged=Counter("policyd_log_forged_total",
                           "Requests caught writing lines into another log entry.", ["log"],
                           registry=registry),
        failures=Counter("policyd_failures_total", "Authentication failures matched by each filter.",
                         ["filter"], registry=registry),
        bans=Counter("policyd_bans_total", "Bans added, by reason.", ["reason"], registry=registry),
        ban_latency=Histogram("policyd_ban_latency_seconds",
                              "Seconds from reading the failing line to the kernel holding the ban.",
                              buckets=LATENCY_BUCKETS, registry=registry),
        applies=Counter("policyd_applies_total", "Policy loads into the kernel, by kind.", ["kind"],
                        registry=registry),
        kernel_errors=Counter("policyd_kernel_errors_total", "Transactions nftables refused.",
                              registry=registry),
        table_restores=Counter("policyd_table_restores_total",
                               "Times policyd's tables were found missing or changed and put back.",
                               registry=registry),
        snapshot=snapshot,
    )
    # Present from the start, so a rate() sees the first event and absence means "never".
    for kind in APPLY_KINDS:
        metrics.applies.labels(kind=kind)
    return metrics


@dataclass(frozen=True)
class FleetMetrics:
    published: Counter
    received: Counter
    applied: Counter
    rejected: Counter
    latency: Histogram
    gauges: Snapshot


def fleet_metrics(registry: CollectorRegistry, reject_reasons) -> FleetMetrics:
    """The fleet's metrics, made once per registry: a reload that restarts the
    fleet keeps counting in the same series. Its gauges: Fleet.publish_metrics."""
    made = getattr(registry, "policyd_fleet_metrics", None)
    if made is not None:
        return made
    gauges = Snapshot(registry)
    gauges.gauge("policyd_fleet_connected", "1 while both Redis connections are up.")
    gauges.gauge("policyd_fleet_outbox", "Bans and unbans waiting for Redis.")
    made = registry.policyd_fleet_metrics = FleetMetrics(
        published=Counter("policyd_fleet_published_total",
                          "Bans and unbans this node added to its stream.", registry=registry),
        received=Counter("policyd_fleet_received_total", "Entries read from other nodes' streams.",
                         ["node"], registry=registry),
        applied=Counter("policyd_fleet_applied_total",
                        "Received bans and unbans applied to this node's kernel.", ["op"],
                        registry=registry),
        rejected=Counter("policyd_fleet_rejected_total", "Received entries skipped, by reason.",
                         ["reason"], registry=registry),
        latency=Histogram("policyd_fleet_latency_seconds",
                          "Seconds from the entry's XADD (server clock) to this node's kernel "
                          "holding it.", buckets=LATENCY_BUCKETS, registry=registry),
        gauges=gauges,
    )
    for reason in reject_reasons:
        made.rejected.labels(reason=reason)
    for op in ("ban", "unban"):
        made.applied.labels(op=op)
    return made


def parse_listen(text: str, key: str = "--metrics-listen") -> tuple[str, int]:
    """'127.0.0.1:9611' or '[::1]:9611' -> (host, port); loopback IP literals only."""
    match = LISTEN.match(text or "")
    if not match:
        raise InputError(f"expected ADDRESS:PORT or [IPV6]:PORT, got {text!r}", key=key)
    host = match["v6"] or match["v4"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InputError(f"{host!r} is not an IP address", key=key) from None
    if match["v6"] and (address.version != 6 or "%" in host):
        raise InputError(f"[{host}] is not an IPv6 address without a zone", key=key)
    port = int(match["port"])
    if port > 65535 or (len(match["port"]) > 1 and match["port"].startswith("0")):
        raise InputError(f"port {match['port']} is not a port number", key=key)
    if not address.is_loopback:
        # The metrics name every log path, filter and ban count: this host's
        # business only, and the endpoint has no authentication.
        raise InputError(f"{text} is not a loopback address; the metrics listener serves "
                         "this host only (127.0.0.1:9611 or [::1]:9611; a scraper elsewhere "
                         "goes through an authenticating proxy or an SSH tunnel)", key=key)
    return str(address), port


class MetricsServer:
    """Serves GET /metrics from a registry on a background thread; 404 elsewhere."""

    def __init__(self, listen: str, registry: CollectorRegistry):
        self.host, self.port = parse_listen(listen)
        self.registry = registry
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        family = ipaddress.ip_address(self.host).version

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if family == 6 else socket.AF_INET
            daemon_threads = True

        class Handler(MetricsRequestHandler):
            registry = self.registry

        try:
            self._server = Server((self.host, self.port), Handler)
        except OSError as exc:
            raise InputError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                             key="--metrics-listen") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, args=(STOP_POLL_SECONDS,),
                                        name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when 0 was asked for."""
        return tuple(self._server.server_address[:2])

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class MetricsRequestHandler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    timeout = 10  # a stalled scraper must not hold a thread for ever

    def do_GET(self):
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("metrics http: " + format, *args)
