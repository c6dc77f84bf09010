"""A followed log's backlog classified in a child process, ahead of the daemon.

Owns the child (forked when a flood leaves megabytes unread in one log), what it
sends back for each block of lines (every line's CRC-32, and the failure lines'
host and time texts: policyd.logs.filterbulk.failure_texts), and handing the
daemon a slice's result once the slice's lines are shown to be the very lines
the child read. The daemon's main thread then parses hosts and records
failures while the child searches and matches on another CPU.
"""
import gc
import marshal
import os
import select
import signal
import struct
import time
import zlib
from array import array
from bisect import bisect_left
from collections import deque
from itertools import repeat

from policyd.logs.filterbulk import failure_texts, failures_of_texts, line_starts, usable_in_bulk

# A backlog smaller than this is read as fast as a fork would pay off.
MIN_BACKLOG_BYTES = 4 << 20
# The child reads and answers in blocks of about this many bytes: the first
# answer comes after one block, and no answer is larger than one block's.
BLOCK_BYTES = 256 << 10
# Answers the daemon holds beyond what it reads next; past that the child
# waits on the pipe, so a slow daemon never holds a whole backlog's answers.
BLOCKS_AHEAD = 8
# How long the daemon waits for an answer the child is working on, at most:
# about what working out a slice itself takes.
WAIT_SECONDS = 0.003
# Slices with an unusual line, past which (and past as many answered) the
# lookahead stops.
UNUSUAL_SLICES = 16
_FRAME = struct.Struct("=I")


def start(log_filter, follower):
    """A Lookahead over what `follower` has not returned yet, if that is a backlog
    worth it and the filter takes the bulk path; else None."""
    if not usable_in_bulk(log_filter):
        return None
    unread = follower.unread()
    if unread is None:
        return None
    fd, offset, size = unread
    if size - offset < MIN_BACKLOG_BYTES:
        return None
    return Lookahead(log_filter, fd, offset, size, follower.max_line)


class _Block:
    # indices: the failure lines' numbers within the block, ascending.
    __slots__ = ("first", "end", "crcs", "indices", "hosts", "times")

    def __init__(self, first, count, crcs, texts):
        self.first, self.end = first, first + count   # line numbers from the lookahead's start
        self.crcs = array("I")
        self.crcs.frombytes(crcs)
        # None: a line of the block is unusual, and the daemon classifies it itself.
        self.indices, self.hosts, self.times = texts if texts is not None else (None, None, None)


