"""Follow growing log files across rotation, truncation and deletion.

Owns reading new complete lines as bytes and the byte position that a restart
resumes from (through a PositionStore). Waking up when a log moves is
policyd.logs.logwatch's.
"""

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable
from typing import Protocol

from policyd.logs import writefence
from policyd.logs.writefence import WriteFence

HEAD_BYTES = 256
READ_CHUNK = 1 << 16
# A reader can see a write(2) in progress cut only where the kernel copies it
# page by page into the file: at a page boundary.
PAGE_BYTES = 4096
# How long a rotated-away file stays open after its last growth: a writer
# rotated with logrotate's `create` (Debian's nginx, Apache) keeps writing to
# the old inode until its postrotate reopen, and those lines must not be lost.
ROTATE_GRACE_SECONDS = 10.0
MAX_RETIRED_FILES = 3


class PositionStore(Protocol):
    """Where a follower's committed position lives between runs."""

    def load(self, path: str) -> dict | None: ...

    def save(self, path: str, position: dict) -> None: ...


def head_hash(head: bytes) -> str:
    """A short fingerprint of a file's first bytes: tells a replaced file apart."""
    return hashlib.sha256(head).hexdigest()[:16]


class _OpenLog:
    """One open descriptor of a log and where reading it has got to."""

    def __init__(self, fd: int, status: os.stat_result, offset: int, head: bytes, now: float):
        self.fd = fd
        self.inode = status.st_ino
        self.device = status.st_dev
        self.read_offset = offset   # every byte before this has been read
        self.line_end = offset      # just after the last newline read
        self.head = head            # the file's first min(HEAD_BYTES, read_offset) bytes
        self.pending = bytearray()  # bytes after the last newline, at most max_line
        self.skipping = False       # inside a line longer than max_line
        self.last_growth = now
        self.fence = None           # a WriteFence, False where the kernel cannot say; once asked

    def identity(self) -> tuple[int, int]:
        return (self.inode, self.device)

    def restart_from_zero(self) -> None:
        self.read_offset = self.line_end = 0
        self.head = b""
        self.pending.clear()
        self.skipping = False


