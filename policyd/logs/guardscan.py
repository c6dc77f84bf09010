"""The forged-line guard for `policyd test-filter`, which never splits a slice into lines.

Owns finding, at C speed, the few places in a slice of a log where a request
could have forged lines (policyd.logs.guard's judgement), and judging only the
failures near them with the daemon's own judge, so the offline scan drops
exactly what the daemon drops.
"""
import bisect

from policyd.logs.filters import Failure
from policyd.logs.guard import _NGINX, NginxErrorJudge, _Line


class RegionJudge:
    """The daemon's judgement for `policyd test-filter`, which never splits a
    region into lines: drops(start, end) says whether the failure line
    buffer[start:end] would be dropped. Only failures near a suspect line are
    judged in full, so a clean region costs two regex passes."""

    def __init__(self, log_filter, buffer, end, candidates):
        self.filter, self.buffer, self.end = log_filter, buffer, end
        self.continuation = log_filter.guard["kind"] == "continuation"
        self.suspects = suspect_ranges(log_filter, buffer, end, candidates)
        self.starts = [low for low, _high in self.suspects]
        self.reach = max((high - low for low, high in self.suspects), default=0)

    def drops(self, start, end):
        if not self.continuation:
            first = bisect.bisect_left(self.starts, start - self.reach)
            last = bisect.bisect_right(self.starts, start)
            if not any(self.suspects[i][1] >= end for i in range(first, last)):
                return False
        return dropped_in_region(self.filter, self.buffer, start, end, self.end)


def suspect_ranges(log_filter, buffer, end, candidates=None):
    """For the offline scan of buffer[:end] (whole lines): sorted (lo, hi) byte
    ranges holding every failure line the daemon's judge might drop. Searched
    at C speed over the region, or only over the write after each of the
    (start, end) failure candidates when those windows are the smaller part."""
    guard = log_filter.guard or {}
    if guard.get("kind") != "nginx-error":
        return []
    size = guard["entry_max_bytes"]
    windows = [(0, end)]
    if candidates is not None and len(candidates) * size < end // 2:
        windows = []
        for start, _ in sorted(candidates):
            high = min(end, start + size + 1)
            if windows and start <= windows[-1][1]:
                windows[-1] = (windows[-1][0], max(windows[-1][1], high))
            else:
                windows.append((start, high))
    ranges = set()
    find = buffer.find
    for low, high in windows:
        # An encoded newline: memchr for "%", which log text rarely holds.
        found = find(b"%", low, high)
        while found >= 0:
            if _NGINX.encoded_newline.match(buffer, found):
                line_end = find(b"\n", found, end)
                line_end = end if line_end < 0 else line_end
                ranges.add((max(0, line_end + 1 - size), line_end))
            found = find(b"%", found + 1, high)
        # A truncated write: a line with an errno and no complete tail, ending
        # exactly `size` bytes after a line start. memchr for "(", then the cheap
        # test of the line's length before the regex.
        found = find(b"(", low, high)
        while found >= 0:
            line_end = find(b"\n", found, end)
            line_end = end if line_end < 0 else line_end
            head = line_end + 1 - size       # the first byte of its write, if it was truncated
            if head >= 0 and (head == 0 or buffer[head - 1] == 10):
                line_start = buffer.rfind(b"\n", 0, found) + 1
                if _NGINX.cut_line.search(buffer, line_start, line_end + 1):
                    ranges.add((head, line_end))
            found = find(b"(", line_end + 1, high)
    return sorted(ranges)


def tally_judged(judge, lines, low, high):
    """For the offline scan: run an NginxErrorJudge (positioned at the first of
    `lines`) over whole lines and return the outcome of each non-ignored line
    starting in [low, high): Failure, Outcome.MALFORMED, or None if dropped."""
    results = []
    judge.every_line = True
    judge._process(lines, results)
    return [e.outcome for e in results if isinstance(e, _Line) and low <= e.start < high]


def dropped_in_region(log_filter, buffer, start, end, limit=None):
    """For the offline scan: True if the daemon's judge drops the failure line
    buffer[start:end] (buffer[:limit] being whole lines). Judges the lines
    around it (within one write either side)."""
    limit = len(buffer) if limit is None else limit
    guard = log_filter.guard or {}
    if guard.get("kind") == "continuation":
        if start == 0:
            return False
        before = buffer.rfind(b"\n", 0, start - 1) + 1
        return guard["whole"].search(buffer[before:start - 1]) is None
    if guard.get("kind") != "nginx-error":
        return False
    size = guard["entry_max_bytes"]
    context_start = buffer.rfind(b"\n", 0, max(0, start - size)) + 1 if start > size else 0
    context_end = buffer.find(b"\n", min(limit, end + size), limit)
    context_end = limit - 1 if context_end < 0 else context_end
    judge = NginxErrorJudge(log_filter)
    judge.every_line = True
    judge._position = context_start
    results = []
    judge._process(buffer[context_start:context_end].split(b"\n"), results)
    return not any(isinstance(e, _Line) and e.start == start and isinstance(e.outcome, Failure)
                   for e in results)
