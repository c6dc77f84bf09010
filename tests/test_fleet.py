"""The fleet without Redis: the policy block, the password file, the entry format, and
the rules a received entry passes before it touches this node's bans.

Every entry here is what a hostile or broken node could write into its stream.
tests/netns/test_fleet_netns.py runs the same code against real redis-server.
"""
import ipaddress
import os

import pytest

from policyd.fleet import wire as fleet_wire
from policyd.operator import metrics
from policyd.policy import reader as policy
from policyd.banning.bans import BanManager
from policyd.errors import InputError
from policyd.fleet.node import ORIGIN, Fleet
from policyd.fleet.peers import TokenBucket
from policyd.fleet.config import node_of_stream, parse_url, read_password, stream_key
from policyd.banning.state import State
from fakes import FakeBanKernel, FakeClock

NET = ipaddress.ip_network
BASE = """\
version: 1
services:
  web:
    ports: [8080]
    allow: [any]
bans:
  ignore: [198.51.100.7]
  bantime_max: 1d
fleet:
"""
FLEET = """\
  redis: rediss://gpu1@10.0.0.5:6380/0
  password_file: /etc/policyd/fleet.secret
  ca_file: /etc/policyd/fleet-ca.pem
  node: gpu1
"""


def load(fleet_text):
    return policy.loads(BASE + fleet_text, "p.yaml")


def error(fleet_text):
    with pytest.raises(InputError) as caught:
        load(fleet_text)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# --- the policy block -------------------------------------------------------

def test_spec_fleet_block_loads_with_defaults_from_bans():
    fleet = load(FLEET).fleet
    assert (fleet.host, fleet.port, fleet.db, fleet.tls) == ("10.0.0.5", 6380, 0, True)
    assert fleet.redis_username() == "gpu1" and fleet.node_name() == "gpu1"
    assert fleet.accept_ipv4_prefix == 32 and fleet.accept_ipv6_prefix == 64
    assert fleet.max_duration == 86400  # bans.bantime_max
    assert fleet.rate_per_second == 100


def test_accept_limits():
    fleet = load(FLEET + "  accept:\n    ipv4_prefix: 24\n    ipv6_prefix: 96\n"
                 "    max_duration: 2h\n    rate: 600/minute\n").fleet
    assert (fleet.accept_ipv4_prefix, fleet.accept_ipv6_prefix) == (24, 96)
    assert fleet.max_duration == 7200 and fleet.rate_per_second == 10


@pytest.mark.parametrize("text,expected", [
    ("  redis: redis://gpu1:hunter2@10.0.0.5/0\n", "p.yaml:10: fleet.redis: the URL must not hold a password"),
    ("  redis: http://10.0.0.5/\n", "fleet.redis: 'http://10.0.0.5/' : the scheme".replace(" :", ":")),
    ("  redis: redis://10.0.0.5/x\n", "fleet.redis:"),
    ("  redis: redis://10.0.0.5:99999/0\n", "fleet.redis:"),
    ("  redis: redis://10.0.0.5/0?password=x\n", "no ?query"),
    ("  redis: redis://10.0.0.5/0\n  ca_file: /ca.pem\n", "p.yaml:11: fleet.ca_file: needs a rediss://"),
    ("  redis: redis://10.0.0.5/0\n  password_file: fleet.secret\n",
     "fleet.password_file: 'fleet.secret' must be absolute"),
    ("  redis: redis://10.0.0.5/0\n  node: 'gpu*'\n", "p.yaml:11: fleet.node: 'gpu*' is not a node name"),
    ("  redis: redis://10.0.0.5/0\n  node: 'a b'\n", "fleet.node:"),
    ("  redis: redis://10.0.0.5/0\n  password: x\n", "p.yaml:11: fleet.password: unknown key"),
    ("  node: gpu1\n", "fleet.redis: is required"),
    ("  redis: redis://10.0.0.5/0\n  accept:\n    ipv6_prefix: 8\n",
     "p.yaml:12: fleet.accept.ipv6_prefix: 8 is out of range 16..128"),
    ("  redis: redis://10.0.0.5/0\n  accept:\n    ipv4_prefix: 0\n", "fleet.accept.ipv4_prefix: 0 is out"),
    ("  redis: redis://10.0.0.5/0\n  accept:\n    rate: lots\n", "fleet.accept.rate: 'lots' is not a rate"),
    ("  redis: redis://10.0.0.5/0\n  accept:\n    max_duration: 20000w\n", "fleet.accept.max_duration: is longer"),
    ("  redis: redis://10.0.0.5/0\n  accept:\n    burst: 1\n", "fleet.accept.burst: unknown key"),
    ("  redis: redis://10.0.0.5/0\n  accept:\n    unbans: maybe\n", "fleet.accept.unbans: 'maybe' is not true"),
])
def test_bad_fleet_blocks_name_file_line_and_key(text, expected):
    assert expected in error(text)


