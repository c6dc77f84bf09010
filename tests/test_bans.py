"""BanManager against a fake kernel and a fake clock: the window, escalation,
never-ban rules, IPv6 aggregation, batching, kernel failures and restarts."""
import ipaddress

import pytest

from fakes import FakeBanKernel, Settings
from policyd.banning.bans import Ban, BanManager
from policyd.errors import InputError
from policyd.banning.state import State

ip = ipaddress.ip_address
net = ipaddress.ip_network


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state.db"


@pytest.fixture
def make(db_path, clock, ban_kernel):
    opened = []

    def make(settings=None):
        state = State(db_path)
        opened.append(state)
        return BanManager(settings or Settings(), state, ban_kernel, clock=clock)
    yield make
    for state in opened:
        state.close()


def fail(manager, address, times, filter_name="nginx-auth"):
    """Record `times` failures; return the results."""
    return [manager.record_failure(ip(address), filter_name) for _ in range(times)]


def test_four_failures_in_window_do_not_ban_the_fifth_does(make, clock, ban_kernel):
    manager = make()
    for _ in range(4):
        assert manager.record_failure(ip("192.0.2.10"), "nginx-auth") is None
        clock.advance(100)
    ban = manager.record_failure(ip("192.0.2.10"), "nginx-auth")
    assert ban == Ban(net("192.0.2.10/32"), clock.now + 3600, 5, "nginx-auth", "auto", clock.now)
    assert ban_kernel.batches == []  # queued only, until flush
    assert manager.flush() == 1
    assert ban_kernel.batches == [("add", [(net("192.0.2.10/32"), 3600)])]


def test_findtime_edge_first_failure_exactly_findtime_ago_still_counts(make, clock):
    manager = make()
    fail(manager, "192.0.2.11", 1)
    clock.advance(300)
    fail(manager, "192.0.2.11", 3)
    clock.advance(300)
    assert manager.record_failure(ip("192.0.2.11"), "nginx-auth") is not None


def test_failures_spread_beyond_findtime_never_ban(make, clock):
    manager = make()
    for _ in range(20):
        assert manager.record_failure(ip("192.0.2.12"), "nginx-auth") is None
        clock.advance(151)  # the fifth is always 604 s after the first
    assert manager.active() == []


def test_further_failures_while_banned_do_not_reban(make, clock, ban_kernel):
    manager = make()
    first = fail(manager, "192.0.2.13", 5)[-1]
    manager.flush()
    clock.advance(10)
    assert fail(manager, "192.0.2.13", 10) == [None] * 10
    assert manager.flush() == 0
    assert manager.active() == [first]
    assert len(ban_kernel.batches) == 1
    assert manager.failures_total["nginx-auth"] == 15


def test_ban_length_doubles_per_previous_ban_and_is_capped(make, clock):
    manager = make(Settings(bantime=3600, bantime_max=5 * 3600))
    lengths = []
    for _ in range(5):
        ban = fail(manager, "198.51.100.7", 5)[-1]
        lengths.append(ban.expires_at - ban.banned_at)
        clock.advance(ban.expires_at - clock.now + 1)
        assert [b.network for b in manager.expire()] == [ban.network]
    assert lengths == [3600, 7200, 14400, 18000, 18000]


def test_escalation_is_per_network(make, clock):
    manager = make()
    first = fail(manager, "198.51.100.8", 5)[-1]
    clock.advance(first.expires_at - clock.now + 1)
    manager.expire()
    again = fail(manager, "198.51.100.8", 5)[-1]
    other = fail(manager, "198.51.100.9", 5)[-1]
    assert again.expires_at - again.banned_at == 7200
    assert other.expires_at - other.banned_at == 3600


