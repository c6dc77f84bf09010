"""The daemon's flood path and its worker, with a fake kernel and no namespace:
logs read in slices, each slice's bans in the kernel before the next is read,
state written in pieces and positions only after it; reloads and housekeeping
of the policy on the worker thread; the fast address parser agreeing with
ipaddress."""
import ipaddress
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.daemon import core as daemon_mod
from policyd.daemon import control as daemon_control, logs as daemon_logs
from policyd.addr import parse_host
from policyd.banning.bans import BanManager
from policyd.daemon.chores import Chores
from policyd.logs.sources import LogSource
from policyd.banning.state import State
from policyd.banning.statewriter import QueuedPositions, StateWriter
from fakes import FakeClock, Settings


class CountingKernel:
    """Records the keys of each add batch; the bans module's BanKernel."""

    def __init__(self):
        self.batches = []

    def add_ban_keys(self, items):
        self.batches.append([key for key, _seconds in items])

    replace_ban_keys = add_ban_keys

    def remove_bans(self, networks):
        pass

    def list_ban_keys(self):
        return {key for batch in self.batches for key in batch}


def flood(path, sources, per_source):
    with open(path, "ab") as out:
        for round_ in range(per_source):
            for i in range(sources):
                out.write(f'2026/11/26 20:00:00 [error] 1#1: *{i} user "u{round_}": password mismatch, '
                          f'client: 2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::7, server: _, '
                          f'request: "GET / HTTP/1.1", host: "x"\n'.encode())


@pytest.fixture
def daemon(tmp_path):
    """A Daemon with its logs, bans and state, without kernel, sockets or threads."""
    log = tmp_path / "flood.log"
    log.write_bytes(b"")
    state = State(tmp_path / "state.db")
    the_daemon = daemon_mod.Daemon(tmp_path / "policy.yaml", tmp_path, tmp_path)
    the_daemon.state = state
    the_daemon.state_writer = StateWriter(state.path)
    the_daemon.state_writer.start()
    the_daemon.kernel = CountingKernel()
    the_daemon.clock = FakeClock()
    the_daemon.bans = BanManager(Settings(maxretry=3), state, the_daemon.kernel, clock=the_daemon.clock,
                                 writer=the_daemon.state_writer)
    positions = QueuedPositions(state, the_daemon.bans.queue_position)
    the_daemon.sources = [LogSource(SimpleNamespace(path=str(log), filter="nginx-auth", mode=None),
                                               positions)]
    the_daemon.log_path = log
    yield the_daemon
    the_daemon.state_writer.stop()
    state.close()


def settle(daemon):
    """Turn the loop's state half until everything is written (the writer is real)."""
    while daemon.bans.state_pending() or daemon.state_writer.queued():
        daemon.next_state_write = 0.0
        daemon._save()
        time.sleep(0.001)
        daemon.bans.state_written(daemon.state_writer.collect())


def test_a_flood_is_banned_slice_by_slice_and_every_source_once(daemon, monkeypatch):
    monkeypatch.setattr(daemon_logs, "READ_SLICE_LINES", 200)
    flood(daemon.log_path, 3000, 3)
    turns = 0
    while daemon._read_logs():
        turns += 1
    settle(daemon)
    banned = [key for batch in daemon.kernel.batches for key in batch]
    assert len(banned) == len(set(banned)) == 3000
    assert turns > 5 and len(daemon.kernel.batches) > 3  # bans went in as the slices came
    assert daemon.sources[0].matched == 9000


def test_positions_wait_until_the_state_they_cover_is_written(daemon, monkeypatch):
    monkeypatch.setattr(daemon_mod, "STATE_CHUNK_ROWS", 50)
    flood(daemon.log_path, 300, 2)  # no one reaches maxretry: 600 failures to write
    while daemon._read_logs():
        pass
    source = daemon.sources[0]

    def saved():
        return (daemon.state.load_position(source.path) or {}).get("offset", 0)
    assert daemon.bans.state_pending()
    assert saved() == 0
    settle(daemon)
    assert saved() == daemon.log_path.stat().st_size
    assert not daemon.bans.state_in_flight()
    assert len(daemon.state.load_failures(since=0.0)) == 600


def test_a_position_is_written_in_the_same_transaction_as_its_failures(daemon):
    """A crash can neither lose nor double-count a line: each write of state that
    holds failures holds the position after the lines they came from."""
    written = []
    real = daemon_mod.StateWriter.submit

    def submit(writer, token, rows):
        written.append(rows() if callable(rows) else rows)  # made on the writer thread
        return real(writer, token, rows)

    daemon.state_writer.submit = submit.__get__(daemon.state_writer)
    flood(daemon.log_path, 10, 2)  # 20 failures, nobody banned
    while daemon._read_logs():
        pass
    settle(daemon)
    with_failures = [rows for rows in written if rows.get("add_failures")]
    assert with_failures and all(rows["positions"] for rows in with_failures)
    assert with_failures[-1]["positions"] == [
        (str(daemon.log_path), daemon.state.load_position(str(daemon.log_path)))]
    assert daemon.state.load_position(str(daemon.log_path))["offset"] == daemon.log_path.stat().st_size


