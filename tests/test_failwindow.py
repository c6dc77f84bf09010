"""The failure window on its own: keys (ignore list, loopback, IPv6 prefix, mapped
IPv4), maxretry within findtime by the lines' own times, the batch path agreeing
with the one-failure path, and quiet windows forgotten."""
import ipaddress
import random
from collections import Counter

from fakes import Settings
from policyd.banning.failwindow import FailureWindow

ip = ipaddress.ip_address
net = ipaddress.ip_network
NOW = 1_000_000.0


def window(**settings):
    return FailureWindow(Settings(**settings), {})


def test_keys_follow_the_ignore_list_loopback_and_the_ipv6_prefix():
    w = window(ignore=(net("203.0.113.0/24"), net("2001:db8:1:2::5/128")), ipv6_prefix=56)
    assert w.key_of(ip("192.0.2.1"), "f") == (4, int(ip("192.0.2.1")), 32)
    assert w.key_of(ip("::ffff:192.0.2.1"), "f") == (4, int(ip("192.0.2.1")), 32)
    assert w.key_of(ip("203.0.113.9"), "f") is None
    assert w.key_of(ip("127.0.0.2"), "f") is None
    assert w.key_of(ip("::1"), "f") is None
    assert w.key_of(ip("2001:db8:7:1::9"), "f") == (6, int(ip("2001:db8:7::")), 56)
    # Its /56 would cover an ignored address: only the address itself counts.
    assert w.key_of(ip("2001:db8:1:3::9"), "f") == (6, int(ip("2001:db8:1:3::9")), 128)
    assert w.key_of(ip("2001:db8:1:2::5"), "f") is None
    assert w.failures_total == Counter(f=8) and w.ignored_total == Counter(f=4)


def test_maxretry_within_findtime_by_the_lines_own_times():
    w = window(maxretry=3, findtime=600)
    key = w.key_of(ip("192.0.2.7"), "f")
    assert w.count(key, "f", NOW, NOW - 700) is None  # older than the window: not counted
    assert key not in w.times
    assert w.count(key, "f", NOW, NOW - 10) is None
    assert w.count(key, "f", NOW, NOW - 500) is None  # out of order: sorted in
    assert w.times[key] == [NOW - 500, NOW - 10]
    assert w.count(key, "f", NOW, NOW + 50) == 3  # a future time counts as now
    assert key not in w.times and key not in w.unwritten  # the ban starts the count afresh


def test_the_batch_path_agrees_with_one_failure_at_a_time():
    rng = random.Random(7)
    hosts = [ip(f"192.0.2.{n}") for n in range(1, 40)] + [ip(f"2001:db8:{n:x}::1") for n in range(40)] \
        + [ip("127.0.0.1"), ip("::ffff:198.51.100.3")]
    failures = [(rng.choice(hosts), rng.choice(["a", "b"]), NOW - rng.randrange(0, 900))
                for _ in range(2000)]
    one, batch = window(maxretry=4), window(maxretry=4)
    due_one = {}
    for address, name, when in failures:
        key = one.key_of(address, name)
        if key is None or key in due_one:
            continue
        count = one.count(key, name, NOW, when)
        if count is not None:
            due_one[key] = (name, count)
    due_batch = {}
    for start in range(0, len(failures), 300):
        found = batch.count_many(failures[start:start + 300], NOW, due_batch, {4: Counter(), 6: Counter()})
        due_batch.update(found)
    assert due_batch == due_one
    assert batch.times == one.times
    assert batch.unwritten == one.unwritten
    assert (batch.failures_total, batch.ignored_total) == (one.failures_total, one.ignored_total)


def test_the_batch_path_skips_networks_inside_an_active_ban():
    w = window(maxretry=1)
    active = {(6, int(ip("2001:db8::")), 48): "ban", (4, int(ip("192.0.2.9")), 32): "ban"}
    prefixlens = {4: Counter({32: 1}), 6: Counter({48: 1})}
    due = w.count_many([(ip("2001:db8:0:5::1"), "f", NOW), (ip("192.0.2.9"), "f", NOW),
                        (ip("2001:db8:1::1"), "f", NOW)], NOW, active, prefixlens)
    assert list(due) == [(6, int(ip("2001:db8:1::")), 64)]


def test_a_quiet_window_is_forgotten_and_an_open_one_kept():
    w = window(maxretry=5, findtime=600)
    quiet, open_ = w.key_of(ip("192.0.2.1"), "f"), w.key_of(ip("192.0.2.2"), "f")
    w.count(quiet, "f", NOW, NOW)
    w.count(open_, "f", NOW, NOW)
    w.count(open_, "f", NOW + 500, NOW + 500)
    assert w.expire(NOW + 601) == NOW + 1
    assert quiet not in w.times
    assert w.times[open_] == [NOW + 500]
    assert len(w.order) == 1