def test_escalation_history_decays_after_bantime_max_of_quiet(make, clock):
    manager = make(Settings(bantime=3600, bantime_max=4 * 3600))
    for expected in (3600, 7200):
        ban = fail(manager, "198.51.100.10", 5)[-1]
        assert ban.expires_at - ban.banned_at == expected
        clock.advance(ban.expires_at - clock.now + 1)
        manager.expire()
    # Just short of bantime_max after the last ban ended: still a repeat offender.
    clock.advance(4 * 3600 - 10)
    ban = fail(manager, "198.51.100.10", 5)[-1]
    assert ban.expires_at - ban.banned_at == 14400
    clock.advance(ban.expires_at - clock.now)
    manager.expire()
    # A full bantime_max without a ban: it starts again at the first bantime.
    clock.advance(4 * 3600)
    ban = fail(manager, "198.51.100.10", 5)[-1]
    assert ban.expires_at - ban.banned_at == 3600


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "192.168.1.50", "2001:db8:ff::7"])
def test_loopback_and_ignored_sources_are_never_banned(make, ban_kernel, address):
    manager = make(Settings(ignore=(net("192.168.1.50/32"), net("2001:db8:ff::/48"))))
    assert fail(manager, address, 50) == [None] * 50
    assert manager.flush() == 0
    assert manager.active() == [] and ban_kernel.batches == []
    assert manager.ignored_total["nginx-auth"] == 50


def test_ipv4_mapped_loopback_is_never_banned_normalized_or_not(make):
    manager = make()
    normalized = ip("::ffff:127.0.0.1").ipv4_mapped
    assert [manager.record_failure(normalized, "caddy-auth") for _ in range(10)] == [None] * 10
    assert [manager.record_failure(ip("::ffff:127.0.0.1"), "caddy-auth") for _ in range(10)] == [None] * 10
    assert manager.active() == []


def test_ipv4_mapped_offender_is_banned_as_ipv4(make):
    manager = make()
    ban = [manager.record_failure(ip("::ffff:192.0.2.77"), "caddy-auth") for _ in range(5)][-1]
    assert ban.network == net("192.0.2.77/32")


def test_ipv6_addresses_in_one_slash64_count_together(make):
    manager = make()
    fail(manager, "2001:db8:1:2::1", 2)
    fail(manager, "2001:db8:1:2::ffff", 2)
    assert fail(manager, "2001:db8:1:3::1", 4) == [None] * 4  # another /64: own count
    ban = manager.record_failure(ip("2001:db8:1:2:abcd::9"), "nginx-auth")
    assert ban.network == net("2001:db8:1:2::/64")
    assert ban.failures == 5
    # Once the /64 is banned, any address in it is already covered.
    assert manager.record_failure(ip("2001:db8:1:2::5"), "nginx-auth") is None


def test_ipv6_prefix_is_narrowed_when_it_would_cover_an_ignored_address(make):
    manager = make(Settings(ignore=(net("2001:db8:5:5::1/128"),)))
    ban = fail(manager, "2001:db8:5:5::66", 5)[-1]
    assert ban.network == net("2001:db8:5:5::66/128")
    assert fail(manager, "2001:db8:5:5::1", 10) == [None] * 10


def test_burst_of_1000_offenders_is_one_kernel_batch(make, ban_kernel):
    manager = make(Settings(maxretry=1))
    offenders = [ipaddress.IPv4Address(0xC6336400 + i) for i in range(256)] + \
                [ipaddress.IPv6Address((0x20010DB8 << 96) + (i << 64) + 1) for i in range(744)]
    bans = [manager.record_failure(address, "nginx-auth") for address in offenders]
    assert all(bans)
    assert manager.flush() == 1000
    assert len(ban_kernel.batches) == 1
    kind, batch = ban_kernel.batches[0]
    assert kind == "add" and len(batch) == 1000
    assert {network for network, _ in batch} == {ban.network for ban in bans}
    assert {timeout for _, timeout in batch} == {3600}
    assert manager.flush() == 0 and len(ban_kernel.batches) == 1


def test_kernel_failure_keeps_the_queue_for_the_next_flush(make, ban_kernel, clock, caplog):
    manager = make()
    ban_kernel.failing = True
    ban = fail(manager, "203.0.113.5", 5)[-1]
    assert manager.flush() == 0
    assert "kept queued" in caplog.text
    assert manager.active() == [ban]  # still decided and persisted, only not enforced yet
    clock.advance(30)
    ban_kernel.failing = False
    assert manager.flush() == 1
    assert ban_kernel.batches == [("add", [(net("203.0.113.5/32"), 3600 - 30)])]


def test_kernel_failure_on_removal_is_retried(make, ban_kernel):
    manager = make()
    manager.ban("203.0.113.6", 600)
    manager.flush()
    manager.unban("203.0.113.6")
    ban_kernel.failing = True
    assert manager.flush() == 0
    ban_kernel.failing = False
    assert manager.flush() == 1
    assert ban_kernel.batches[-1] == ("remove", [net("203.0.113.6/32")])


