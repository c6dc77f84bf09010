"""The lookahead: a child classifying a log's backlog answers exactly what the daemon
would have worked out itself, for the lines it read, or nothing.

A real file, a real follower and a real forked child; the reference is
policyd.logs.filterbulk.failures_in_lines on the same slices.
"""
import os
import signal
import time

import pytest
from fakes import MemoryPositions
from test_forged_line_guard import auth_failure

from policyd.logs import lookahead
from policyd.logs.filterbulk import failures_in_lines
from policyd.logs.filters import MAX_LINE_BYTES, load_filter
from policyd.logs.guard import failures_from, judge_for
from policyd.logs.sources import LogSource
from policyd.logs.tail import LogFollower

NGINX_AUTH = load_filter("nginx-auth")
NOISE = ('2026/12/01 10:00:00 [error] 812#812: *7 open() "/srv/www/missing" failed (2: No such file or '
         'directory), client: 192.0.2.9, server: localhost, request: "GET /missing HTTP/1.1", host: "localhost"')
NO_USER = ('2026/12/01 10:00:00 [info] 812#812: *8 no user/password was provided for basic authentication, '
           'client: 192.0.2.8, server: localhost, request: "GET / HTTP/1.1", host: "localhost"')


def flood(count, start=0):
    """Failure lines of many sources, with a line of noise every seventh."""
    return [auth_failure(f"2001:db8:{(start + n) >> 16:x}:{(start + n) & 0xFFFF:x}::7", connection=n)
            if n % 7 else NOISE for n in range(count)]


def write(path, lines):
    with open(path, "ab") as out:
        out.write("".join(text + "\n" for text in lines).encode("latin-1"))


@pytest.fixture(autouse=True)
def small_backlogs(monkeypatch):
    # Small files and blocks, so slices span blocks and a few hundred lines are a backlog.
    monkeypatch.setattr(lookahead, "MIN_BACKLOG_BYTES", 1)
    monkeypatch.setattr(lookahead, "BLOCK_BYTES", 4096)


class _Config:
    def __init__(self, path):
        self.path, self.filter, self.mode = str(path), "nginx-auth", None


def followed(path, max_line=1 << 20):
    follower = LogFollower(str(path), MemoryPositions(), max_line=max_line)
    follower.read_lines()   # an empty file: followed from its start
    return follower


def started(follower, log_filter=NGINX_AUTH):
    ahead = lookahead.start(log_filter, follower)
    assert ahead is not None
    deadline = time.monotonic() + 10
    while ahead._received < 1 and time.monotonic() < deadline:   # the child is under way
        ahead._receive(1)
        time.sleep(0.005)
    time.sleep(0.2)
    return ahead


def read_all(follower, ahead, slice_lines=50):
    """[(lines, ahead's answer, the daemon's own)] of every slice."""
    slices = []
    while True:
        lines = follower.read_lines(max_lines=slice_lines)
        if not lines:
            return slices
        slices.append((lines, ahead.take(lines), failures_in_lines(NGINX_AUTH, lines)))


def test_the_childs_answers_are_the_daemons_own(tmp_path):
    path = tmp_path / "error.log"
    path.write_bytes(b"")
    follower = followed(path)
    write(path, flood(3000))
    ahead = started(follower)
    slices = read_all(follower, ahead)
    answered = [(known, own) for _lines, known, own in slices if known is not None]
    assert len(answered) >= len(slices) - 2   # the child was ahead nearly all along
    assert all(known == own for known, own in answered)
    assert sum(len(known[1]) for known, _own in answered) > 2000
    ahead.close()
    assert ahead.finished


def test_unusual_lines_are_left_to_the_daemon(tmp_path):
    # Each block holding one is answered with nothing: the daemon's own line-by-line
    # path judges it (malformed, ignored, too long), the rest is answered.
    path = tmp_path / "error.log"
    path.write_bytes(b"")
    follower = followed(path)
    lines = flood(2000)
    lines[300] = auth_failure("192.0.2.300")                    # not an address
    lines[700] = NO_USER + ', referrer: "password mismatch"'  # a candidate the ignore regex may take
    lines[1100] = auth_failure("192.0.2.5", user="x" * MAX_LINE_BYTES)   # over-long
    lines[1500] = auth_failure("192.0.2.6").replace("user", "us\0er")   # a NUL byte
    write(path, lines)
    ahead = started(follower)
    slices = read_all(follower, ahead)
    for lines_read, known, own in slices:
        if known is not None:
            assert known == own
    unusual = [n for n, (lines_read, _known, own) in enumerate(slices) if own is None]
    assert len(unusual) == 4
    assert all(slices[n][1] is None for n in unusual)
    assert sum(known is not None for _lines, known, _own in slices) >= len(slices) - 4 - 2


