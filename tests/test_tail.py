"""Tests for policyd.logs.tail: following real files through rotation and restarts.

Each test writes real files under tmp_path; a fake clock stands in for the
rotation grace period, and watcher tests wait on events with a bounded timeout.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path

import pytest

import policyd
from fakes import MemoryPositions
from policyd.banning.state import State
from policyd.logs.logwatch import LogWatcher
from policyd.logs import writefence
from policyd.logs.tail import ROTATE_GRACE_SECONDS, LogFollower

WATCH_TIMEOUT = 10.0


def append(path, data: bytes):
    with open(path, "ab") as handle:
        handle.write(data)


@pytest.fixture
def log(tmp_path):
    return str(tmp_path / "access.log")


@pytest.fixture
def follower(log, clock):
    follower = LogFollower(log, MemoryPositions(), clock=clock)
    yield follower
    follower.close()


def test_appended_lines_come_once_and_in_order(log, follower):
    append(log, b"one\ntwo\n")
    assert follower.read_lines() == [b"one", b"two"]
    assert follower.read_lines() == []
    append(log, b"three\n")
    assert follower.read_lines() == [b"three"]
    stats = follower.stats
    assert stats["lines"] == 3
    assert stats["offset"] == len(b"one\ntwo\nthree\n")
    assert stats["exists"] is True
    assert stats["inode"] == os.stat(log).st_ino
    assert stats["error"] is None


def test_partial_line_is_held_until_its_newline(log, follower):
    append(log, b"first\nsec")
    assert follower.read_lines() == [b"first"]
    append(log, b"ond")
    assert follower.read_lines() == []
    append(log, b"\n")
    assert follower.read_lines() == [b"second"]


def test_rename_rotation_keeps_lines_written_to_old_file_before_noticed(log, follower):
    append(log, b"before\n")
    assert follower.read_lines() == [b"before"]
    os.rename(log, log + ".1")
    append(log + ".1", b"after rename\n")
    append(log, b"new file\n")
    assert follower.read_lines() == [b"after rename", b"new file"]
    assert follower.stats["rotations"] == 1
    assert follower.stats["inode"] == os.stat(log).st_ino


def test_nginx_style_rotation_writer_keeps_old_inode_until_reopen(log, follower):
    writer = open(log, "ab", buffering=0)
    writer.write(b"r1\n")
    assert follower.read_lines() == [b"r1"]
    os.rename(log, log + ".1")
    writer.write(b"r2 after rename\n")
    assert follower.read_lines() == [b"r2 after rename"]
    assert follower.stats["exists"] is False
    writer.write(b"r3 just before reopen\n")
    writer.close()
    writer = open(log, "ab", buffering=0)  # what `nginx -s reopen` does
    writer.write(b"r4 new file\n")
    assert follower.read_lines() == [b"r3 just before reopen", b"r4 new file"]
    writer.close()
    assert follower.stats["rotations"] == 1


def test_logrotate_create_then_late_reopen_loses_nothing(log, follower, clock):
    # logrotate `create` (Debian's nginx and Apache): the new file exists
    # while the server still writes to the renamed one until postrotate.
    server = open(log, "ab", buffering=0)
    server.write(b"a\n")
    assert follower.read_lines() == [b"a"]
    os.rename(log, log + ".1")
    open(log, "wb").close()
    assert follower.read_lines() == []
    server.write(b"late to old inode\n")
    clock.advance(ROTATE_GRACE_SECONDS / 2)
    assert follower.read_lines() == [b"late to old inode"]
    server.close()
    append(log, b"b\n")
    assert follower.read_lines() == [b"b"]


def test_rotated_file_unterminated_tail_is_emitted_when_let_go(log, follower, clock):
    append(log, b"whole\nhalf")
    assert follower.read_lines() == [b"whole"]
    os.rename(log, log + ".1")
    append(log, b"fresh\n")
    assert follower.read_lines() == [b"fresh"]
    clock.advance(ROTATE_GRACE_SECONDS)
    assert follower.read_lines() == [b"half"]
    clock.advance(ROTATE_GRACE_SECONDS)
    append(log + ".1", b"ignored: file was let go\n")
    assert follower.read_lines() == []


def test_rotated_file_tail_completed_by_late_writer_stays_one_line(log, follower, clock):
    append(log, b"hal")
    assert follower.read_lines() == []
    os.rename(log, log + ".1")
    append(log, b"fresh\n")
    assert follower.read_lines() == [b"fresh"]
    append(log + ".1", b"f done\n")
    assert follower.read_lines() == [b"half done"]
    clock.advance(ROTATE_GRACE_SECONDS)
    assert follower.read_lines() == []


def test_copytruncate_starts_again_from_zero(log, follower):
    append(log, b"old line one\nold line two\n")
    assert follower.read_lines() == [b"old line one", b"old line two"]
    shutil.copyfile(log, log + ".1")
    os.truncate(log, 0)
    append(log, b"new\n")
    assert follower.read_lines() == [b"new"]
    assert follower.stats["rotations"] == 1


def test_copytruncate_regrown_past_offset_is_caught_by_head(log, follower):
    append(log, b"short\n")
    assert follower.read_lines() == [b"short"]
    with open(log, "wb") as handle:  # truncate and refill before the next look
        handle.write(b"different start\nsecond\n")
    assert follower.read_lines() == [b"different start", b"second"]
    assert follower.stats["rotations"] == 1


def test_copytruncate_with_same_first_bytes_is_caught_by_size(log, follower):
    same_start = b"GET /api/generate " + b"A" * 300
    append(log, same_start + b"\nsecond\n")
    assert follower.read_lines() == [same_start, b"second"]
    os.truncate(log, 0)
    append(log, same_start + b"\n")
    assert follower.read_lines() == [same_start]


def test_missing_log_is_read_from_start_once_created(log, follower):
    assert follower.read_lines() == []
    assert follower.stats["exists"] is False
    assert follower.stats["inode"] is None
    assert follower.stats["error"] is None
    append(log, b"hello\n")
    assert follower.read_lines() == [b"hello"]
    assert follower.stats["exists"] is True


def test_deleted_log_is_followed_again_when_recreated(log, follower):
    append(log, b"a\n")
    assert follower.read_lines() == [b"a"]
    os.unlink(log)
    assert follower.read_lines() == []
    assert follower.stats["exists"] is False
    assert follower.stats["lines"] == 1
    append(log, b"b\n")
    assert follower.read_lines() == [b"b"]
    assert follower.stats["lines"] == 2


def test_huge_line_is_counted_as_oversized_and_next_line_comes_through(log, follower):
    append(log, b"before\n" + b"x" * (5 << 20) + b"\nafter\n")
    tracemalloc.start()
    try:
        lines = follower.read_lines()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == [b"before", b"after"]
    assert follower.stats["oversized"] == 1
    assert peak < 3 * follower.max_line


def test_huge_line_arriving_in_pieces_is_dropped_without_buffering(log):
    follower = LogFollower(log, MemoryPositions(), max_line=100)
    append(log, b"y" * 60)
    assert follower.read_lines() == []
    append(log, b"y" * 60)
    assert follower.read_lines() == []
    append(log, b"y" * 1000 + b"\nok\n")
    assert follower.read_lines() == [b"ok"]
    assert follower.stats["oversized"] == 1
    append(log, b"z" * 100 + b"\n")
    assert follower.read_lines() == [b"z" * 100]
    follower.close()


def test_binary_and_non_utf8_bytes_come_back_intact(log, follower):
    binary = bytes(b for b in range(256) if b != 0x0A)
    latin1 = "user=Jürgen".encode("latin-1")
    append(log, binary + b"\n" + latin1 + b"\r\n" + b"\xff\xfe\x00\n")
    assert follower.read_lines() == [binary, latin1 + b"\r", b"\xff\xfe\x00"]


def test_restart_resumes_where_committed(log, tmp_path):
    positions_file = tmp_path / "state.db"
    first = LogFollower(log, State(positions_file))
    append(log, b"one\ntwo\n")
    assert first.read_lines() == [b"one", b"two"]
    first.commit()
    first.close()
    append(log, b"three\n")
    second = LogFollower(log, State(positions_file))
    assert second.read_lines() == [b"three"]
    second.commit()
    second.close()
    third = LogFollower(log, State(positions_file))
    assert third.read_lines() == []
    third.close()


def test_restart_without_commit_reads_the_uncommitted_lines_again(log, tmp_path):
    positions_file = tmp_path / "state.db"
    append(log, b"handled\n")
    first = LogFollower(log, State(positions_file))
    assert first.read_lines() == [b"handled"]
    first.commit()
    append(log, b"read but not handled\n")
    assert first.read_lines() == [b"read but not handled"]
    first.close()  # a crash before commit()
    second = LogFollower(log, State(positions_file))
    assert second.read_lines() == [b"read but not handled"]
    second.close()


def test_restart_keeps_a_partial_line_for_after_the_restart(log, tmp_path):
    positions_file = tmp_path / "state.db"
    append(log, b"a\npart")
    first = LogFollower(log, State(positions_file))
    assert first.read_lines() == [b"a"]
    first.commit()
    first.close()
    append(log, b"ial\n")
    second = LogFollower(log, State(positions_file))
    assert second.read_lines() == [b"partial"]
    second.close()


def test_restart_after_rotation_while_down_finishes_the_rotated_file(log, tmp_path):
    positions_file = tmp_path / "state.db"
    append(log, b"seen\n")
    first = LogFollower(log, State(positions_file))
    assert first.read_lines() == [b"seen"]
    first.commit()
    first.close()
    append(log, b"written while down\n")
    os.rename(log, log + ".1")
    append(log, b"in new file\n")
    second = LogFollower(log, State(positions_file))
    assert second.read_lines() == [b"written while down", b"in new file"]
    second.commit()
    second.close()
    third = LogFollower(log, State(positions_file))
    assert third.read_lines() == []
    third.close()


def test_restart_with_log_renamed_and_not_yet_recreated(log, tmp_path, clock):
    positions_file = tmp_path / "state.db"
    append(log, b"seen\n")
    first = LogFollower(log, State(positions_file), clock=clock)
    assert first.read_lines() == [b"seen"]
    first.commit()
    first.close()
    append(log, b"written while down\nunterminated")
    os.rename(log, log + ".1")
    second = LogFollower(log, State(positions_file), clock=clock)
    assert second.read_lines() == [b"written while down"]
    second.commit()
    clock.advance(ROTATE_GRACE_SECONDS * 2)
    # With no successor yet the renamed file is still the newest: keep waiting.
    assert second.read_lines() == []
    second.commit()
    second.close()
    third = LogFollower(log, State(positions_file), clock=clock)
    assert third.read_lines() == []
    append(log, b"successor\n")
    assert third.read_lines() == [b"successor"]
    clock.advance(ROTATE_GRACE_SECONDS)
    assert third.read_lines() == [b"unterminated"]
    third.commit()
    third.close()
    fourth = LogFollower(log, State(positions_file), clock=clock)
    clock.advance(ROTATE_GRACE_SECONDS)
    assert fourth.read_lines() == []
    fourth.close()


def test_same_inode_and_size_with_new_content_is_read_from_start(log, tmp_path):
    positions_file = tmp_path / "state.db"
    append(log, b"alpha\nbravo\n")
    first = LogFollower(log, State(positions_file))
    assert first.read_lines() == [b"alpha", b"bravo"]
    first.commit()
    first.close()
    inode = os.stat(log).st_ino
    with open(log, "r+b") as handle:
        handle.write(b"delta\necho!\n")
    assert os.stat(log).st_ino == inode
    assert os.path.getsize(log) == len(b"alpha\nbravo\n")
    second = LogFollower(log, State(positions_file))
    assert second.read_lines() == [b"delta", b"echo!"]
    second.close()


def test_a_different_file_under_the_saved_path_is_read_from_start(log):
    positions = MemoryPositions()
    append(log, b"old\n")
    first = LogFollower(log, positions)
    first.read_lines()
    first.commit()
    first.close()
    os.unlink(log)
    append(log, b"replacement one\nreplacement two\n")
    second = LogFollower(log, positions)
    assert second.read_lines() == [b"replacement one", b"replacement two"]
    second.close()


def test_commit_saves_inode_device_offset_and_head(log):
    positions = MemoryPositions()
    follower = LogFollower(log, positions)
    append(log, b"abc\nde")
    follower.read_lines()
    follower.commit()
    saved = positions.load(log)
    status = os.stat(log)
    assert saved["inode"] == status.st_ino
    assert saved["device"] == status.st_dev
    assert saved["offset"] == 4
    assert isinstance(saved["head"], str) and saved["head"]
    follower.close()


def test_path_that_is_a_directory_is_reported_not_raised(tmp_path):
    directory = tmp_path / "not-a-file.log"
    directory.mkdir()
    follower = LogFollower(str(directory), MemoryPositions())
    assert follower.read_lines() == []
    assert "not a regular file" in follower.stats["error"]
    follower.close()


def test_unreadable_log_is_reported_in_stats_not_raised():
    # root reads a chmod 000 file anyway, so the follower runs as nobody.
    scratch = tempfile.mkdtemp(prefix="policyd-tail-")
    try:
        os.chmod(scratch, 0o755)
        log = os.path.join(scratch, "secret.log")
        append(log, b"hidden\n")
        os.chmod(log, 0o000)
        program = (
            "import json, sys\n"
            "from fakes import MemoryPositions\nfrom policyd.logs.tail import LogFollower\n"
            "follower = LogFollower(sys.argv[1], MemoryPositions())\n"
            "print(json.dumps({'lines': [l.decode() for l in follower.read_lines()],"
            " 'stats': follower.stats}))\n"
        )
        repository = os.path.dirname(os.path.dirname(os.path.abspath(policyd.__file__)))
        kwargs = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
        result = subprocess.run(
            [sys.executable, "-c", program, log],
            capture_output=True, text=True, cwd="/", check=True,
            env={"PYTHONPATH": f"{repository}:{repository}/tests", "PATH": "/usr/bin:/bin"},
            **kwargs,
        )
        report = json.loads(result.stdout)
        assert report["lines"] == []
        assert report["stats"]["exists"] is True
        assert "Permission denied" in report["stats"]["error"]
    finally:
        shutil.rmtree(scratch)


def test_malformed_saved_position_is_treated_as_none(log):
    positions = MemoryPositions()
    positions.save(log, {"inode": "x", "offset": -1})
    append(log, b"line\n")
    follower = LogFollower(log, positions)
    assert follower.read_lines() == [b"line"]
    follower.close()


class Changes:
    """Collects on_change calls; wait_for() blocks until a path is reported."""

    def __init__(self):
        self._condition = threading.Condition()
        self._seen = []

    def __call__(self, path):
        with self._condition:
            self._seen.append(path)
            self._condition.notify_all()

    def clear(self):
        with self._condition:
            self._seen.clear()

    def wait_for(self, path):
        with self._condition:
            return self._condition.wait_for(lambda: path in self._seen, WATCH_TIMEOUT)


def test_watcher_reports_append_and_rotation(log):
    changes = Changes()
    append(log, b"exists\n")
    watcher = LogWatcher([log], changes)
    watcher.start()
    try:
        changes.clear()
        append(log, b"appended\n")
        assert changes.wait_for(log)
        changes.clear()
        os.rename(log, log + ".1")
        assert changes.wait_for(log)
        changes.clear()
        append(log, b"new file\n")
        assert changes.wait_for(log)
    finally:
        watcher.stop()


def test_watcher_ignores_other_files_in_the_directory(log, tmp_path):
    other = str(tmp_path / "other.log")
    changes = Changes()
    watcher = LogWatcher([log], changes)
    watcher.start()
    try:
        changes.clear()
        append(other, b"noise\n")
        append(log, b"signal\n")
        assert changes.wait_for(log)
        assert other not in changes._seen
    finally:
        watcher.stop()


def test_watcher_waits_for_a_missing_directory(tmp_path):
    log = str(tmp_path / "later" / "app.log")
    changes = Changes()
    watcher = LogWatcher([log], changes, missing_dir_interval=0.05)
    watcher.start()
    try:
        assert not watcher.watching(os.path.dirname(log))
        os.mkdir(os.path.dirname(log))
        append(log, b"first\n")
        assert changes.wait_for(log)
    finally:
        watcher.stop()


def test_follower_driven_by_watcher_sees_rotation(log):
    follower = LogFollower(log, MemoryPositions())
    changes = Changes()
    watcher = LogWatcher([log], changes)
    watcher.start()
    try:
        append(log, b"one\n")
        assert changes.wait_for(log)
        assert follower.read_lines() == [b"one"]
        changes.clear()
        os.rename(log, log + ".1")
        append(log, b"two\n")
        assert changes.wait_for(log)
        assert follower.read_lines() == [b"two"]
    finally:
        watcher.stop()
        follower.close()


# --- a log seen for the first time, and where a write may be cut -------------

def test_a_first_seen_log_is_followed_from_its_end_without_reading_it(log, tmp_path):
    line = b"2026/12/01 10:00:00 [error] 1#1: *1 old failure, client: 192.0.2.1\n"
    with open(log, "wb") as handle:
        for _ in range((20 << 20) // len(line)):   # 20 MB of old lines
            handle.write(line)
        handle.write(b"half a line")
    positions = MemoryPositions()
    follower = LogFollower(log, positions)
    tracemalloc.start()
    try:
        follower.skip_to_end()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Seeking reads the head and at most one max_line from the end, never the file.
    assert peak < follower.max_line + (1 << 20)
    follower.commit()
    assert positions.load(log)["offset"] == os.path.getsize(log) - len(b"half a line")
    append(log, b" completed\nnew\n")
    assert follower.read_lines() == [b"half a line completed", b"new"]
    follower.commit()
    follower.close()
    # A restart resumes from the committed position, not from the end.
    append(log, b"while down\n")
    again = LogFollower(log, positions)
    assert again.read_lines() == [b"while down"]
    again.close()


def test_skip_to_end_of_a_missing_or_empty_log_reads_it_from_the_start(log):
    follower = LogFollower(log, MemoryPositions())
    follower.skip_to_end()                # missing: nothing to skip
    append(log, b"first\n")
    assert follower.read_lines() == [b"first"]
    follower.close()
    open(log, "wb").close()
    empty = LogFollower(log, MemoryPositions())
    empty.skip_to_end()
    append(log, b"one\n")
    assert empty.read_lines() == [b"one"]
    empty.close()


def test_mid_write_is_true_inside_a_line_and_at_a_page_boundary_the_kernel_cannot_vouch_for(
        log, follower, monkeypatch):
    append(log, b"a" * 99 + b"\n")
    follower.read_lines()
    assert not follower.mid_write
    append(log, b"partial")
    follower.read_lines()
    assert follower.mid_write
    append(log, b"x" * (4096 - 100 - len(b"partial") - 1) + b"\n")   # ends at 4096 exactly
    assert len(follower.read_lines()) == 1 and os.path.getsize(log) == 4096
    monkeypatch.setattr(writefence, "is_fenced", lambda fd: False)   # xfs, NFS ...
    assert follower.mid_write
    append(log, b"more\n")
    follower.read_lines()
    assert not follower.mid_write


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_a_read_ending_on_a_page_boundary_between_writes_is_not_mid_write(where, tmp_path, clock):
    """On ext4 and tmpfs the kernel says whether a write is still being copied
    there (tests/kernel stalls one half way): with none, the read ends between
    writes and nothing is held for a second."""
    directory = tmp_path if where == "tmp_path" else Path(tempfile.mkdtemp(dir=where))
    try:
        log = str(directory / "error.log")
        append(log, b"x" * 4095 + b"\n")
        follower = LogFollower(log, MemoryPositions(), clock=clock)
        with open(log, "rb") as handle:
            fenced = writefence.is_fenced(handle.fileno())
        assert len(follower.read_lines()) == 1 and os.path.getsize(log) == 4096
        assert follower.mid_write is not fenced
        follower.close()
        if where != "tmp_path":
            assert fenced, "/dev/shm is tmpfs"
    finally:
        if where != "tmp_path":
            shutil.rmtree(directory)


def test_a_flood_is_read_in_slices_and_each_line_comes_once(log, follower):
    # A slice stops at the first chunk boundary after max_lines: a 64 KiB chunk holds
    # ~6500 of these lines, so 40000 lines take several calls, none lost or repeated.
    lines = [b"line %06d" % n for n in range(40000)]
    append(log, b"\n".join(lines) + b"\n")
    slices = []
    while True:
        got = follower.read_lines(max_lines=1000)
        if not got:
            break
        slices.append(got)
    assert len(slices) > 3
    assert all(len(got) < 1000 + 10000 for got in slices)
    assert [line for got in slices for line in got] == lines


def test_a_position_committed_mid_flood_resumes_after_the_last_line_returned(log, clock):
    positions = MemoryPositions()
    follower = LogFollower(log, positions, clock=clock)
    lines = [b"entry %06d" % n for n in range(30000)]
    append(log, b"\n".join(lines) + b"\n")
    first = follower.read_lines(max_lines=100)
    follower.commit()
    follower.close()
    resumed = LogFollower(log, positions, clock=clock)
    rest = resumed.read_lines()
    resumed.close()
    assert first + rest == lines
