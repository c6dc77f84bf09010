"""The ban book on its own: escalation by history (queued, stored, decayed), a
batch of auto bans sharing one expiry entry, expiry, and a state whose history
cannot be read still banning (first offence)."""
import ipaddress
import sqlite3

from fakes import Settings
from policyd.banning.banbook import BanBook
from policyd.banning.bankeys import blob, key
from policyd.banning.banqueue import KernelQueue, StateQueue
from policyd.banning.state import State

NOW = 1_000_000.0


def k(text):
    return key(ipaddress.ip_network(text))


def book_of(tmp_path, history=(), **settings):
    """A book on a state file holding `history` rows, written before it starts (the
    running daemon is the only writer of history)."""
    state = State(tmp_path / "state.db")
    with state.transaction() as writer:
        writer.upsert_history(history)
    return BanBook(Settings(**settings), state, StateQueue(state, None, history_ahead=True),
                   KernelQueue(kernel=None))


def test_a_batch_of_auto_bans_escalates_each_by_its_own_history(tmp_path):
    book = book_of(tmp_path, bantime=100, bantime_max=10_000, history=[
        (blob(k("192.0.2.2/32")), 2, NOW - 50),        # banned twice, the last ended 50 s ago
        (blob(k("192.0.2.4/32")), 5, NOW - 20_000)])   # quiet longer than bantime_max: decayed
    book.state_queue.history_unwritten[k("192.0.2.3/32")] = (1, NOW - 10)  # not yet written
    book.state_queue.history_filter.wait()
    due = {k(f"192.0.2.{n}/32"): ("nginx-auth", 3) for n in (1, 2, 3, 4)}
    made = dict(book.start_auto(due, NOW))
    assert {key_: entry[0] - NOW for key_, entry in made.items()} == {
        k("192.0.2.1/32"): 100, k("192.0.2.2/32"): 400, k("192.0.2.3/32"): 200, k("192.0.2.4/32"): 100}
    assert book.state_queue.history(k("192.0.2.2/32")) == (3, NOW + 400)
    assert book.kernel_queue.fresh == {k("192.0.2.1/32")}  # the others may linger in the kernel
    assert book.bans_total["auto"] == 4
    assert len(book._expiry) == 3  # one entry per expiry time of the batch, not per ban


def test_bans_expire_once_and_a_replaced_ban_keeps_its_new_time(tmp_path):
    book = book_of(tmp_path, bantime=100)
    book.start_auto({k("192.0.2.1/32"): ("f", 3), k("192.0.2.2/32"): ("f", 3)}, NOW)
    book.start(k("192.0.2.2/32"), 500, 0, None, "manual", NOW)  # extended
    assert [key_ for key_, _entry in book.expire(NOW + 100)] == [k("192.0.2.1/32")]
    assert book.expire(NOW + 100) == []
    assert list(book.active) == [k("192.0.2.2/32")]
    assert book.state_queue.history(k("192.0.2.1/32")) == (1, NOW + 100)
    assert book.covering(k("192.0.2.2/32")) == k("192.0.2.2/32")


def test_an_unreadable_history_bans_as_a_first_offence(tmp_path):
    book = book_of(tmp_path, bantime=100)
    broken = sqlite3.connect(tmp_path / "state.db")
    broken.execute("DROP TABLE ban_history")  # a damaged file: reads of it fail
    broken.close()
    made = book.start_auto({k("192.0.2.1/32"): ("f", 3)}, NOW)
    assert made == [(k("192.0.2.1/32"), (NOW + 100, 3, "f", "auto", NOW))]
    assert book.start(k("192.0.2.9/32"), None, 3, "f", "auto", NOW)[0] == NOW + 100