def test_a_log_unusual_in_every_block_stops_the_child(tmp_path):
    # An attacker who puts a NUL byte into every block makes every answer "judge
    # it yourself": the child would only burn a CPU, so it is stopped.
    path = tmp_path / "error.log"
    path.write_bytes(b"")
    follower = followed(path)
    lines = flood(6000)
    for n in range(0, 6000, 10):
        lines[n] = auth_failure("192.0.2.6").replace("user", "us\0er")
    write(path, lines)
    ahead = started(follower)
    slices = read_all(follower, ahead)
    assert all(known is None for _lines, known, _own in slices)
    assert ahead.finished and ahead.unusual == lookahead.UNUSUAL_SLICES + 1
    with pytest.raises(ChildProcessError):
        os.waitpid(ahead.pid, os.WNOHANG)


def test_a_log_that_defeats_the_lookahead_is_read_without_one_for_a_while(tmp_path, monkeypatch):
    # Given up once, it is not forked again every few slices; nor after a failed fork.
    path = tmp_path / "error.log"
    path.write_bytes(b"")
    source = LogSource(_Config(path), MemoryPositions())
    lines = flood(12000)
    for n in range(0, 12000, 10):
        lines[n] = auth_failure("192.0.2.6").replace("user", "us\0er")
    write(path, lines)
    started_pids = []
    real_start = lookahead.start

    def counted(*args):
        ahead = real_start(*args)
        started_pids.append(ahead.pid)
        return ahead

    monkeypatch.setattr(lookahead, "start", counted)
    while source.read_slice(100)[0]:
        time.sleep(0.001)
    assert len(started_pids) == 1 and source.ahead is None
    source.close()

    def refused(*args):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    calls = []
    monkeypatch.setattr(lookahead, "start", lambda *args: calls.append(args) or refused())
    source = LogSource(_Config(path), MemoryPositions())
    write(path, flood(3000))
    while source.read_slice(100)[0]:
        pass
    assert len(calls) == 1 and source.ahead is None
    source.close()


def test_lines_longer_than_the_follower_takes_are_skipped_alike(tmp_path):
    path = tmp_path / "error.log"
    path.write_bytes(b"")
    follower = followed(path, max_line=400)
    lines = flood(1500)
    for n in range(5, 1500, 97):
        lines[n] = auth_failure("192.0.2.7", user="y" * 500)   # dropped by the follower
    write(path, lines)
    ahead = started(follower)
    slices = read_all(follower, ahead)
    assert sum(len(lines_read) for lines_read, _known, _own in slices) == 1500 - len(range(5, 1500, 97))
    answered = [(known, own) for _lines, known, own in slices if known is not None]
    assert len(answered) >= len(slices) - 2 and all(known == own for known, own in answered)


def test_lines_other_than_the_childs_are_never_answered(tmp_path):
    # The same name written again with other lines (truncated and refilled between
    # two reads): the CRCs differ, and the lookahead stops for good.
    path = tmp_path / "error.log"
    write(path, flood(1000))
    fd = os.open(path, os.O_RDONLY)
    try:
        ahead = lookahead.Lookahead(NGINX_AUTH, fd, 0, os.path.getsize(path), 1 << 20)
        time.sleep(0.3)
        other = [text.encode() for text in flood(50, start=5000)]
        assert ahead.take(other) is None
        assert ahead.finished
        assert ahead.take([text.encode() for text in flood(50)]) is None
    finally:
        os.close(fd)


def test_a_killed_child_costs_only_speed(tmp_path, monkeypatch):
    path = tmp_path / "error.log"
    path.write_bytes(b"")
    follower = followed(path)
    write(path, flood(4000))
    monkeypatch.setattr(lookahead, "BLOCK_BYTES", 1 << 20)   # one answer for all: none before the kill
    ahead = lookahead.start(NGINX_AUTH, follower)
    os.kill(ahead.pid, signal.SIGKILL)
    slices = read_all(follower, ahead)
    assert all(known is None for _lines, known, _own in slices)
    assert ahead.finished
    with pytest.raises(ChildProcessError):
        os.waitpid(ahead.pid, os.WNOHANG)   # reaped: no zombie left


def test_a_slice_the_child_answered_judges_as_one_it_did_not(tmp_path):
    # The judges take an answer in place of their own bulk step: same failures.
    lines = [text.encode() for text in flood(400)]
    plain = load_filter("nginx-auth")
    plain.guard = None   # the same filter on a log no request can write into: PlainJudge
    for log_filter in (NGINX_AUTH, plain):
        known = failures_in_lines(log_filter, lines)
        assert known is not None and known[1]
        assert failures_from(judge_for(log_filter), lines, known=known) == \
            failures_from(judge_for(log_filter), lines)


def test_the_daemons_source_starts_and_ends_a_lookahead(tmp_path):
    path = tmp_path / "error.log"
    path.write_bytes(b"")
    source = LogSource(_Config(path), MemoryPositions())
    write(path, flood(3000))
    failures, answered = 0, 0
    while True:
        lines, known = source.read_slice(100)
        if not lines:
            break
        answered += known is not None
        found, _malformed, _forged = failures_from(source.judge, lines, False, known)
        failures += len(found)
        time.sleep(0.002)
    assert failures == sum(1 for n in range(3000) if n % 7)
    assert answered > 0
    assert source.ahead is None   # done with the backlog: the child is gone
    source.close()