def test_url_forms():
    assert parse_url("redis://10.0.0.5") == ("10.0.0.5", 6379, 0, False, None)
    assert parse_url("rediss://n1@[2001:db8::5]:7000/3") == ("2001:db8::5", 7000, 3, True, "n1")


def test_stream_keys_name_only_valid_nodes():
    assert node_of_stream(stream_key("gpu1")) == "gpu1"
    for key in ("policyd:{bans}:", "policyd:{bans}:a b", "policyd:{bans}:*", "other:gpu1"):
        assert node_of_stream(key) is None


# --- the password file ------------------------------------------------------

def test_password_file_must_be_root_only(tmp_path):
    secret = tmp_path / "fleet.secret"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)
    assert read_password(str(secret)) == "s3cret"
    for mode in (0o640, 0o604, 0o620):
        os.chmod(secret, mode)
        with pytest.raises(InputError, match="fleet.password_file: is readable or writable by others"):
            read_password(str(secret))


def test_password_file_symlink_multiline_and_missing_are_refused(tmp_path):
    secret = tmp_path / "fleet.secret"
    secret.write_text("one\ntwo\n")
    os.chmod(secret, 0o600)
    with pytest.raises(InputError, match="one line"):
        read_password(str(secret))
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(InputError, match="fleet.password_file"):
        read_password(str(link))
    with pytest.raises(InputError, match="fleet.password_file"):
        read_password(str(tmp_path / "missing"))


# --- the entry format -------------------------------------------------------

def raw(fields):
    return {k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v
            for k, v in fields.items()}


def test_entries_round_trip():
    ban = fleet_wire.decode("n1", b"1700000000000-2",
                            raw(fleet_wire.encode_ban(NET("192.0.2.9/32"), 60000, "auto")))
    assert (ban.op, ban.network, ban.ttl_ms, ban.reason, ban.id) == \
        ("ban", NET("192.0.2.9/32"), 60000, "auto", (1700000000000, 2))
    unban = fleet_wire.decode("n1", b"1-0", raw(fleet_wire.encode_unban(NET("2001:db8::/64"))))
    assert unban.op == "unban" and unban.network == NET("2001:db8::/64")
    assert fleet_wire.decode("n1", b"1-0", raw(fleet_wire.encode_hello())).op == "hello"


