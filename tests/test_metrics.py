"""Metrics: exact text exposition, label escaping, histograms, the HTTP endpoint."""

import threading
import urllib.error
import urllib.request

import pytest

from policyd.errors import InputError
from policyd.metrics import (CONTENT_TYPE, Counter, Gauge, Histogram, MetricsServer, Registry,
                             parse_listen, standard_metrics)


def test_counter_renders_exactly():
    registry = Registry()
    lines = Counter("policyd_log_lines_total", "Lines read.", ["log"], registry)
    lines.labels(log="/var/log/nginx/error.log").inc(3)
    lines.labels(log="/var/log/caddy/access.log").inc()
    plain = Counter("policyd_kernel_errors_total", "Kernel refusals.", registry=registry)
    plain.inc(2)
    assert registry.render() == (
        "# HELP policyd_log_lines_total Lines read.\n"
        "# TYPE policyd_log_lines_total counter\n"
        'policyd_log_lines_total{log="/var/log/caddy/access.log"} 1\n'
        'policyd_log_lines_total{log="/var/log/nginx/error.log"} 3\n'
        "# HELP policyd_kernel_errors_total Kernel refusals.\n"
        "# TYPE policyd_kernel_errors_total counter\n"
        "policyd_kernel_errors_total 2\n"
    )


def test_counter_refuses_to_go_down():
    counter = Counter("c_total", "c")
    with pytest.raises(ValueError):
        counter.inc(-1)


def test_gauge_set_inc_dec_and_special_values():
    registry = Registry()
    gauge = Gauge("g", "A gauge.", ["kind"], registry)
    gauge.labels(kind="a").set(2.5)
    gauge.labels(kind="b").inc(4)
    gauge.labels(kind="b").dec()
    gauge.labels(kind="c").set(float("inf"))
    gauge.labels(kind="d").set(float("-inf"))
    gauge.labels(kind="e").set(float("nan"))
    assert registry.render() == (
        "# HELP g A gauge.\n"
        "# TYPE g gauge\n"
        'g{kind="a"} 2.5\n'
        'g{kind="b"} 3\n'
        'g{kind="c"} +Inf\n'
        'g{kind="d"} -Inf\n'
        'g{kind="e"} NaN\n'
    )


def test_gauge_callbacks_read_live_values():
    registry = Registry()
    active = {"count": 1}
    Gauge("bans_active", "Active bans.", registry=registry, function=lambda: active["count"])
    per_log = Gauge("log_open", "Open logs.", ["log", "state"], registry,
                    function=lambda: {("b.log", "open"): 1, ("a.log", "missing"): 0})
    active["count"] = 7
    assert registry.render() == (
        "# HELP bans_active Active bans.\n"
        "# TYPE bans_active gauge\n"
        "bans_active 7\n"
        "# HELP log_open Open logs.\n"
        "# TYPE log_open gauge\n"
        'log_open{log="a.log",state="missing"} 0\n'
        'log_open{log="b.log",state="open"} 1\n'
    )
    single = Gauge("per_filter", "x", ["filter"], function=lambda: {"nginx": 2})
    assert single.render().endswith('per_filter{filter="nginx"} 2\n')
    child = Gauge("child", "x", ["log"])
    child.labels(log="l").set_function(lambda: 9)
    assert child.render().endswith('child{log="l"} 9\n')
    assert per_log.labelnames == ("log", "state")


def test_a_failing_callback_hides_only_its_own_metric():
    registry = Registry()
    Gauge("broken", "x", registry=registry, function=lambda: 1 / 0)
    Counter("fine_total", "y", registry=registry).inc()
    assert registry.render() == "# HELP fine_total y\n# TYPE fine_total counter\nfine_total 1\n"


def test_label_values_and_help_are_escaped():
    registry = Registry()
    counter = Counter("hostile_total", 'Help with \\ and\nnewline and "quotes".', ["user"], registry)
    counter.labels(user='a"b\\c\nd} x="y').inc()
    assert registry.render() == (
        '# HELP hostile_total Help with \\\\ and\\nnewline and "quotes".\n'
        "# TYPE hostile_total counter\n"
        'hostile_total{user="a\\"b\\\\c\\nd} x=\\"y"} 1\n'
    )


def test_histogram_buckets_are_cumulative_with_inclusive_bounds():
    registry = Registry()
    latency = Histogram("latency_seconds", "Latency.", [0.001, 0.01, 0.1], registry=registry)
    for value in (0.0005, 0.001, 0.002, 0.05, 0.05, 3.0):
        latency.observe(value)
    assert registry.render() == (
        "# HELP latency_seconds Latency.\n"
        "# TYPE latency_seconds histogram\n"
        'latency_seconds_bucket{le="0.001"} 2\n'
        'latency_seconds_bucket{le="0.01"} 3\n'
        'latency_seconds_bucket{le="0.1"} 5\n'
        'latency_seconds_bucket{le="+Inf"} 6\n'
        "latency_seconds_sum 3.1035\n"
        "latency_seconds_count 6\n"
    )


