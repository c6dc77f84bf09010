"""Metrics: the standard set's names, the published snapshot, the HTTP endpoint."""

import threading
import urllib.error
import urllib.request

import pytest

from policyd.errors import InputError
from policyd.operator.metrics import (CONTENT_TYPE, MetricsServer, Snapshot, new_registry, parse_listen,
                             render, standard_metrics)


def samples(text):
    """{'name{labels}': value} for every sample line of an exposition."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_standard_metrics_render_with_zeroes_and_published_gauges():
    registry = new_registry()
    metrics = standard_metrics(registry)
    metrics.failures.labels(filter="nginx-auth").inc()
    metrics.ban_latency.observe(0.004)
    metrics.snapshot.publish({"policyd_bans_active": 12, "policyd_trial_active": 1,
                              "policyd_enforcing": 1, "policyd_log_errors": {"/var/log/a": 1}})
    text = render(registry)
    got = samples(text)
    assert got['policyd_applies_total{kind="rollback"}'] == 0
    assert got['policyd_failures_total{filter="nginx-auth"}'] == 1
    assert got["policyd_bans_active"] == 12
    assert got["policyd_trial_active"] == 1
    assert got["policyd_enforcing"] == 1
    assert got['policyd_log_errors{log="/var/log/a"}'] == 1
    assert got["policyd_kernel_errors_total"] == 0
    assert got["policyd_table_restores_total"] == 0
    assert got['policyd_ban_latency_seconds_bucket{le="0.0025"}'] == 0
    assert got['policyd_ban_latency_seconds_bucket{le="0.005"}'] == 1
    assert got["policyd_ban_latency_seconds_count"] == 1
    for line in ("# TYPE policyd_log_malformed_total counter",
                 "# TYPE policyd_bans_total counter",
                 "# TYPE policyd_log_lines_total counter",
                 "# TYPE policyd_bans_active gauge",
                 "# TYPE policyd_ban_latency_seconds histogram"):
        assert line in text.splitlines()
    assert not any("_created" in name for name in got), "one series per counter, not two"


def test_the_process_metrics_come_with_every_registry():
    got = samples(render(new_registry()))
    assert got["process_resident_memory_bytes"] > 0
    assert got["process_open_fds"] > 0
    assert "process_cpu_seconds_total" in got


def test_gauges_read_the_last_publication_and_zero_before_any():
    registry = new_registry()
    snapshot = Snapshot(registry)
    snapshot.gauge("up", "Up.")
    snapshot.gauge("per_log", "Per log.", label="log")
    assert samples(render(registry))["up"] == 0
    snapshot.publish({"up": 1, "per_log": {"b.log": 2, "a.log": 0}})
    text = render(registry)
    assert samples(text)["up"] == 1
    assert text.index('per_log{log="a.log"}') < text.index('per_log{log="b.log"}')
    snapshot.publish({"per_log": {}})
    got = samples(render(registry))
    assert got["up"] == 0 and not any(name.startswith("per_log") for name in got)
    with pytest.raises(ValueError):
        snapshot.publish({"nobody_declared_me": 1})


def test_a_scrape_runs_no_daemon_code():
    """What a scrape reads was published before: nothing is called at render time."""
    registry = new_registry()
    snapshot = Snapshot(registry)
    snapshot.gauge("policyd_log_errors", "x", label="log")
    calls = []

    class Tripwire(dict):
        def items(self):
            calls.append(threading.current_thread().name)
            return super().items()

    published = Tripwire({"/var/log/a": 1})
    snapshot.publish({"policyd_log_errors": published})
    calls.clear()
    published["/var/log/b"] = 1  # the main loop goes on; the scrape sees what was published
    text = render(registry)
    assert calls == []
    assert 'policyd_log_errors{log="/var/log/a"} 1.0' in text and "/var/log/b" not in text


def test_hostile_label_values_are_escaped():
    registry = new_registry()
    metrics = standard_metrics(registry)
    metrics.log_lines.labels(log='a"b\\c\nd} x="y').inc()
    assert 'policyd_log_lines_total{log="a\\"b\\\\c\\nd} x=\\"y"} 1.0' in render(registry)


def test_increments_from_many_threads_are_not_lost():
    metrics = standard_metrics(new_registry())
    child = metrics.log_lines.labels(log="a")

    def bump():
        for _ in range(10000):
            child.inc()

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert child._value.get() == 80000


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
        MetricsServer(text, new_registry())
    assert caught.value.key == "--metrics-listen"


@pytest.mark.parametrize("text", ["0.0.0.0:9611", "[::]:9611", "192.0.2.1:9611",
                                  "[2001:db8::1]:9611", "[::ffff:127.0.0.1]:9611"])
def test_listeners_beyond_loopback_are_refused_as_the_help_says(text):
    with pytest.raises(InputError, match="not a loopback address") as caught:
        parse_listen(text)
    assert caught.value.key == "--metrics-listen"


def test_http_server_serves_metrics_and_404s_the_rest():
    registry = new_registry()
    standard_metrics(registry).bans.labels(reason="failures").inc(2)
    with MetricsServer("127.0.0.1:0", registry) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            served = response.read().decode()
            assert samples(served)['policyd_bans_total{reason="failures"}'] == 2
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert caught.value.code == 404


def test_http_server_on_ipv6_loopback():
    registry = new_registry()
    snapshot = Snapshot(registry)
    snapshot.gauge("up", "Up.")
    snapshot.publish({"up": 1})
    server = MetricsServer("[::1]:0", registry)
    try:
        server.start()
    except InputError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        port = server.address[1]
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as response:
            assert samples(response.read().decode())["up"] == 1
    finally:
        server.stop()


def test_port_in_use_is_one_clear_line():
    with MetricsServer("127.0.0.1:0", new_registry()) as first:
        port = first.address[1]
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}"):
            MetricsServer(f"127.0.0.1:{port}", new_registry()).start()