def test_chores_run_off_the_calling_thread_one_per_kind_and_report_back():
    woken = threading.Event()
    chores = Chores(make_nft=lambda: "worker-nft", wake=woken.set)
    release = threading.Event()
    seen = []
    chores.start()
    try:
        def slow(nft):
            release.wait(10)
            return (nft, threading.current_thread().name)
        assert chores.submit("reload", slow, lambda result, error: seen.append((result, error)))
        assert not chores.submit("reload", slow, lambda result, error: seen.append("twice"))
        assert chores.pending("reload")
        assert chores.submit("upkeep", lambda nft: 1 / 0, lambda result, error: seen.append(error))
        release.set()
        collected = 0
        while collected < 2:
            assert woken.wait(10), "the worker never reported back"
            woken.clear()
            collected += chores.collect()
        assert seen[0] == (("worker-nft", "policyd-chores"), None)
        assert isinstance(seen[1], ZeroDivisionError)
        assert not chores.pending("reload")
    finally:
        chores.stop()


ADDRESS_TEXT = st.one_of(
    st.ip_addresses().map(str),
    st.text(alphabet="0123456789abcdefABCDEF:.[]%", max_size=46),
    st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 999), st.integers(0, 999999)),
)


@given(ADDRESS_TEXT)
def test_the_fast_address_parser_agrees_with_ipaddress(text):
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        expected = ipaddress.ip_address(inner) if "%" not in inner and inner else None
    except ValueError:
        expected = None
    if expected is not None and expected.version == 6 and expected.ipv4_mapped is not None:
        expected = expected.ipv4_mapped
    assert parse_host(text) == expected
    assert parse_host(text.encode()) == expected


def test_a_document_is_written_in_pieces_as_json_dumps_writes_it_whole():
    import json

    from policyd.kernel import nft
    document = {"nftables": [{"add": {"table": {"family": "inet", "name": "t"}}},
                             {"add": {"element": {"family": "inet", "table": "t", "name": "s",
                                                  "elem": [{"prefix": {"addr": f"2001:db8:{n:x}::", "len": 64}}
                                                           for n in range(nft.JSON_PIECE * 2 + 7)]}}},
                             {"add": {"rule": {"expr": [], "comment": "é \"q\"", "n": 1.5, "b": True,
                                               "none": None, "empty": [], "obj": {}}}}]}
    assert nft._json_text(document) == json.dumps(document)


def test_the_state_writer_keeps_order_and_retries_a_failed_batch(tmp_path, monkeypatch):
    from policyd.banning import statewriter
    monkeypatch.setattr(statewriter, "RETRY_SECONDS", 0.01)
    path = tmp_path / "state.db"
    State(path).close()
    writer = StateWriter(path)
    real_write, attempts = statewriter.write_rows, []

    def flaky(state, rows):
        attempts.append(rows)
        if len(attempts) == 1:
            raise OSError(28, "No space left on device")
        real_write(state, rows)
    monkeypatch.setattr(statewriter, "write_rows", flaky)
    writer.start()
    writer.submit(1, {"upsert_history": [(b"k", 1, 10.0)]})
    writer.submit(2, {"upsert_history": [(b"k", 2, 20.0)]})
    writer.stop()
    assert writer.collect() == [1, 2] and len(attempts) == 3
    with State(path) as state:
        assert state.load_history_of(b"k") == (2, 20.0)  # the later batch won


def test_a_ban_in_flight_to_the_writer_still_counts_for_escalation(tmp_path):
    state = State(tmp_path / "state.db")
    writer = StateWriter(state.path)
    clock = FakeClock()
    try:
        manager = BanManager(Settings(maxretry=1), state, CountingKernel(), clock=clock, writer=writer)
        first = manager.record_failures([(ipaddress.ip_address("192.0.2.9"), "nginx-auth", None)])
        manager.unban("192.0.2.9")
        manager.flush()  # handed to the writer, which has not started: still in flight
        assert manager.state_in_flight()
        again = manager.record_failures([(ipaddress.ip_address("192.0.2.9"), "nginx-auth", None)])
        assert again[0].expires_at - again[0].banned_at == 2 * (first[0].expires_at - first[0].banned_at)
        writer.start()
        writer.stop()
        manager.state_written(writer.collect())
        assert not manager.state_in_flight()
    finally:
        state.close()


def test_the_ban_list_is_a_snapshot_formatted_off_the_main_loop(daemon):
    flood(daemon.log_path, 5, 3)
    while daemon._read_logs():
        pass
    answer = daemon.ban_list()
    assert isinstance(answer, daemon_control.OffLoop)
    daemon.bans.unban("2001:db8:0:1::7")  # after the snapshot: not in this answer
    listed = answer.work()
    assert len(listed) == 5 and {entry["reason"] for entry in listed} == {"auto"}
    assert len(daemon.ban_list().work()) == 4


def test_a_reload_that_changes_the_logs_resumes_each_kept_log_where_it_stopped(daemon):
    flood(daemon.log_path, 100, 2)  # 200 failures, none banned, not yet written
    daemon._read_logs()
    daemon._write_everything()
    source = daemon.sources[0]
    assert daemon.state.load_position(source.path)["offset"] == daemon.log_path.stat().st_size
    assert len(daemon.state.load_failures(since=0.0)) == 200


def test_the_loop_wakes_when_a_held_failure_is_due(daemon):
    """A failure held for the rest of a write that never comes goes out when its
    hold ends, not at the loop's next housekeeping turn."""
    judge = daemon.sources[0].judge
    now = [100.0]
    judge.clock = lambda: now[0]
    assert daemon._until_held_failures_are_due(0.5) == 0.5
    line = (b'2026/11/26 20:00:00 [error] 1#1: *1 user "u": password mismatch, client: 192.0.2.7, '
            b'server: _, request: "GET / HTTP/1.1", host: "x"')
    assert judge.judge([line], mid_write=True) == [] and judge.holding
    now[0] += judge.hold_seconds - 0.2
    assert daemon._until_held_failures_are_due(0.5) == pytest.approx(0.2)