class Lookahead:
    """The child reading one file from `offset` to `end`, and its answers.

    take(lines) must see every line the follower returns from that offset on,
    in order: it counts them to know which of the child's lines come next.
    """

    def __init__(self, log_filter, fd, offset, end, max_line):
        self.filter = log_filter
        self.cursor = 0          # the child's number of the next line the daemon reads
        self.served = 0          # slices answered
        self.behind = 0          # slices read before the child answered for them
        self.unusual = 0         # slices with a line only the daemon's own path judges
        self.finished = False    # nothing more will be answered
        self.gave_up = False     # finished because its answers were of no use
        self._blocks = deque()
        self._buffer = bytearray()
        self._received = 0       # lines the child has answered so far
        self._eof = False
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child; its answers are what the tests check)
            code = 1
            try:
                os.close(read_end)
                _child(log_filter, fd, offset, end, max_line, write_end)
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.pid, self._pipe = pid, read_end

    def take(self, lines):
        """(offsets, failures) of `lines`, as policyd.logs.filterbulk.failures_in_lines
        gives them, if the child has answered for these very lines; else None,
        and the caller classifies them."""
        first, size = self.cursor, len(lines)
        self.cursor += size
        if self.finished:
            return None
        self._receive(first + size)
        if self._received < first + size and self._received > first - size and not self._eof:
            # The child is on these lines: its answer comes sooner than the daemon
            # would work them out itself, and that would take the CPU it needs.
            waited = time.monotonic() + WAIT_SECONDS
            while self._received < first + size and not self._eof:
                left = waited - time.monotonic()
                if left <= 0 or not select.select([self._pipe], [], [], left)[0]:
                    break
                self._receive(first + size)
        if not size:
            if self._eof and self._received <= first:
                self.close()   # everything it read was read here too
            return None
        blocks = self._blocks
        while blocks and blocks[0].end <= first:
            blocks.popleft()   # lines read before the child got to them
        if self._received < first + size:
            if self._eof:
                self.close()   # the rest of these lines is past what the child read
            else:
                self.behind += 1
            return None
        covering = []
        for block in blocks:
            if block.first >= first + size:
                break
            if block.indices is None:
                self.unusual += 1
                if self.unusual > UNUSUAL_SLICES and self.unusual > self.served:
                    # A log unusual all along (a NUL byte in every block, say) costs
                    # the child's CPU for nothing: the daemon reads it alone.
                    self.close()
                    self.gave_up = True
                return None
            covering.append(block)
        crcs = array("I")
        for block in covering:
            crcs.extend(block.crcs[max(first - block.first, 0):first + size - block.first])
        if crcs != array("I", map(zlib.crc32, lines)):
            # Not the lines the child read (the file was truncated and written
            # again under the same name): nothing more it says can be used.
            self.close()
            self.gave_up = True
            return None
        lines_before, hosts, times = [], [], []
        for block in covering:
            low = bisect_left(block.indices, first - block.first)
            high = bisect_left(block.indices, first + size - block.first)
            # A failure's line number in the block -> in this slice.
            lines_before += map((block.first - first).__add__, block.indices[low:high])
            hosts += block.hosts[low:high]
            times += block.times[low:high]
        failures = failures_of_texts(self.filter, hosts, times)
        if failures is None:
            return None
        where = line_starts(lines)
        self.served += 1
        return list(map(where.__getitem__, lines_before)), failures

    def close(self):
        """Stop the child (if it still runs) and forget its answers."""
        if self._pipe is None:
            self.finished = True
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self._pipe)
        self._pipe = None
        self._blocks.clear()
        self._buffer.clear()
        self.finished = True

    def _receive(self, needed):
        """Answers from the pipe, while the child has more ready and the daemon is not
        already BLOCKS_AHEAD blocks past line `needed`."""
        while not self._eof and (self._received < needed or len(self._blocks) < BLOCKS_AHEAD):
            try:
                data = os.read(self._pipe, 1 << 20)
            except BlockingIOError:
                return
            if not data:
                self._eof = True
                return
            self._buffer += data
            buffer = self._buffer
            at = 0
            while len(buffer) - at >= _FRAME.size:
                (size,) = _FRAME.unpack_from(buffer, at)
                if len(buffer) - at - _FRAME.size < size:
                    break
                count, crcs, texts = marshal.loads(buffer[at + _FRAME.size:at + _FRAME.size + size])
                self._blocks.append(_Block(self._received, count, crcs, texts))
                self._received += count
                at += _FRAME.size + size
            del buffer[:at]


def _child(log_filter, fd, offset, end, max_line, out):  # pragma: no cover (runs in the child)
    """Read the file from offset to end in blocks, as LogFollower splits it into lines,
    and answer for each block. Only pure functions run here: the daemon's other
    threads do not exist in the child, and whatever lock they held stays held."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)
    gc.disable()   # nothing here makes cycles
    carry, skipping = b"", False
    while offset < end:
        data = os.pread(fd, min(BLOCK_BYTES, end - offset), offset)
        if not data:
            break
        offset += len(data)
        parts = data.split(b"\n")
        rest = parts.pop()
        if parts:
            if skipping:
                skipping = False
                parts = parts[1:]
            elif carry:
                parts[0] = carry + parts[0]
            carry = b""
            lines = [line for line in parts if len(line) <= max_line]
            _answer(log_filter, lines, out)
        if not skipping:
            if len(carry) + len(rest) > max_line:
                carry, skipping = b"", True
            else:
                carry += rest


def _answer(log_filter, lines, out):  # pragma: no cover (runs in the child)
    crcs = array("I", map(zlib.crc32, lines)).tobytes()
    texts = failure_texts(log_filter, lines)
    if texts is not None:
        starts, hosts, times = texts
        # Where each line starts in the block's b"\n".join: a failure's line number.
        where = line_starts(lines)
        texts = (list(map(bisect_left, repeat(where), starts)), hosts, times)
    frame = marshal.dumps((len(lines), crcs, texts))
    view = memoryview(_FRAME.pack(len(frame)) + frame)
    while view:
        view = view[os.write(out, view):]