@pytest.mark.parametrize("fields", [
    {},
    {"v": "2", "op": "hello"},
    {"v": "1", "op": "drop-table"},
    {"v": "1", "op": "hello", "net": "192.0.2.1"},
    {"v": "1", "op": "ban", "net": "192.0.2.1/24", "ttl": "1000", "reason": "auto"},  # host bits
    {"v": "1", "op": "ban", "net": "192.0.2.1", "ttl": "0", "reason": "auto"},
    {"v": "1", "op": "ban", "net": "192.0.2.1", "ttl": "-1", "reason": "auto"},
    {"v": "1", "op": "ban", "net": "192.0.2.1", "ttl": "1e3", "reason": "auto"},
    {"v": "1", "op": "ban", "net": "192.0.2.1", "ttl": str(10 ** 15), "reason": "auto"},
    {"v": "1", "op": "ban", "net": "192.0.2.1", "ttl": "1000", "reason": "fleet"},
    {"v": "1", "op": "ban", "net": "192.0.2.1", "ttl": "1000"},
    {"v": "1", "op": "ban", "net": "192.0.2.1%eth0", "ttl": "1000", "reason": "auto"},
    {"v": "1", "op": "ban", "net": "::ffff:192.0.2.0/120", "ttl": "1000", "reason": "auto"},
    {"v": "1", "op": "unban", "net": "x" * 200},
    {"v": "1", "op": b"\xff"},
    {"v": "1", "op": "hello", **{f"f{n}": "x" for n in range(10)}},
])
def test_malformed_entries_are_refused(fields):
    with pytest.raises(fleet_wire.Malformed):
        fleet_wire.decode("n1", b"1700000000000-0", raw(fields))


@pytest.mark.parametrize("entry_id", [b"", b"abc", b"1-", b"-1", b"1-2-3", b"1" * 30 + b"-0"])
def test_malformed_ids_are_refused(entry_id):
    with pytest.raises(fleet_wire.Malformed):
        fleet_wire.parse_id(entry_id)


# --- receiving ------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.submitted = []

    def submit(self, items):
        self.submitted.extend(items)

    def queued(self):
        return len(self.submitted)


@pytest.fixture
def node(tmp_path):
    """A Fleet on a real State and BanManager with a fake kernel; this host's clock runs
    one hour behind the Redis server's (offset +3600 s)."""
    clock = FakeClock(1_700_000_000.0)
    kernel = FakeBanKernel(clock)
    state = State(tmp_path / "state.db")
    loaded = load(FLEET + "  accept:\n    rate: 5/second\n")
    bans = BanManager(loaded.bans, state, kernel, clock=clock)
    registry = metrics.new_registry()
    fleet = Fleet(loaded.fleet, state, bans, registry, wake=lambda: None, clock=clock)
    fleet.registry_ = registry
    fleet.publisher = Recorder()
    fleet.clock_, fleet.kernel_, fleet.offset = clock, kernel, 3600 * 1000
    yield fleet
    state.close()


def server_ms(node, ago=0.0):
    return int((node.clock_() + 3600 - ago) * 1000)


def entry(node, op="ban", net="192.0.2.9/32", ttl_s=600, ago=1.0, sender="n2", seq=0):
    fields = {"ban": fleet_wire.encode_ban(NET(net), ttl_s * 1000, "auto"),
              "unban": fleet_wire.encode_unban(NET(net))}[op]
    return fleet_wire.decode(sender, f"{server_ms(node, ago)}-{seq}".encode(), raw(fields))


def receive(node, *entries):
    changed = node._apply_entries(list(entries), node.offset, live=True)
    node.bans.flush()
    return changed


def test_a_received_ban_lasts_what_is_left_by_the_servers_clock(node):
    assert receive(node, entry(node, ttl_s=600, ago=100)) == 1
    # 600 s from the XADD, 100 s ago on the server's clock: 500 s left, although
    # this host's own clock is an hour behind.
    assert node.kernel_.list_bans() == {NET("192.0.2.9/32"): 500}
    [ban] = node.bans.active()
    assert ban.filter == ORIGIN + "n2" and ban.reason == "auto"
    assert node.status()["peers"]["n2"]["applied"] == 1


def test_received_bans_are_not_published_again(node):
    receive(node, entry(node))
    node.publish_ban(node.bans.active()[0])
    node.commit()
    assert node.publisher.submitted == []


def test_own_bans_go_to_the_durable_outbox_then_the_publisher(node):
    ban = node.bans.ban(NET("203.0.113.5/32"), 60)
    node.publish_ban(ban)
    node.commit()
    [(seq, op, network, expires_at, reason)] = node.state.fleet_outbox()
    assert (op, network, reason) == ("ban", "203.0.113.5/32", "manual")
    assert node.publisher.submitted == [(seq, op, network, expires_at, reason)]
    node._published([seq], 1, "1700000000000-0")
    assert node.state.fleet_outbox() == [] and node.state.fleet_meta("last_published") == "1700000000000-0"