def test_restart_restores_remaining_time_and_keeps_history(make, clock, ban_kernel, db_path):
    manager = make()
    first = fail(manager, "198.51.100.20", 5)[-1]
    manual = manager.ban(net("2001:db8:77::/48"), 7200)
    clock.advance(first.expires_at - clock.now + 1)
    manager.expire()
    again = fail(manager, "198.51.100.20", 5)[-1]  # second ban: 7200 s
    manager.flush()
    manager.state.close()

    clock.advance(1000)
    ban_kernel.elements.clear()  # e.g. `nft flush ruleset` while the daemon was down
    ban_kernel.batches.clear()
    restarted = make()
    assert restarted.active() == sorted([again, manual], key=lambda ban: ban.expires_at)
    assert restarted.restore() == 2
    kind, batch = ban_kernel.batches[0]
    assert kind == "add"
    assert sorted(batch, key=lambda pair: str(pair[0])) == sorted(
        [(again.network, int(again.expires_at - clock.now)),
         (manual.network, int(manual.expires_at - clock.now))], key=lambda pair: str(pair[0]))
    assert len(ban_kernel.batches) == 1
    clock.advance(again.expires_at - clock.now + 1)
    restarted.expire()
    third = fail(restarted, "198.51.100.20", 5)[-1]
    assert third.expires_at - third.banned_at == 14400


def test_restart_keeps_the_failure_window(make, clock):
    manager = make()
    fail(manager, "192.0.2.30", 4)
    manager.flush()
    manager.state.close()
    clock.advance(60)
    restarted = make()
    assert restarted.record_failure(ip("192.0.2.30"), "nginx-auth") is not None


def test_restart_does_not_count_failures_that_led_to_a_ban(make, clock):
    manager = make()
    fail(manager, "192.0.2.31", 3)
    manager.flush()
    fail(manager, "192.0.2.31", 2)
    manager.unban("192.0.2.31")
    manager.flush()
    manager.state.close()
    restarted = make()
    assert fail(restarted, "192.0.2.31", 4) == [None] * 4


def test_failures_older_than_findtime_are_not_restored(make, clock):
    manager = make()
    fail(manager, "192.0.2.32", 4)
    manager.flush()
    clock.advance(601)
    manager.expire()
    manager.state.close()
    restarted = make()
    assert fail(restarted, "192.0.2.32", 4) == [None] * 4


def test_expire_drops_only_bans_whose_time_has_passed(make, clock, ban_kernel):
    manager = make()
    short = manager.ban("203.0.113.40", 100)
    long = manager.ban("203.0.113.41", 1000)
    manager.flush()
    clock.advance(99)
    assert manager.expire() == []
    clock.advance(1)
    assert manager.expire() == [short]
    assert manager.active() == [long]
    assert manager.active_count == 1
    manager.state.close()
    assert make().active() == [long]
    assert [kind for kind, _ in ban_kernel.batches] == ["add"]  # the kernel expires its own


def test_manual_ban_and_unban(make, clock, ban_kernel):
    manager = make()
    ban = manager.ban("203.0.113.50", 900)
    assert ban == Ban(net("203.0.113.50/32"), clock.now + 900, 0, None, "manual", clock.now)
    assert manager.flush() == 1
    assert manager.unban("203.0.113.50") == net("203.0.113.50/32")
    assert manager.unban("203.0.113.50") is None
    assert manager.flush() == 1
    assert ban_kernel.batches == [("add", [(net("203.0.113.50/32"), 900)]),
                              ("remove", [net("203.0.113.50/32")])]
    assert manager.active() == []


@pytest.mark.parametrize("network", ["128.0.0.0/1", "10.0.0.0/7", "2000::/3", "2000::/15"])
def test_bans_wider_than_a_deny_list_belongs_are_refused(make, ban_kernel, network):
    manager = make()
    with pytest.raises(InputError, match="deny list"):
        manager.ban(network, 60)
    assert manager.flush() == 0 and ban_kernel.batches == []


def test_manual_ban_without_duration_uses_escalated_bantime(make):
    manager = make()
    assert manager.ban(ip("2001:db8:9::1"), None).expires_at - manager.clock() == 3600


