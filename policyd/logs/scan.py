"""The offline scan behind `policyd test-filter`: a whole log through a filter, counted.

Owns reading the log in slices that overlap by one guarded write (so the
forged-line guard sees across a slice boundary what the daemon's judge sees),
and the bulk path: a slice is searched for the filter's `contains` tokens at C
speed, only the lines around a hit become Python objects, and the guard judges
in full only the failures near a line that could have forged them. A slice with
a NUL byte or a very long line takes the per-line path (the daemon's judge).
A big file is cut into parts, one per CPU (policyd.logs.scanparts).
"""
import os
import time

from policyd.logs import filters, scanparts
from policyd.errors import InputError
from policyd.logs.filterbulk import region_failures
from policyd.logs.filters import MAX_LINE_BYTES, Failure, Outcome, _plain_region


def _count_lines(buffer, low, high):
    """The newlines in buffer[low:high]. Deleting them runs at memchr and memcpy
    speed: half a regex findall's time, a quarter of bytes.count's (which steps
    byte by byte)."""
    return high - low - len(buffer[low:high].replace(b"\n", b""))


class ScanResult:
    """What test-filter reports: counts per outcome and failures per host (text)."""

    def __init__(self, filter, file):   # noqa: A002 (the JSON key's name)
        self.filter, self.file = filter, file
        self.lines = self.matched = self.ignored = self.malformed = 0
        self.forged = 0     # failure lines a request wrote into another entry (policyd.logs.guard)
        self.hosts = {}
        self.seconds = 0.0

    @property
    def lines_per_second(self):
        return self.lines / self.seconds if self.seconds > 0 else 0.0

    def to_json(self):
        """The stable `test-filter --json` object (a dict ready for json.dumps)."""
        return {
            "lines": self.lines,
            "matched": self.matched,
            "ignored": self.ignored,
            "malformed": self.malformed,
            "forged": self.forged,
            "hosts": dict(sorted(self.hosts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "seconds": round(self.seconds, 6),
            "lines_per_second": round(self.lines_per_second, 1),
            "filter": self.filter,
            "file": self.file,
        }


def scan(log_filter, path, workers=1):
    """Run `log_filter` over the file at `path`, counting outcomes per line.
    workers: processes sharing a big regular file (None: one per usable CPU, at
    most policyd.logs.scanparts.MAX_WORKERS); each counts the lines starting in
    its part of the file, reading the guard's context across the cuts, so the
    counts are those of one process."""
    result = ScanResult(log_filter.name, str(path))
    hosts = scanparts.HostTally()
    started = time.perf_counter()
    guard = getattr(log_filter, "guard", None) or {}
    # The bytes of whole lines either side of a slice the guard may need: one write.
    context = guard.get("entry_max_bytes", 1) + 1 if guard else 0
    try:
        with open(path, "rb", buffering=0) as stream:
            if not stream.seekable():
                _scan_regions(log_filter, _regions(stream, result, context), result, hosts)
            else:
                fd = stream.fileno()

                def scan_part(first, stop, result, hosts):
                    _scan_regions(log_filter, _file_regions(fd, result, context, first, stop), result, hosts)
                    return result, hosts

                one = hasattr(log_filter, "scan_region")   # fail2ban filters: one process, as ever
                scanparts.scan(scan_part, scanparts.parts(fd, 1 if one else workers), result, hosts)
    except OSError as error:
        raise InputError(f"cannot read log: {error.strerror}", file=path) from None
    result.hosts = hosts.counts()
    result.seconds = time.perf_counter() - started
    return result


def _scan_regions(log_filter, regions, result, hosts):
    for buffer, low, high, whole in regions:
        if hasattr(log_filter, "scan_region"):   # fail2ban filters (policyd.logs.fail2ban)
            log_filter.scan_region(buffer, high, result, hosts)
        elif log_filter.prefilter and _plain_region(buffer, whole):
            _scan_region(log_filter, buffer, low, high, whole, result, hosts)
        else:
            _scan_lines(log_filter, buffer[:whole], low, high, result, hosts)


def _file_regions(fd, result, context, first=0, stop=None):
    """_regions() for a file that can be read at any offset: each slice is read
    with its context (read twice, a few kB), so no slice is copied to join it.
    Only the lines starting in [first, stop) are counted (line starts; stop
    None: to the end), with the context before and after read as ever."""
    low = first             # the file offsets of buffer[0] and of the first line to count
    base = _line_start_before(fd, first - context) if first and context else first
    size = max(filters.READ_CHUNK_BYTES, 2 * context)
    while True:
        at, start = base, low - base
        buffer = os.pread(fd, start + size, at)
        end_of_file = len(buffer) < start + size
        whole = max(buffer.rfind(b"\n") + 1, start)
        high = whole
        if not end_of_file and context:
            high = buffer.rfind(b"\n", 0, max(0, whole - context)) + 1
        tail = len(buffer) - whole     # a line still without its newline
        if high <= start and not end_of_file and tail > MAX_LINE_BYTES:
            high = whole               # count what precedes an over-long line now
        if stop is not None and at + high >= stop:
            # The last slice of this part: the context after it is in the buffer.
            if stop - at > start:
                yield buffer, start, stop - at, whole
            return
        if high > start:
            yield buffer, start, high, whole
            low, size = at + high, max(filters.READ_CHUNK_BYTES, 2 * context)
            base = at + (buffer.rfind(b"\n", 0, max(0, high - context)) + 1 if context else high)
        if end_of_file:
            if tail > MAX_LINE_BYTES:
                result.lines += 1
                result.malformed += 1
            elif tail:   # the last line, without its newline
                last = buffer[base - at:] + b"\n"
                yield last, low - base, len(last), len(last)
            return
        if tail > MAX_LINE_BYTES and high == whole:
            # An over-long line: counted as malformed, and read on to its end.
            skip = at + len(buffer)
            while True:
                piece = os.pread(fd, size, skip)
                cut = piece.find(b"\n")
                if cut >= 0 or not piece:
                    break
                skip += len(piece)
            result.lines += 1
            result.malformed += 1
            if not piece:
                return
            base = low = skip + cut + 1
        elif high <= start:
            size *= 2   # lines too long for one slice with its context: a larger slice


def _line_start_before(fd, offset):
    """The start of the line holding file offset `offset` (0 if before the file)."""
    while offset > 0:
        at = max(0, offset - 65536)
        found = os.pread(fd, offset - at, at).rfind(b"\n")
        if found >= 0:
            return at + found + 1
        offset = at
    return 0


def _regions(stream, result, context):
    """Yield (buffer, low, high, whole): buffer[low:high] are the whole lines to
    count now; buffer[:whole] is whole lines, with at least `context` bytes of
    them (when the log has them) before low and after high, each counted in its
    own turn.

    A line longer than MAX_LINE_BYTES is counted as malformed here and its
    bytes are dropped as they arrive, so memory stays bounded.
    """
    before = b""      # whole lines already counted, kept as context
    carry = b""       # whole lines not yet counted, then a line still unfinished
    skipping = False  # inside a line already counted as over-long
    while True:
        chunk = stream.read(max(filters.READ_CHUNK_BYTES, 2 * context))
        if skipping and chunk:
            cut = chunk.find(b"\n")
            if cut < 0:
                continue
            chunk, skipping, before = chunk[cut + 1:], False, b""
        buffer = before + carry + chunk if (before or carry) else chunk
        whole = buffer.rfind(b"\n") + 1
        high = whole
        if chunk and context:
            # Hold back the last `context` bytes of lines: they are the context after.
            high = buffer.rfind(b"\n", 0, max(0, whole - context)) + 1
        low = len(before)
        if high > low:
            yield buffer, low, high, whole
            start = buffer.rfind(b"\n", 0, max(0, high - context)) + 1 if context else high
            before = buffer[start:high]
        else:
            high = low
        carry = buffer[high:]
        if not chunk:
            if carry:   # the last line, without its newline
                last = before + carry + b"\n"
                yield last, len(before), len(last), len(last)
            return
        if len(carry) - (whole - high) > MAX_LINE_BYTES:
            if whole > high:   # count the held-back lines first, without context after
                yield buffer, high, whole, whole
            result.lines += 1
            result.malformed += 1
            carry, before, skipping = b"", b"", True


def _scan_region(log_filter, buffer, low, high, whole, result, hosts):
    # The speed trick: search the slice for the prefilter tokens at C speed and
    # cut out only the lines around a hit; every other line is counted as
    # ignored without ever becoming a Python object.
    line_count = _count_lines(buffer, low, high)
    common = region_failures(log_filter, buffer, low, high)
    region_judge = None
    if common is not None and common[0] and log_filter.guard:
        from policyd.logs.guardscan import RegionJudge  # the guard builds on policyd.logs.filters
        region_judge = RegionJudge(log_filter, buffer, whole, list(zip(common[0], common[1])))
        if region_judge.suspects or region_judge.continuation:
            common = None   # some failures may be dropped: judged one by one below
    if common is not None:
        # Counted by host text, at C speed (policyd.logs.filterbulk checked each).
        hosts.add_raw(common[2])
        result.lines += line_count
        result.matched += len(common[2])
        result.ignored += line_count - len(common[2])
        return
    failures, malformed = log_filter.classify_region(buffer, low, high)
    forged = 0
    if log_filter.guard and failures:
        if region_judge is None:
            from policyd.logs.guardscan import RegionJudge
            region_judge = RegionJudge(log_filter, buffer, whole, [(s, e) for s, e, _ in failures])
        if region_judge.suspects or region_judge.continuation:
            kept = [f for f in failures if not region_judge.drops(f[0], f[1])]
            forged = len(failures) - len(kept)
            failures = kept
    hosts.add_all([address for _start, _end, address in failures])
    result.lines += line_count
    result.matched += len(failures)
    result.malformed += malformed
    result.forged += forged
    result.ignored += line_count - len(failures) - malformed - forged


def _scan_lines(log_filter, buffer, low, high, result, hosts):
    """The per-line path (the daemon's judge), for slices with NUL bytes or very
    long lines, and filters without a prefilter."""
    from policyd.logs.guard import NginxErrorJudge, judge_for
    from policyd.logs.guardscan import tally_judged
    judge = judge_for(log_filter)
    if isinstance(judge, NginxErrorJudge):
        # Judge the context too, count only what starts in buffer[low:high].
        judge._position = 0
        outcomes = tally_judged(judge, buffer[:-1].split(b"\n"), low, high)
    else:
        if low:   # a continuation judge needs the line before
            judge.judge([buffer[buffer.rfind(b"\n", 0, low - 1) + 1:low - 1]])
        outcomes = judge.judge(buffer[low:high - 1].split(b"\n"))
    counted = 0
    for outcome in outcomes:
        if outcome is None:
            result.forged += 1
            counted += 1
        elif isinstance(outcome, Failure):
            result.matched += 1
            counted += 1
            hosts.add(outcome.host, 1)
        elif outcome is Outcome.MALFORMED:
            result.malformed += 1
            counted += 1
        else:   # a Forgery: the failure lines it dropped
            result.forged += outcome.dropped
            counted += outcome.dropped
    lines = _count_lines(buffer, low, high)
    result.ignored += lines - counted
    result.lines += lines
