"""The failure window runs on the time each log line carries (issue 10, point 4):
a daemon catching up after an hour down bans nobody whose failures were an hour
apart, and still bans a burst it reads late."""
import ipaddress
import time
from datetime import datetime

import pytest

from policyd.banning.bans import BanManager
from policyd.logs.filters import Failure, load_filter
from policyd.logs.guard import judge_for
from policyd.banning.state import State
from fakes import FakeClock, Settings

ip = ipaddress.ip_address


@pytest.fixture
def clock():
    return FakeClock(now=time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, -1)))


@pytest.fixture
def manager(tmp_path, clock, ban_kernel):
    state = State(tmp_path / "state.db")
    yield BanManager(Settings(maxretry=3, findtime=600), state, ban_kernel, clock=clock)
    state.close()


def nginx_line(when, client="203.0.113.5"):
    stamp = datetime.fromtimestamp(when).strftime("%Y/%m/%d %H:%M:%S")
    return (f'{stamp} [error] 812#812: *1 user "ollama": password mismatch, client: {client}, '
            f'server: localhost, request: "GET / HTTP/1.1", host: "localhost"').encode()


def feed(manager, lines, log_filter=None):
    log_filter = log_filter or load_filter("nginx-auth")
    bans = []
    for outcome in judge_for(log_filter).judge(lines):
        assert isinstance(outcome, Failure)
        ban = manager.record_failure(outcome.host, outcome.filter, outcome.time)
        if ban is not None:
            bans.append(ban)
    return bans


def test_catching_up_an_hour_of_log_bans_nobody_whose_failures_were_an_hour_apart(manager, clock):
    hour_ago = clock() - 3 * 3600
    lines = [nginx_line(hour_ago + n * 3600) for n in range(3)]
    assert feed(manager, lines) == []


def test_catching_up_still_bans_a_burst_within_findtime(manager, clock):
    lines = [nginx_line(clock() - 300 + n) for n in range(3)]
    [ban] = feed(manager, lines)
    assert str(ban.network) == "203.0.113.5/32"


def test_failures_older_than_findtime_count_for_nothing(manager, clock):
    assert feed(manager, [nginx_line(clock() - 601)] * 5) == []


def test_a_line_time_in_the_future_counts_as_now(manager, clock):
    future = clock() + 86400
    assert manager.record_failure(ip("192.0.2.7"), "nginx-auth", future) is None
    clock.advance(599)
    assert manager.record_failure(ip("192.0.2.7"), "nginx-auth", None) is None
    clock.advance(2)
    # Had the future time counted as itself, these three would ban.
    assert manager.record_failure(ip("192.0.2.7"), "nginx-auth", None) is None


def test_out_of_order_times_keep_the_window_right(manager, clock):
    now = clock()
    assert manager.record_failure(ip("192.0.2.8"), "f", now - 10) is None
    assert manager.record_failure(ip("192.0.2.8"), "f", now - 500) is None
    # Older than the two above, still inside findtime: three in the window.
    assert manager.record_failure(ip("192.0.2.8"), "f", now - 590) is not None


def test_out_of_order_failures_leave_the_window_when_they_age(manager, clock):
    now = clock()
    manager.record_failure(ip("192.0.2.9"), "f", now - 100)
    manager.record_failure(ip("192.0.2.9"), "f", now - 590)
    clock.advance(20)   # the -590 one is now older than findtime
    manager.expire()
    assert manager.record_failure(ip("192.0.2.9"), "f", None) is None


def test_a_line_without_a_readable_time_uses_the_time_it_was_read(manager, clock):
    log_filter = load_filter("nginx-auth")
    line = nginx_line(clock()).replace(b"2026/12/01", b"2026/13/45")   # no such date
    [failure] = judge_for(log_filter).judge([line])
    assert failure.time is None
    assert [manager.record_failure(failure.host, failure.filter, failure.time) for _ in range(3)][-1]