def test_unban_by_address_lifts_the_covering_slash64(make, ban_kernel):
    manager = make()
    fail(manager, "2001:db8:4:4::1", 5)
    manager.flush()
    # It says which network it lifted: more than the address asked for.
    assert manager.unban(ip("2001:db8:4:4::abc")) == net("2001:db8:4:4::/64")
    manager.flush()
    assert ban_kernel.batches[-1] == ("remove", [net("2001:db8:4:4::/64")])


def test_ban_then_unban_before_flush_nets_out_to_a_removal(make, ban_kernel):
    manager = make()
    manager.ban("198.51.100.60", 600)
    manager.unban("198.51.100.60")
    manager.flush()
    assert ban_kernel.batches == [("remove", [net("198.51.100.60/32")])]


@pytest.mark.parametrize("target", ["127.0.0.1", "::1", "127.0.0.0/8", "192.168.1.50",
                                    "192.168.1.0/24", "0.0.0.0/0"])
def test_manual_ban_of_loopback_or_ignored_is_refused(make, target):
    manager = make(Settings(ignore=(net("192.168.1.50/32"),)))
    with pytest.raises(InputError):
        manager.ban(target, 600)
    assert manager.active() == []


@pytest.mark.parametrize("target, duration", [("not-an-address", 60), ("192.0.2.1/24", 60),
                                              ("192.0.2.1", 0), ("192.0.2.1", -5),
                                              ("192.0.2.1", 10**12), ("192.0.2.1", 1.5)])
def test_manual_ban_bad_input_is_an_input_error(make, target, duration):
    with pytest.raises(InputError):
        make().ban(target, duration)


def test_manual_ban_overlapping_an_existing_ban_is_refused(make):
    manager = make()
    manager.ban("198.51.100.0/24", 600)
    with pytest.raises(InputError, match="inside"):
        manager.ban("198.51.100.7", 600)
    manager.ban("203.0.113.9", 600)
    with pytest.raises(InputError, match="overlap"):
        manager.ban("203.0.113.0/24", 600)


def test_failures_inside_a_wider_manual_ban_do_not_ban_again(make, ban_kernel):
    manager = make()
    manager.ban("198.51.100.0/24", 600)
    assert fail(manager, "198.51.100.99", 6) == [None] * 6
    manager.flush()
    assert ban_kernel.batches == [("add", [(net("198.51.100.0/24"), 600)])]


def test_reconcile_readds_only_what_the_kernel_lacks(make, ban_kernel):
    manager = make(Settings(maxretry=1))
    for last_octet in (1, 2, 3):
        fail(manager, f"192.0.2.{last_octet}", 1)
    manager.flush()
    assert manager.reconcile() == 0
    del ban_kernel.elements[net("192.0.2.2/32")]
    assert manager.reconcile() == 1
    assert ban_kernel.batches[-1] == ("add", [(net("192.0.2.2/32"), 3600)])
    ban_kernel.elements.clear()
    assert manager.reconcile() == 3
    assert len(ban_kernel.batches[-1][1]) == 3


def test_bans_are_counted_by_reason(make):
    manager = make()
    fail(manager, "192.0.2.70", 5, "nginx-auth")
    fail(manager, "192.0.2.71", 2, "caddy-auth")
    fail(manager, "127.0.0.1", 1, "caddy-auth")
    manager.ban("203.0.113.70", 60)
    assert manager.failures_total == {"nginx-auth": 5, "caddy-auth": 3}
    assert manager.ignored_total == {"caddy-auth": 1}
    assert manager.bans_total == {"auto": 1, "manual": 1}
    assert manager.active_count == 2


def test_ban_as_dict_is_json_ready(make):
    ban = make().ban("2001:db8:abc::/48", 60)
    assert ban.as_dict()["network"] == "2001:db8:abc::/48"
    assert ban.as_dict()["reason"] == "manual"


def test_kernel_timeout_rounds_up_so_the_kernel_never_lifts_a_ban_early(make, clock, ban_kernel):
    manager = make()
    manager.ban("192.0.2.90", 100)
    clock.advance(0.4)
    manager.flush()
    assert ban_kernel.batches == [("add", [(net("192.0.2.90/32"), 100)])]