class LogFollower:
    """Returns the complete new lines of one log path, whatever happens to the file.

    Positions are saved only by commit(), up to the end of the last complete
    line of the current file that read_lines() returned: call commit() after
    the lines are handled, so a crash in between re-reads instead of losing.

    After a rotation the old file stays open and is read until it has been
    quiet for rotate_grace seconds (writers reopen late); then its
    unterminated last line, if any, is returned as a line. Lines written late
    to the old file are not covered by the saved position: a crash during
    that grace period loses them. Not thread-safe; use from one thread, and
    not after close().
    """

    def __init__(
        self,
        path: str,
        positions: PositionStore,
        max_line: int = 1 << 20,
        *,
        rotate_grace: float = ROTATE_GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = path
        self.max_line = max_line
        self._positions = positions
        self._rotate_grace = rotate_grace
        self._clock = clock
        self._current: _OpenLog | None = None
        self._retired: list[_OpenLog] = []
        self._exists = False
        self._error: str | None = None
        self._max_lines: int | None = None
        self._lines = 0
        self._oversized = 0
        self._rotations = 0
        self._resume = self._valid_position(positions.load(path))
        self._last_saved: dict | None = self._resume
        self._resume_rotated_away()

    # -- public -----------------------------------------------------------

    def read_lines(self, max_lines: int | None = None) -> list[bytes]:
        """Every complete line written since the last call, without its newline.

        With max_lines, stops reading once that many lines are in hand (the last
        chunk read may bring up to READ_CHUNK bytes more); the next call goes on.
        """
        lines: list[bytes] = []
        self._max_lines = max_lines
        self._error = None
        self._drain_retired(lines)
        if self._current is not None:
            self._restart_if_truncated(self._current, lines)
            self._drain(self._current, lines)
        self._follow_path(lines)
        self._lines += len(lines)
        return lines

    def unread(self) -> tuple[int, int, int] | None:
        """(descriptor, offset, size) of the current file: its lines from offset on
        are what read_lines() returns next. None while a rotated file is still
        read first, or inside an over-long line (policyd.logs.lookahead)."""
        log = self._current
        if log is None or self._retired or log.skipping:
            return None
        try:
            size = os.fstat(log.fd).st_size
        except OSError:
            return None
        return log.fd, log.line_end, size

    def skip_to_end(self) -> None:
        """Follow the log from its current end without reading what is there (a log
        seen for the first time: its old failures must not ban anyone today)."""
        if self._current is not None:
            return
        opened = self._open(self.path)
        if opened is None:
            return
        fd, status = opened
        size = status.st_size
        try:
            head = os.pread(fd, min(HEAD_BYTES, size), 0)
            tail_start = max(0, size - self.max_line)
            tail = os.pread(fd, size - tail_start, tail_start) if size else b""
        except OSError as error:
            os.close(fd)
            self._error = str(error)
            return
        log = _OpenLog(fd, status, size, head, self._clock())
        cut = tail.rfind(b"\n")
        log.line_end = tail_start + cut + 1 if cut >= 0 else (0 if tail_start == 0 else size)
        if cut >= 0 or tail_start == 0:
            log.pending += tail[cut + 1:]   # a line still being written: returned once complete
        else:
            log.skipping = True             # inside a line longer than max_line
        self._current = log
        self._exists = True
        self._resume = None

    @property
    def mid_write(self) -> bool:
        """True if the last read may have cut a write in two: it ended inside a line,
        or at a page boundary while a write may still be copied there (on a
        filesystem where the kernel can say, policyd.logs.writefence asks it). A
        caller that must see whole writes waits a little then."""
        log = self._current
        if log is None:
            return False
        if log.pending or log.skipping:
            return True
        if log.read_offset == 0 or log.read_offset % PAGE_BYTES:
            return False
        if log.fence is None:
            log.fence = WriteFence() if writefence.is_fenced(log.fd) else False
        return not (log.fence and log.fence.ends_between_writes(log.fd, log.read_offset))

    def commit(self) -> None:
        """Persist the position after the lines returned so far."""
        current = self._current or (self._retired[-1] if self._retired else None)
        if current is None:
            return
        offset = current.line_end
        position = {
            "inode": current.inode,
            "device": current.device,
            "offset": offset,
            "head": head_hash(current.head[: min(HEAD_BYTES, offset)]),
        }
        if position != self._last_saved:
            self._positions.save(self.path, position)
            self._last_saved = position

    @property
    def stats(self) -> dict:
        current = self._current
        return {
            "path": self.path,
            "exists": self._exists,
            "inode": current.inode if current else None,
            "offset": current.line_end if current else 0,
            "lines": self._lines,
            "oversized": self._oversized,
            "rotations": self._rotations,
            "error": self._error,
        }

    def close(self) -> None:
        for log in self._retired + ([self._current] if self._current else []):
            os.close(log.fd)
        self._retired = []
        self._current = None

    # -- opening ----------------------------------------------------------

    @staticmethod
    def _valid_position(position) -> dict | None:
        if not isinstance(position, dict):
            return None
        numbers_ok = all(
            isinstance(position.get(key), int) and position[key] >= 0
            for key in ("inode", "device", "offset")
        )
        return position if numbers_ok and isinstance(position.get("head"), str) else None

    def _open(self, path: str) -> tuple[int, os.stat_result] | None:
        """Open a regular file without blocking (a FIFO would block); record failures."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            return None
        except OSError as error:
            self._error = str(error)
            return None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            return fd, status
        except OSError as error:
            os.close(fd)
            self._error = str(error)
            return None

    def _resumed(self, fd: int, status: os.stat_result) -> _OpenLog | None:
        """The saved position applied to this file, if it is the very same file."""
        saved, now = self._resume, self._clock()
        if saved is None or (saved["inode"], saved["device"]) != (status.st_ino, status.st_dev):
            return None
        offset = saved["offset"]
        if status.st_size < offset:
            return None
        try:
            head = os.pread(fd, min(HEAD_BYTES, offset), 0)
        except OSError:
            return None
        if head_hash(head) != saved["head"]:
            return None
        return _OpenLog(fd, status, offset, head, now)

    def _resume_rotated_away(self) -> None:
        """After a restart, finish the saved file if it was rotated to a sibling name."""
        saved = self._resume
        if saved is None:
            return
        try:
            if os.stat(self.path).st_ino == saved["inode"]:
                return
        except OSError:
            pass
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.inode() != saved["inode"] or not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue
            opened = self._open(entry.path)
            if opened is None:
                continue
            log = self._resumed(*opened)
            if log is None:
                os.close(opened[0])
                continue
            self._retired.append(log)
            return

    def _follow_path(self, lines: list[bytes]) -> None:
        """Notice the path naming a new file, and switch to it after the old one is read."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            # Deleted, or renamed with its successor not yet created: the
            # writer may still append to the open descriptor, so keep it.
            self._exists = False
            return
        except OSError as error:
            self._exists = False
            self._error = str(error)
            return
        self._exists = True
        current = self._current
        if current is not None and current.identity() == (status.st_ino, status.st_dev):
            return
        opened = self._open(self.path)
        if opened is None:
            return
        fd, status = opened
        if current is not None and current.identity() == (status.st_ino, status.st_dev):
            os.close(fd)
            return
        new = self._resumed(fd, status) or _OpenLog(fd, status, 0, b"", self._clock())
        self._resume = None
        if current is not None:
            self._drain(current, lines)
            self._retired.append(current)
            self._rotations += 1
            while len(self._retired) > MAX_RETIRED_FILES:
                self._release(self._retired.pop(0), lines)
        self._current = new
        self._drain(new, lines)

    # -- reading ----------------------------------------------------------

    def _drain_retired(self, lines: list[bytes]) -> None:
        now = self._clock()
        for log in list(self._retired):
            self._drain(log, lines)
            # With no successor yet, a retired file is still the newest one
            # (and the one commit() saves): keep it until the path reappears.
            sliced = self._max_lines is not None and len(lines) >= self._max_lines
            if self._current is not None and now - log.last_growth >= self._rotate_grace \
                    and not sliced:  # only a file read to its end is finished
                self._retired.remove(log)
                self._release(log, lines)

    def _release(self, log: _OpenLog, lines: list[bytes]) -> None:
        self._emit_tail(log, lines)
        os.close(log.fd)

    def _emit_tail(self, log: _OpenLog, lines: list[bytes]) -> None:
        """An unterminated last line is a line once its file is finished."""
        if log.skipping:
            self._oversized += 1
        elif log.pending:
            lines.append(bytes(log.pending))
        log.pending.clear()
        log.skipping = False

    def _restart_if_truncated(self, log: _OpenLog, lines: list[bytes]) -> None:
        """copytruncate, or a file rewritten in place: read it again from the start."""
        try:
            size = os.fstat(log.fd).st_size
            rewritten = bool(log.head) and os.pread(log.fd, len(log.head), 0) != log.head
        except OSError as error:
            self._error = str(error)
            return
        if size < log.read_offset or rewritten:
            self._emit_tail(log, lines)
            log.restart_from_zero()
            self._rotations += 1

    def _drain(self, log: _OpenLog, lines: list[bytes]) -> None:
        while True:
            if self._max_lines is not None and len(lines) >= self._max_lines:
                return  # a flood is read in slices; the next call goes on from here
            try:
                data = os.pread(log.fd, READ_CHUNK, log.read_offset)
            except OSError as error:
                self._error = str(error)
                return
            if not data:
                return
            if len(log.head) < HEAD_BYTES:
                log.head += data[: HEAD_BYTES - len(log.head)]
            log.read_offset += len(data)
            log.last_growth = self._clock()
            self._split(log, data, lines)

    def _split(self, log: _OpenLog, data: bytes, lines: list[bytes]) -> None:
        parts = data.split(b"\n")
        rest = parts.pop()
        if parts:
            if log.skipping:
                self._oversized += 1
                log.skipping = False
                parts = parts[1:]
            elif log.pending:
                parts[0] = bytes(log.pending) + parts[0]
                log.pending.clear()
            # Looked at line by line only when one is too long (a flood is 300k lines).
            kept = parts if max(map(len, parts)) <= self.max_line else \
                [line for line in parts if len(line) <= self.max_line]
            self._oversized += len(parts) - len(kept)
            lines.extend(kept)
            log.line_end = log.read_offset - len(rest)
        if log.skipping:
            return
        if len(log.pending) + len(rest) > self.max_line:
            # Too long already: drop it now rather than buffer it unboundedly.
            log.pending.clear()
            log.skipping = True
        else:
            log.pending += rest