def test_the_ignore_list_and_loopback_are_never_banned_from_outside(node):
    assert receive(node, entry(node, net="198.51.100.7/32"), entry(node, net="127.0.0.1/32"),
                   entry(node, net="::1/128")) == 0
    assert node.kernel_.list_bans() == {}
    assert node.rejected["protected"] == 3


def test_an_ipv6_ban_is_applied_exactly_as_wide_and_must_pass_the_ignore_list(node):
    assert receive(node, entry(node, net="2001:db8:7::9/128")) == 1
    assert list(node.kernel_.list_bans()) == [NET("2001:db8:7::9/128")]
    node.bans.reconfigure(load(FLEET).bans.__class__(ports=(8080,), ignore=(NET("2001:db8:8::1/128"),)))
    assert receive(node, entry(node, net="2001:db8:8::/64", seq=1)) == 0
    assert node.rejected["protected"] == 1
    # Beside the ignored address, not over it: banned, and only that address.
    assert receive(node, entry(node, net="2001:db8:8::9/128", seq=2)) == 1


def test_short_prefixes_are_refused(node):
    assert receive(node, entry(node, net="192.0.2.0/24"), entry(node, net="0.0.0.0/0"),
                   entry(node, net="2001:db8::/48")) == 0
    assert node.rejected["prefix"] == 3 and node.kernel_.list_bans() == {}


def test_durations_are_capped_and_a_future_id_buys_nothing(node):
    receive(node, entry(node, ttl_s=30 * 86400))
    assert node.kernel_.list_bans()[NET("192.0.2.9/32")] == 86400  # max_duration
    # A node that XADDs an id a year ahead: its ban counts from now, capped.
    receive(node, entry(node, net="192.0.2.10/32", ttl_s=600, ago=-365 * 86400))
    assert node.kernel_.list_bans()[NET("192.0.2.10/32")] == 600


def test_expired_bans_are_skipped(node):
    assert receive(node, entry(node, ttl_s=60, ago=61)) == 0
    assert node.rejected["expired"] == 1


def test_each_sending_node_is_rate_limited_on_its_own(node):
    flood = [entry(node, net=f"203.0.113.{n}/32", seq=n, ago=0.5) for n in range(1, 51)]
    applied = receive(node, *flood)
    assert applied == 10  # burst: twice 5/second
    assert node.rejected["rate"] == 40
    # Another node is not throttled by n2's flood.
    assert receive(node, entry(node, net="192.0.2.50/32", sender="n3")) == 1


def test_unban_from_another_node_lifts_the_ban(node):
    receive(node, entry(node))
    assert receive(node, entry(node, op="unban", ago=0.5, seq=1)) == 1
    assert node.kernel_.list_bans() == {}


def test_an_unban_lifts_the_covering_unit_but_never_a_wider_local_ban(node):
    node.bans.ban(NET("203.0.113.0/24"), 600)  # an operator's manual ban of a whole /24
    node.bans.flush()
    assert receive(node, entry(node, op="unban", net="203.0.113.7/32")) == 0
    assert node.rejected["prefix"] == 1 and NET("203.0.113.0/24") in node.kernel_.list_bans()
    receive(node, entry(node, net="2001:db8:5::/64", seq=1))
    assert receive(node, entry(node, op="unban", net="2001:db8:5::9/128", ago=0.5, seq=2)) == 1
    assert NET("2001:db8:5::/64") not in node.kernel_.list_bans()


def test_a_node_may_refuse_unbans_from_the_others(node):
    node.settings = load(FLEET + "  accept:\n    unbans: false\n").fleet
    receive(node, entry(node))
    assert receive(node, entry(node, op="unban", ago=0.5, seq=1)) == 0
    assert node.rejected["unban"] == 1 and list(node.kernel_.list_bans()) == [NET("192.0.2.9/32")]


