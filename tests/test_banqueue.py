"""The ban manager's write queue on its own: pieces, order, positions last, retry."""
import ipaddress
import sqlite3

from policyd.bans import _blob, _key, _text
from policyd.banqueue import StateQueue
from policyd.state import State


def key(text):
    return _key(ipaddress.ip_network(text))


def test_positions_ride_with_the_last_piece_and_a_failed_write_is_kept(tmp_path, monkeypatch):
    state = State(tmp_path / "state.db")
    queue = StateQueue(state, None, blob=_blob, text=_text)
    for n in range(5):
        queue.failures.setdefault(key(f"192.0.2.{n}/32"), []).append((100.0 + n, "nginx-auth"))
    queue.ban_started(key("198.51.100.7/32"), (4000.0, 5, "nginx-auth", "auto", 400.0), (1, 4000.0))
    queue.positions["/var/log/a.log"] = {"offset": 42}
    assert queue.write(max_rows=3) == 3
    assert state.load_position("/var/log/a.log") is None, "not before the failures it covers"
    assert queue.pending()

    def broken(*_args):
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr("policyd.banqueue.write_rows", broken)
    assert queue.write() == 0 and queue.pending(), "kept for the next flush"
    monkeypatch.undo()
    assert queue.write() == 4
    assert not queue.pending()
    assert state.load_position("/var/log/a.log") == {"offset": 42}
    assert len(state.load_failures(since=0.0)) == 5
    assert state.load_history_of(_blob(key("198.51.100.7/32"))) == (1, 4000.0)
    queue.ban_ended(key("198.51.100.7/32"), (1, 500.0))
    assert queue.history(key("198.51.100.7/32")) == (1, 500.0)
    queue.write()
    assert state.load_bans(now=0.0) == []
    state.close()
