"""The ban manager's write queue on its own: pieces, order, positions last, retry."""
import ipaddress
import sqlite3

from policyd.banning.bankeys import blob as _blob, key as _key, text as _text
from policyd.banning.banqueue import KernelQueue, StateQueue
from policyd.banning.state import State


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
    monkeypatch.setattr("policyd.banning.banqueue.write_rows", broken)
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


class RecordingKernel:
    def __init__(self, refuse=False):
        self.calls, self.refuse = [], refuse

    def add_ban_keys(self, items):
        self._call("add", items)

    def replace_ban_keys(self, items):
        self._call("replace", items)

    def remove_bans(self, networks):
        self._call("remove", networks)

    def _call(self, kind, items):
        if self.refuse:
            raise OSError(105, "No buffer space available")
        self.calls.append((kind, sorted(items)))


def test_the_kernel_queue_adds_fresh_keys_replaces_others_and_keeps_what_was_refused():
    kernel = RecordingKernel(refuse=True)
    queue = KernelQueue(kernel)
    queue.banned(key("192.0.2.1/32"), 1000.5, fresh=True)
    queue.banned(key("192.0.2.2/32"), 1000.5, fresh=False)
    queue.banned(key("192.0.2.3/32"), 900.0, fresh=True)  # over before it was pushed
    queue.lifted(key("198.51.100.0/24"))
    assert queue.push(now=950.0) == 0 and queue.add, "refused: still queued"
    kernel.refuse = False
    assert queue.push(now=950.0) == 3
    assert kernel.calls == [("add", [(key("192.0.2.1/32"), 51)]),
                            ("replace", [(key("192.0.2.2/32"), 51)]),
                            ("remove", [ipaddress.ip_network("198.51.100.0/24")])]
    assert not queue.add and not queue.fresh and not queue.remove


def test_in_a_backlog_state_waits_within_bounds_and_positions_wait_with_it(tmp_path, monkeypatch):
    state = State(tmp_path / "state.db")
    queue = StateQueue(state, None)
    queue.failures[key("192.0.2.1/32")] = [(100.0, "nginx-auth")]
    queue.positions["/var/log/a.log"] = {"offset": 42}
    queue.ban_started(key("198.51.100.7/32"), (4000.0, 3, "nginx-auth", "auto", 400.0), (1, 4000.0))
    assert queue.write(backlog=True) == 0, "the kernel first: state once the backlog is read"
    monkeypatch.setattr("policyd.banning.banqueue.HELD_BAN_ROWS", 1)  # too many bans held: written
    assert queue.write(backlog=True) == 2  # the ban and its history, not the failures
    assert state.load_bans(now=0.0) and not state.load_failures(since=0.0)
    assert state.load_position("/var/log/a.log") is None, "not before the failures it covers"
    assert queue.write(backlog=True) == 0
    monkeypatch.setattr("policyd.banning.banqueue.HELD_FAILURE_KEYS", 0)  # too many failures held
    assert queue.write(backlog=True) == 1
    assert state.load_failures(since=0.0) and state.load_position("/var/log/a.log") == {"offset": 42}
    state.close()


def test_after_a_backlog_everything_is_written(tmp_path):
    state = State(tmp_path / "state.db")
    queue = StateQueue(state, None)
    queue.failures[key("192.0.2.1/32")] = [(100.0, "nginx-auth")]
    queue.ban_started(key("198.51.100.7/32"), (4000.0, 3, "nginx-auth", "auto", 400.0), (1, 4000.0))
    queue.positions["/var/log/a.log"] = {"offset": 42}
    assert queue.write(backlog=False) == 3
    assert state.load_position("/var/log/a.log") == {"offset": 42} and not queue.pending()
    state.close()