def test_a_shorter_ban_never_shortens_a_longer_one(node):
    receive(node, entry(node, ttl_s=3000))
    assert receive(node, entry(node, ttl_s=60, seq=1)) == 0
    assert node.kernel_.list_bans()[NET("192.0.2.9/32")] == 2999


def test_malformed_entries_from_the_reader_are_counted(node):
    receive(node, ("n2", fleet_wire.Malformed("bad")), entry(node))
    assert node.rejected["malformed"] == 1 and node.applied == 1
    assert node.status()["peers"]["n2"]["rejected"] == 1


def test_token_bucket_refills_by_entry_time_and_never_backwards():
    bucket = TokenBucket(1)
    assert [bucket.take(0) for _ in range(3)] == [True, True, False]
    assert bucket.take(1000) is True and bucket.take(1000) is False
    assert bucket.take(0) is False  # an older time refills nothing


def test_at_catch_up_this_nodes_own_later_unban_outranks_an_older_ban(node):
    old = entry(node, ago=50)
    newer = entry(node, net="192.0.2.10/32", ago=5)
    own_unbans = {NET("192.0.2.9/32"): server_ms(node, ago=20), NET("192.0.2.10/32"): server_ms(node, ago=20)}
    assert node._apply_entries([old, newer], node.offset, live=False, superseded=own_unbans) == 1
    node.bans.flush()
    assert list(node.kernel_.list_bans()) == [NET("192.0.2.10/32")]


def test_manual_bans_and_unbans_are_published_by_the_ban_desk(node):
    from policyd.operator.bandesk import BanDesk
    desk = BanDesk(node.bans, publish=node.publish)
    desk.manual_ban("203.0.113.7", "10m")
    desk.manual_unban("203.0.113.8")  # not banned here: still said, the others may have it
    ops = [(op, network, reason) for _seq, op, network, _expires, reason in node.publisher.submitted]
    assert ops == [("ban", "203.0.113.7/32", "manual"), ("unban", "203.0.113.8/32", "manual")]


def test_without_a_daemon_the_outbox_keeps_the_ban_for_later(node):
    from policyd.fleet.node import outbox_writer
    outbox_writer(node.state)("ban", NET("203.0.113.9/32"), 1_700_000_600.0, "manual")
    assert [row[1:] for row in node.state.fleet_outbox()] == \
        [("ban", "203.0.113.9/32", 1_700_000_600.0, "manual")]


def test_an_entry_that_trips_a_bug_is_counted_not_fatal(node, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(node.bans, "ban", broken)
    assert receive(node, entry(node)) == 0
    assert node.rejected["malformed"] == 1


def test_a_fleet_started_again_by_a_reload_counts_in_the_same_series(node):
    receive(node, entry(node))
    again = Fleet(node.settings, node.state, node.bans, node.registry_, wake=lambda: None)
    assert again.m_applied is node.m_applied
    text = metrics.render(node.registry_)
    assert "policyd_fleet_applied_total{op=\"ban\"} 1.0" in text
    assert "policyd_fleet_connected 0.0" in text


def test_any_bytes_an_attacker_writes_are_an_entry_or_malformed_never_a_crash():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    interesting = st.sampled_from([b"v", b"op", b"net", b"ttl", b"reason", b"1", b"ban", b"unban",
                                   b"hello", b"auto", b"192.0.2.1", b"2001:db8::/64", b"60000"])
    field = st.one_of(interesting, st.binary(max_size=200))

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.one_of(st.binary(max_size=30), st.just(b"1700000000000-0")),
                      st.dictionaries(field, field, max_size=10))
    def check(raw_id, fields):
        try:
            decoded = fleet_wire.decode("n2", raw_id, fields)
        except fleet_wire.Malformed:
            return
        assert decoded.op in fleet_wire.OPS
        if decoded.op == "ban":
            assert 0 < decoded.ttl_ms <= fleet_wire.MAX_TTL_MS
    check()