def test_extending_an_active_ban_is_not_a_new_offence(make, clock, ban_kernel):
    manager = make()
    manager.ban("192.0.2.91", 100)
    extended = manager.ban("192.0.2.91", 5000)
    manager.flush()
    assert manager.active() == [extended]
    assert ban_kernel.batches == [("add", [(net("192.0.2.91/32"), 5000)])]
    clock.advance(5001)
    manager.expire()
    assert manager.ban("192.0.2.91", None).expires_at - clock.now == 7200  # one previous ban


def test_ban_is_persisted_even_while_the_kernel_refuses(make, ban_kernel):
    manager = make()
    ban_kernel.failing = True
    ban = fail(manager, "203.0.113.80", 5)[-1]
    manager.flush()
    manager.state.close()
    ban_kernel.failing = False
    restarted = make()
    assert restarted.active() == [ban]
    assert restarted.restore() == 1


def test_bans_that_the_grown_ignore_list_covers_are_lifted(make, ban_kernel):
    manager = make()
    fail(manager, "2001:db8:66:1::9", 5)
    fail(manager, "192.0.2.66", 5)
    manager.flush()
    lifted = manager.reconfigure(Settings(ignore=(net("2001:db8:66:1::1/128"),)))
    assert [ban.network for ban in lifted] == [net("2001:db8:66:1::/64")]
    assert manager.flush() == 1
    assert ban_kernel.batches[-1] == ("remove", [net("2001:db8:66:1::/64")])
    assert [ban.network for ban in manager.active()] == [net("192.0.2.66/32")]
    manager.state.close()
    # A restart with the old ban still on file and a new ignore list lifts it too.
    restarted = make(Settings(ignore=(net("192.0.2.66/32"),)))
    assert restarted.active() == []
    restarted.flush()
    assert ban_kernel.batches[-1] == ("remove", [net("192.0.2.66/32")])


def test_unban_then_ban_again_before_flush_ends_banned(make, ban_kernel):
    manager = make()
    manager.ban("198.51.100.61", 600)
    manager.flush()
    manager.unban("198.51.100.61")
    manager.ban("198.51.100.61", 900)
    manager.flush()
    assert ban_kernel.batches[-1] == ("add", [(net("198.51.100.61/32"), 900)])
    assert net("198.51.100.61/32") in ban_kernel.list_bans()


def test_after_restart_bans_expire_in_expiry_order(make, clock):
    manager = make()
    for address, seconds in [("192.0.2.101", 300), ("192.0.2.102", 100), ("192.0.2.103", 200),
                             ("2001:db8:8::", 100), ("192.0.2.104", 50)]:
        manager.ban(address, seconds)
    manager.flush()
    manager.state.close()
    restarted = make()
    clock.advance(150)
    assert sorted(str(ban.network) for ban in restarted.expire()) == [
        "192.0.2.102/32", "192.0.2.104/32", "2001:db8:8::/128"]
    clock.advance(100)
    assert [str(ban.network) for ban in restarted.expire()] == ["192.0.2.103/32"]
    assert [str(ban.network) for ban in restarted.active()] == ["192.0.2.101/32"]


# The flood path: record_failures, bans by key, state written in pieces.

