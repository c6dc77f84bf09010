"""Prometheus metrics without a dependency: counters, gauges, histograms.

Owns the registry, the text exposition format 0.0.4, the HTTP endpoint that
serves it, and the daemon's standard metric set.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import math
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

from policyd.errors import InputError

log = logging.getLogger(__name__)

STOP_POLL_SECONDS = 0.1  # how quickly stop() is noticed by serve_forever
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
LISTEN = re.compile(r"(?:\[(?P<v6>[^\[\]]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})\Z")


def format_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def escape_label_value(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs)
    return "{" + inner + "}" if inner else ""


class Metric:
    """A named family of samples, optionally split by labels."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), registry: Registry | None = None):
        if not METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.labelnames = tuple(labels)
        for label in self.labelnames:
            if not LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(self.labelnames)) != len(self.labelnames):
            raise ValueError(f"duplicate label names for {name}")
        self.name = name
        self.help = help
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, **values):
        if set(values) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(values)}")
        key = tuple(str(values[name]) for name in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def _unlabelled(self):
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels()")
        return self.labels()

    def _new_child(self):
        raise NotImplementedError

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[tuple[str, tuple[tuple[str, str], ...], object]]:
        """(sample name, label pairs, value) in a stable order."""
        with self._lock:
            children = sorted(self._children.items())
        out = []
        for key, child in children:
            out.extend(child.samples(self.name, tuple(zip(self.labelnames, key))))
        return out

    def render(self) -> str:
        lines = self.header()
        for name, pairs, value in self.samples():
            lines.append(f"{name}{format_labels(pairs)} {format_value(value)}")
        return "\n".join(lines) + "\n"


class _CounterChild:
    def __init__(self):
        self._lock = threading.Lock()
        self.value = 0

    def inc(self, n=1) -> None:
        if n < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self.value += n

    def samples(self, name, pairs):
        return [(name, pairs, self.value)]


class Counter(Metric):
    kind = "counter"

    def _new_child(self):
        return _CounterChild()

    def inc(self, n=1) -> None:
        self._unlabelled().inc(n)

    @property
    def value(self):
        return self._unlabelled().value


class _GaugeChild:
    def __init__(self):
        self._lock = threading.Lock()
        self._value = 0
        self._function: Callable[[], float] | None = None

    def set(self, value) -> None:
        with self._lock:
            self._value = value

    def inc(self, n=1) -> None:
        with self._lock:
            self._value += n

    def dec(self, n=1) -> None:
        with self._lock:
            self._value -= n

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from `function` at every render instead of storing it."""
        self._function = function

    @property
    def value(self):
        return self._function() if self._function is not None else self._value

    def samples(self, name, pairs):
        return [(name, pairs, self.value)]


class Gauge(Metric):
    """A value that goes up and down; or read live from a callback.

    `function` with no labels returns a number; with labels it returns a
    mapping from label values (a string for one label, a tuple for several)
    to numbers, replacing any stored children at render time.
    """

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), registry: Registry | None = None,
                 function: Callable[[], object] | None = None):
        super().__init__(name, help, labels, registry)
        self._function = function

    def _new_child(self):
        return _GaugeChild()

    def set(self, value) -> None:
        self._unlabelled().set(value)

    def inc(self, n=1) -> None:
        self._unlabelled().inc(n)

    def dec(self, n=1) -> None:
        self._unlabelled().dec(n)

    def set_function(self, function: Callable[[], object]) -> None:
        self._function = function

    @property
    def value(self):
        return self._function() if self._function is not None else self._unlabelled().value

    def samples(self):
        if self._function is None:
            return super().samples()
        if not self.labelnames:
            return [(self.name, (), self._function())]
        rows = []
        for key, value in self._function().items():
            key = (key,) if isinstance(key, str) else tuple(key)
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: callback gave {key!r} for labels {self.labelnames}")
            rows.append((tuple(map(str, key)), value))
        return [(self.name, tuple(zip(self.labelnames, key)), value) for key, value in sorted(rows)]


class _HistogramChild:
    def __init__(self, bounds: tuple[float, ...]):
        self._lock = threading.Lock()
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)  # le is inclusive
        with self._lock:
            self.counts[index] += 1
            self.sum += value

    def samples(self, name, pairs):
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, cumulative = [], 0
        for bound, count in zip(self.bounds + (math.inf,), counts):
            cumulative += count
            out.append((f"{name}_bucket", pairs + (("le", format_value(bound)),), cumulative))
        out.append((f"{name}_sum", pairs, total))
        out.append((f"{name}_count", pairs, cumulative))
        return out


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: Iterable[str] = (),
                 registry: Registry | None = None):
        bounds = tuple(float(bound) for bound in buckets)
        if bounds and math.isinf(bounds[-1]):
            bounds = bounds[:-1]
        if not bounds or any(later <= earlier for earlier, later in zip(bounds, bounds[1:])):
            raise ValueError(f"{name}: buckets must be a non-empty increasing sequence")
        if "le" in tuple(labels):
            raise ValueError(f"{name}: 'le' is reserved for buckets")
        self.bounds = bounds
        super().__init__(name, help, labels, registry)

    def _new_child(self):
        return _HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)


class Registry:
    """The metrics one endpoint exposes, rendered in registration order."""

    def __init__(self):
        self._lock = threading.Lock()
        self._metrics: dict[str, Metric] = {}

    def register(self, metric: Metric) -> Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} registered twice")
            self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        parts = []
        for metric in metrics:
            try:
                parts.append(metric.render())
            except Exception:  # one broken callback must not hide every other metric
                log.warning("metric %s could not be rendered", metric.name, exc_info=True)
        return "".join(parts)


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
    """Serves GET /metrics from a registry on a background thread."""

    def __init__(self, listen: str, registry: Registry):
        self.host, self.port = parse_listen(listen)
        self.registry = registry
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        registry = self.registry
        family = ipaddress.ip_address(self.host).version

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if family == 6 else socket.AF_INET
            daemon_threads = True

        class Handler(MetricsRequestHandler):
            pass

        Handler.registry = registry
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
    registry: Registry
    timeout = 10  # a stalled scraper must not hold a thread for ever

    def do_GET(self):
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = self.registry.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("metrics http: " + format, *args)


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
APPLY_KINDS = ("plain", "trial", "confirm", "rollback", "restore")


@dataclass(frozen=True)
class StandardMetrics:
    log_lines: Counter
    log_malformed: Counter
    log_forged: Counter
    failures: Counter
    bans: Counter
    bans_active: Gauge
    ban_latency: Histogram
    applies: Counter
    trial_active: Gauge
    kernel_errors: Counter
    table_restores: Counter


def standard_metrics(registry: Registry, *, bans_active: Callable[[], float] | None = None,
                     trial_active: Callable[[], float] | None = None) -> StandardMetrics:
    """The daemon's metric set; the two gauges may read live values from callbacks."""
    metrics = StandardMetrics(
        log_lines=Counter("policyd_log_lines_total", "Complete lines read from each log.", ["log"], registry),
        log_malformed=Counter("policyd_log_malformed_total",
                              "Lines skipped as malformed, huge, binary or not UTF-8.", ["log"], registry),
        log_forged=Counter("policyd_log_forged_total",
                           "Requests caught writing lines into another log entry.", ["log"], registry),
        failures=Counter("policyd_failures_total", "Authentication failures matched by each filter.",
                         ["filter"], registry),
        bans=Counter("policyd_bans_total", "Bans added, by reason.", ["reason"], registry),
        bans_active=Gauge("policyd_bans_active", "Bans currently in the kernel's sets.", (), registry,
                          function=bans_active),
        ban_latency=Histogram("policyd_ban_latency_seconds",
                              "Seconds from reading the failing line to the kernel holding the ban.",
                              LATENCY_BUCKETS, (), registry),
        applies=Counter("policyd_applies_total", "Policy loads into the kernel, by kind.", ["kind"], registry),
        trial_active=Gauge("policyd_trial_active", "1 while a policy is on trial, else 0.", (), registry,
                           function=trial_active),
        kernel_errors=Counter("policyd_kernel_errors_total", "Transactions nftables refused.", (), registry),
        table_restores=Counter("policyd_table_restores_total",
                               "Times policyd's tables were found missing or changed and put back.", (),
                               registry),
    )
    # Present from the start, so a rate() sees the first event and absence means "never".
    for kind in APPLY_KINDS:
        metrics.applies.labels(kind=kind)
    for metric in (metrics.bans_active, metrics.ban_latency, metrics.trial_active,
                   metrics.kernel_errors, metrics.table_restores):
        metric.labels()
    return metrics
