"""The ban history's Bloom filter: stored keys and keys added while it was read are
'maybe', others 'no'; without a readable file every key is 'maybe'; and the ban
path asks the state file only about keys that may have history."""
import ipaddress

from fakes import FakeBanKernel, Settings
from policyd.banning.bankeys import blob, key
from policyd.banning.bans import BanManager
from policyd.banning.historyfilter import HistoryFilter
from policyd.banning.state import State


def b(text):
    return blob(key(ipaddress.ip_network(text)))


def test_stored_and_added_keys_may_have_history_others_do_not(tmp_path):
    state = State(tmp_path / "state.db")
    with state.transaction() as writer:
        writer.upsert_history([(b("192.0.2.1/32"), 1, 5.0), (b("2001:db8::/64"), 3, 5.0)])
    history = HistoryFilter(state.path)
    history.add(b("192.0.2.2/32"))  # possibly before the thread read the file
    history.wait()
    history.add(b("192.0.2.3/32"))
    for text in ("192.0.2.1/32", "2001:db8::/64", "192.0.2.2/32", "192.0.2.3/32"):
        assert history.may_have(b(text)), text
    assert not any(history.may_have(b(f"198.51.100.{n}/32")) for n in range(200))
    state.close()


def test_an_unreadable_file_means_every_key_may_have_history(tmp_path):
    (tmp_path / "state.db").write_bytes(b"not sqlite at all" * 100)
    history = HistoryFilter(tmp_path / "state.db")
    history.wait()
    history.add(b("192.0.2.1/32"))
    assert history.may_have(b("198.51.100.1/32"))


def test_first_offenders_cost_no_query_and_a_returning_one_still_escalates(tmp_path, clock):
    state = State(tmp_path / "state.db")
    settings = Settings(maxretry=2, bantime=100, bantime_max=10_000)
    first = BanManager(settings, state, FakeBanKernel(clock), clock=clock)
    assert first.queue.history_filter is None  # no writer thread: not a daemon's
    first.record_failures([(ipaddress.ip_address("192.0.2.50"), "f", None)] * 2)
    first.flush()
    clock.advance(150)
    first.expire()
    restarted = BanManager(settings, state, FakeBanKernel(clock), clock=clock, history_ahead=True)
    restarted.queue.history_filter.wait()
    asked = []
    real = state.load_history_of_many
    state.load_history_of_many = lambda keys: asked.append(keys) or real(keys)
    newcomers = [(ipaddress.ip_address(f"198.51.100.{n}"), "f", None) for n in range(1, 100)] * 2
    bans = restarted.record_failures(newcomers + [(ipaddress.ip_address("192.0.2.50"), "f", None)] * 2)
    assert len(bans) == 100
    assert [len(keys) for keys in asked] == [1], "only the returning offender is looked up"
    assert {ban.expires_at - ban.banned_at for ban in bans if str(ban.network) == "192.0.2.50/32"} == {200}
    state.close()