def _offenders(count, per_source):
    """IPv4 and IPv6 sources interleaved as a flood would write them."""
    sources = [ip(f"198.51.100.{i}") for i in range(1, count // 2 + 1)]
    sources += [ip(f"2001:db8:{i:x}::7") for i in range(1, count - len(sources) + 1)]
    return [address for _ in range(per_source) for address in sources], sources


def test_a_batch_bans_exactly_what_one_failure_at_a_time_bans(make, db_path, tmp_path, clock):
    failures, sources = _offenders(60, 5)
    failures.append(ip("127.0.0.1"))            # loopback: never
    failures.append(ip("::ffff:198.51.100.1"))   # mapped: counts as the IPv4 address
    one_by_one = make()
    singles = [one_by_one.record_failure(address, "nginx-auth") for address in failures]
    singles = [ban for ban in singles if ban is not None]
    batch_state = State(tmp_path / "batch.db")
    try:
        batched = BanManager(Settings(), batch_state, FakeBanKernel(clock), clock=clock)
        made = batched.record_failures([(address, "nginx-auth", None) for address in failures])
        assert len(made) == len(singles) == len(sources)
        assert list(made) == singles
        assert made[:2] == singles[:2]
        assert made.filters() == ["nginx-auth"]
        for counts in ("failures_total", "ignored_total", "bans_total", "active_count"):
            assert getattr(batched, counts) == getattr(one_by_one, counts), counts
    finally:
        batch_state.close()


def test_a_batch_reads_ban_history_in_one_query_not_one_per_ban(make, clock, monkeypatch):
    manager = make()
    fail(manager, "192.0.2.40", 5)  # banned once: its next ban is twice as long
    manager.unban("192.0.2.40")
    manager.flush()
    manager.state.close()
    manager = make()
    monkeypatch.setattr(manager.state, "load_history_of",
                        lambda key: pytest.fail("one history query per ban"))
    failures = [(ip(f"192.0.2.{40 + n}"), "nginx-auth", None) for n in range(10) for _ in range(5)]
    made = manager.record_failures(failures)
    assert len(made) == 10
    durations = {str(ban.network): ban.expires_at - ban.banned_at for ban in made}
    assert durations["192.0.2.40/32"] == 2 * 3600
    assert durations["192.0.2.41/32"] == 3600


def test_first_bans_are_added_and_repeat_offenders_replaced(make, ban_kernel, monkeypatch):
    # A network never banned has no element that could linger in the kernel, so a
    # plain add is enough; a repeat offender's element is replaced for its new timeout.
    calls = []
    monkeypatch.setattr(ban_kernel, "add_ban_keys", lambda items: calls.append(("add", len(items))))
    monkeypatch.setattr(ban_kernel, "replace_ban_keys", lambda items: calls.append(("replace", len(items))))
    manager = make()
    fail(manager, "192.0.2.50", 5)
    fail(manager, "192.0.2.51", 5)
    manager.flush()
    assert calls == [("add", 2)]
    manager.unban("192.0.2.50")
    manager.flush()
    calls.clear()
    fail(manager, "192.0.2.50", 5)
    manager.flush()
    assert calls == [("replace", 1)]


def test_state_is_written_in_pieces_and_a_restart_sees_all_of_it(make, clock):
    manager = make()
    failures, sources = _offenders(40, 5)
    manager.record_failures([(address, "nginx-auth", None) for address in failures])
    fail(manager, "203.0.113.9", 2)  # a window still open
    manager.flush(write_state=False)
    assert manager.state_pending()
    pieces = 0
    while manager.state_pending():
        assert manager.write_state(max_rows=7) > 0
        pieces += 1
    assert pieces > 5
    manager.state.close()
    restarted = make()
    assert restarted.active_count == len(sources)
    assert fail(restarted, "203.0.113.9", 3)[-1] is not None  # 2 + 3 = maxretry


def test_a_window_that_went_quiet_is_forgotten_with_one_entry_per_network(make, clock):
    manager = make()
    for _ in range(4):
        fail(manager, "192.0.2.60", 1)
        clock.advance(1)
    assert len(manager.window.order) == 1  # one entry per open window, not per failure
    clock.advance(600)
    manager.expire()
    assert not manager.window.times and not manager.window.order


def test_restore_after_an_ipv6_prefix_change_replaces_the_ipv6_elements_in_one_batch(make,
                                                                                       ban_kernel):
    manager = make()
    manager.ban("2001:db8:4::/64", 600)
    manager.ban("198.51.100.9", 600)
    manager.flush()
    ban_kernel.elements[net("2001:db8:77::/56")] = ban_kernel.clock() + 60  # stale, other meaning
    assert manager.restore(flush_ipv6=True) == 2
    assert ban_kernel.batches[-2] == ("flush6", [])
    assert set(ban_kernel.list_bans()) == {net("2001:db8:4::/64"), net("198.51.100.9/32")}


def test_a_state_file_whose_history_cannot_be_read_still_bans_as_a_first_offence(make, db_path):
    """State raises HostError on a damaged read; the ban path caught only InputError,
    so one unreadable table stopped every ban of a slice."""
    import sqlite3
    manager = make(Settings(maxretry=3, bantime=600))
    broken = sqlite3.connect(db_path)
    broken.execute("DROP TABLE ban_history")
    broken.close()
    bans = manager.record_failures([(ip("192.0.2.90"), "nginx-auth", None)] * 3)
    assert [(ban.network, ban.expires_at - ban.banned_at) for ban in bans] == [(net("192.0.2.90/32"), 600)]
    assert manager.record_failure(ip("192.0.2.91"), "nginx-auth") is None
    assert fail(manager, "192.0.2.91", 2)[-1].expires_at - manager.clock() == 600