def test_labelled_histogram_puts_le_last():
    histogram = Histogram("h", "h", [1], labels=["filter"])
    histogram.labels(filter="nginx").observe(2)
    assert histogram.render() == (
        "# HELP h h\n# TYPE h histogram\n"
        'h_bucket{filter="nginx",le="1.0"} 0\n'
        'h_bucket{filter="nginx",le="+Inf"} 1\n'
        'h_sum{filter="nginx"} 2.0\n'
        'h_count{filter="nginx"} 1\n'
    )


@pytest.mark.parametrize("buckets", [[], [1, 1], [2, 1]])
def test_histogram_buckets_must_increase(buckets):
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets)


def test_names_labels_and_registration_are_checked():
    with pytest.raises(ValueError):
        Counter("bad-name", "x")
    with pytest.raises(ValueError):
        Counter("c", "x", ["__reserved"])
    with pytest.raises(ValueError):
        Histogram("h", "x", [1], labels=["le"])
    counter = Counter("c", "x", ["log"])
    with pytest.raises(ValueError):
        counter.labels(filter="nginx")
    with pytest.raises(ValueError):
        counter.inc()
    registry = Registry()
    Counter("twice", "x", registry=registry)
    with pytest.raises(ValueError):
        Counter("twice", "x", registry=registry)


def test_increments_from_many_threads_are_not_lost():
    counter = Counter("c_total", "x", ["log"])
    child = counter.labels(log="a")

    def bump():
        for _ in range(10000):
            child.inc()

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert child.value == 80000


def test_standard_metrics_render_with_zeroes_and_live_gauges():
    registry = Registry()
    metrics = standard_metrics(registry, bans_active=lambda: 12, trial_active=lambda: 1)
    metrics.failures.labels(filter="nginx-auth").inc()
    metrics.ban_latency.observe(0.004)
    text = registry.render()
    for line in ('policyd_applies_total{kind="rollback"} 0',
                 'policyd_failures_total{filter="nginx-auth"} 1',
                 "policyd_bans_active 12",
                 "policyd_trial_active 1",
                 "policyd_kernel_errors_total 0",
                 "policyd_table_restores_total 0",
                 'policyd_ban_latency_seconds_bucket{le="0.0025"} 0',
                 'policyd_ban_latency_seconds_bucket{le="0.005"} 1',
                 "# TYPE policyd_log_malformed_total counter",
                 "# TYPE policyd_bans_total counter",
                 "# TYPE policyd_log_lines_total counter"):
        assert line in text.splitlines()


def test_standard_gauges_are_settable_without_callbacks():
    metrics = standard_metrics(Registry())
    metrics.bans_active.set(3)
    metrics.trial_active.set(1)
    assert (metrics.bans_active.value, metrics.trial_active.value) == (3, 1)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9611", ("127.0.0.1", 9611)),
    ("[::1]:9611", ("::1", 9611)),
    ("127.0.0.2:0", ("127.0.0.2", 0)),
    ("[::1]:65535", ("::1", 65535)),
])
def test_listen_addresses_parse(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", [
    "", "9611", "localhost:9611", "127.0.0.1", "127.0.0.1:", "::1:9611", "[127.0.0.1]:9611",
    "[::1]", "127.0.0.1:65536", "127.0.0.1:09611", "127.0.0.1:96x1", "256.0.0.1:9611",
    " 127.0.0.1:9611", "127.0.0.1:9611\n", "[fe80::1%eth0]:9611", "http://127.0.0.1:9611",
])
def test_junk_listen_addresses_refused(text):
    with pytest.raises(InputError) as caught:
        MetricsServer(text, Registry())
    assert caught.value.key == "--metrics-listen"


@pytest.mark.parametrize("text", ["0.0.0.0:9611", "[::]:9611", "192.0.2.1:9611",
                                  "[2001:db8::1]:9611", "[::ffff:127.0.0.1]:9611"])
def test_listeners_beyond_loopback_are_refused_as_the_help_says(text):
    with pytest.raises(InputError, match="not a loopback address") as caught:
        parse_listen(text)
    assert caught.value.key == "--metrics-listen"


def test_http_server_serves_metrics_and_404s_the_rest():
    registry = Registry()
    Counter("policyd_bans_total", "Bans.", ["reason"], registry).labels(reason="failures").inc(2)
    with MetricsServer("127.0.0.1:0", registry) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            assert response.read().decode() == registry.render()
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert caught.value.code == 404


def test_http_server_on_ipv6_loopback():
    registry = Registry()
    Gauge("up", "Up.", registry=registry).set(1)
    server = MetricsServer("[::1]:0", registry)
    try:
        server.start()
    except InputError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        port = server.address[1]
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as response:
            assert response.read().decode().endswith("up 1\n")
    finally:
        server.stop()


def test_port_in_use_is_one_clear_line():
    with MetricsServer("127.0.0.1:0", Registry()) as first:
        port = first.address[1]
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}"):
            MetricsServer(f"127.0.0.1:{port}", Registry()).start()
