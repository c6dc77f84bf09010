"""The daemon's housekeeping never dies on what an operator can fix: it logs one
line, keeps what the kernel enforces, says so in status, and tries again."""
import sqlite3
import textwrap

import pytest

from policyd.daemon import core as daemon_mod
from policyd.policy import reader as policy_mod
from policyd.policy.store import PolicyStore

POLICY = textwrap.dedent("""\
    version: 1
    services:
      ollama:
        ports: [11434]
        allow: [192.0.2.0/24]
    """)


@pytest.fixture
def held_back(tmp_path, clock, nft):
    """A daemon holding back (nothing enforced yet) whose state dir just got a
    committed policy from an operator's apply, and a state.db that is not ours."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    state_dir = tmp_path / "state"
    store = PolicyStore(state_dir)
    store.commit(path.read_bytes(), policy_mod.load(path))
    with sqlite3.connect(state_dir / daemon_mod.STATE_FILE) as db:
        db.execute("CREATE TABLE photos (id INTEGER)")
    the_daemon = daemon_mod.Daemon(path, state_dir, tmp_path / "run", clock=clock)
    the_daemon.store = store
    the_daemon.nft = nft
    return the_daemon


def test_a_foreign_state_file_is_a_problem_in_status_not_a_dead_daemon(held_back, caplog):
    held_back._housekeeping()
    held_back._housekeeping()  # and again: it keeps trying, one line each time
    assert held_back.bans is None and held_back.state is None
    problems = held_back.status()["daemon"]["problems"]
    assert len(problems) == 1 and problems[0].startswith("starting to enforce: ")
    assert "not a policyd state database" in problems[0]
    assert "problem(s)" not in held_back._status_line()  # held back says why itself
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and not any(r.exc_info for r in errors)


def test_a_bug_in_housekeeping_is_logged_with_its_trace_and_the_loop_goes_on(held_back, caplog,
                                                                            monkeypatch):
    def broken():
        raise RuntimeError("a bug")
    monkeypatch.setattr(held_back, "_take_first_commit", broken)
    held_back._housekeeping()
    assert held_back.problems == {"housekeeping": "a bug"}
    assert any(r.exc_info for r in caplog.records if r.levelname == "ERROR")
    monkeypatch.setattr(held_back, "_take_first_commit", lambda: None)  # fixed
    held_back._housekeeping()
    assert "housekeeping" not in held_back.problems


@pytest.mark.parametrize("signame", ["SIGHUP", "SIGTERM"])
def test_a_signal_that_lands_while_the_loop_holds_its_wake_lock_does_not_hang_it(signame):
    """A signal handler runs on the main thread between two bytecodes, possibly
    inside wake.wait() while that thread holds the Event's lock: a handler that
    takes the lock itself (wake.set()) waits for its own thread forever. Seen
    under a loop of SIGHUPs: the daemon stopped answering and ignored SIGTERM."""
    import signal
    import threading

    class Loop:
        stopping = reload_requested = False
        wake = threading.Event()

    loop = Loop()
    handlers = daemon_mod.signal_handlers(loop)

    def landing():
        with loop.wake._cond:  # as inside wake.wait(), on the loop's own thread
            handlers[getattr(signal, signame)](getattr(signal, signame), None)

    thread = threading.Thread(target=landing, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the handler waited for the lock its own thread holds"
    assert loop.wake.wait(5)
    assert loop.stopping or loop.reload_requested
