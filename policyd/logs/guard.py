"""Whole log entries from physical lines: no request can write a failure line for someone else.

Owns the judgement between a filter and the ban engine: which failure lines a
request wrote into another entry (dropped, and counted against the request's
real sender when that can be read), holding failures while a write may still
be arriving (policyd.logs.guardscan applies it to the offline scan). What one
nginx write holds is policyd.logs.nginxentry's. Filters opt in with their
`guard` key; see filters/README.md for what each kind guarantees.
"""
import re
import time
from bisect import bisect_left
from collections import deque
from itertools import accumulate

from policyd.logs.filterbulk import failures_in_lines, line_starts
from policyd.logs.filters import Failure, Filter, Outcome, _cached_parse_host
from policyd.logs.nginxentry import (_NGINX, ending_tails, newline_requests, nginx_sender,  # noqa: F401
                                     write_head, write_start)   # nginx_sender: one line's sender, for callers

# A failure read while its write may be incomplete waits this long for the rest.
HOLD_SECONDS = 1.0
_SLASHES = re.compile(rb"/+")


class Forgery:
    """A request that wrote lines into another entry of the log."""

    __slots__ = ("sender", "filter", "dropped", "reason", "time")

    def __init__(self, sender, filter, dropped, reason, time=None):  # noqa: A002
        self.sender = sender    # the request's real client, if it can be read
        self.filter = filter
        self.dropped = dropped  # failure lines it wrote, dropped
        self.reason = reason    # encoded-newline | truncated | continuation
        self.time = time

    def _fields(self):
        return (self.sender, self.filter, self.dropped, self.reason, self.time)

    def __eq__(self, other):
        return self._fields() == other._fields() if other.__class__ is Forgery else NotImplemented

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return (f"Forgery(sender={self.sender!r}, filter={self.filter!r}, dropped={self.dropped!r}, "
                f"reason={self.reason!r}, time={self.time!r})")

    def failure(self):
        """The request itself, as one failure of its sender (who must be known)."""
        return Failure(self.sender, self.filter, self.time)


def judge_for(log_filter, clock=time.monotonic, hold_seconds=HOLD_SECONDS):
    """The judge a followed log needs: one per LogSource."""
    kind = (log_filter.guard or {}).get("kind")
    if kind == "nginx-error":
        return NginxErrorJudge(log_filter, clock, hold_seconds)
    if kind == "continuation":
        return ContinuationJudge(log_filter)
    return PlainJudge(log_filter)


def failures_from(judge, lines, mid_write=False, known=None):
    """The daemon's text -> failures step for one slice of a log: ([Failure], the
    number of MALFORMED lines, [(i, Forgery)]) from judge.judge(lines, mid_write,
    known), where i is how many failures came before the forgery in the log. A
    Failure is the tuple (host, filter, time) the ban engine reads. known: the
    slice's failures_in_lines() result if already worked out (policyd.logs.lookahead)."""
    outcomes = judge.judge(lines, mid_write, known)
    if set(map(type, outcomes)) <= {Failure}:
        return outcomes, 0, []   # failures alone: the common case, and a flood's
    failures, forgeries, malformed = [], [], 0
    add, is_malformed = failures.append, Outcome.MALFORMED
    for outcome in outcomes:
        if outcome.__class__ is Failure:
            add(outcome)
        elif outcome is is_malformed:
            malformed += 1
        else:
            forgeries.append((len(failures), outcome))
    return failures, malformed, forgeries


class PlainJudge:
    """A log no request can write a line into: every line stands on its own."""

    holding = False
    takes_known = True   # judge() can use a slice's failures worked out elsewhere

    def __init__(self, log_filter):
        self.filter = log_filter

    def release_in(self):
        """Seconds until held failures go out even if the rest of their write never
        comes; None when nothing is held (the daemon's loop wakes for it)."""
        return None

    def judge(self, lines, mid_write=False, known=None):
        """Failures, Forgery events and Outcome.MALFORMED, in log order. known: the
        lines' policyd.logs.filterbulk.failures_in_lines() result, if worked out:
        every line not a failure then is IGNORED."""
        if known is not None:
            return list(known[1])
        return [outcome for _index, outcome in _classify_batch(self.filter, lines)]


def _classify_batch(log_filter, lines):
    """[(index, outcome)] of the lines not IGNORED (policyd.logs.filters' bulk form)."""
    batch = getattr(log_filter, "classify_batch", None)
    if batch is not None:
        return batch(lines)
    classify, ignored = log_filter.classify, Outcome.IGNORED
    return [(i, outcome) for i, line in enumerate(lines)
            if (outcome := classify(line)) is not ignored]


class ContinuationJudge(PlainJudge):
    """For logs where a field a request controls may hold newlines but never the
    entry's own skeleton (Traefik's Common Log Format, oauth2-proxy: a Basic user
    name holds no colon, so no line of it can carry the entry's time). A line is
    `whole` when it holds that skeleton; a failure line right after a line that is
    not whole was written by the request inside an entry, and is dropped."""

    takes_known = False

    def __init__(self, log_filter):
        super().__init__(log_filter)
        self.whole = log_filter.guard["whole"]
        self.sender_regex = log_filter.guard["sender"]
        self.after_whole = True   # a resumed log starts after a whole entry
        self.entry_sender = None  # the client named by the line the current entry began with

    def judge(self, lines, mid_write=False, known=None):
        # Every line's outcome is needed: whether it is whole decides the next one's.
        classify, whole = self.filter.classify, self.whole.search
        results = []
        for line in lines:
            outcome = classify(line)
            if self.after_whole:
                found = self.sender_regex.match(line)
                self.entry_sender = _cached_parse_host(found.group("host")) if found else None
            elif isinstance(outcome, Failure):
                results.append(Forgery(self.entry_sender, self.filter.name, 1, "continuation",
                                       outcome.time))
                outcome = Outcome.IGNORED
            if outcome is not Outcome.IGNORED:
                results.append(outcome)
            self.after_whole = whole(line) is not None
        return results


class _Line:
    __slots__ = ("index", "start", "end", "outcome")

    def __init__(self, index, start, end, outcome):
        self.index, self.start, self.end, self.outcome = index, start, end, outcome


def _outcomes(entries):
    """What a judge hands on: the outcomes of lines not dropped, and reports."""
    # Only the few _Line entries (the lines of the last write, held or recent) are
    # looked at one by one; what lies between them is handed on in slices, since
    # a flood's slices are hundreds of failures.
    kinds = list(map(type, entries))
    handed, at = [], 0
    for _ in range(kinds.count(_Line)):
        found = kinds.index(_Line, at)
        handed += entries[at:found]
        if entries[found].outcome is not None:
            handed.append(entries[found].outcome)
        at = found + 1
    handed += entries[at:]
    return handed


class NginxErrorJudge(PlainJudge):
    """nginx's error.log, shared with any site that logs decoded paths.

    nginx writes each entry with one write(2) of at most entry_max_bytes
    (NGX_MAX_ERROR_STR, 2048), truncating longer ones. A request can put
    newlines into an entry only through a decoded path, so its entry either
    ends in a line holding the raw request with `%0A` (policyd.logs.nginxentry
    finds the lines that request wrote, and only those are dropped), or was
    truncated to exactly entry_max_bytes (every line from the write's first
    is dropped). Failures are held while the follower may have read only part
    of a write; a read that ends between writes ends every write.
    """

    every_line = False   # True: a _Line (with its place) for every non-ignored line

    def __init__(self, log_filter, clock=time.monotonic, hold_seconds=HOLD_SECONDS):
        super().__init__(log_filter)
        self.max_bytes = log_filter.guard["entry_max_bytes"]
        self.clock = clock
        self.hold_seconds = hold_seconds
        self._position = 0          # where the next line starts, counting from the first line read
        self._index = 0
        self._tail = deque()        # (start, line) of each line of the last max_bytes
        self._recent = deque()      # _Line of each non-ignored line of the last max_bytes
        self._held = []             # results waiting for the rest of their write
        self._held_since = None

    @property
    def holding(self):
        return bool(self._held)

    def release_in(self):
        if not self._held:
            return None
        return max(0.0, self._held_since + self.hold_seconds - self.clock())

    def judge(self, lines, mid_write=False, known=None):
        results = self._held
        self._process(lines, results, known)
        if mid_write and any(isinstance(e.outcome, Failure) for e in results if isinstance(e, _Line)):
            if self._held_since is None:
                self._held_since = self.clock()
            if self.clock() - self._held_since < self.hold_seconds:
                # Only what the rest of a write can still drop waits: a forging line
                # drops failures within max_bytes before it, and every line still to
                # come starts at self._position or later. So a flood read in slices
                # is banned slice by slice, not held until its end.
                cut = self._position - self.max_bytes
                ready = 0
                while ready < len(results) and (not isinstance(results[ready], _Line)
                                                or results[ready].start < cut):
                    ready += 1
                self._held = results[ready:]
                if ready:
                    self._held_since = self.clock()
                return _outcomes(results[:ready])
        self._held, self._held_since = [], None
        self._recent.clear()
        if not mid_write:
            self._tail.clear()      # no write goes on past a read that ends between writes
        return _outcomes(results)

    def _process(self, lines, results, known=None):
        if not results:
            self._recent.clear()   # what was returned can no longer be dropped
        blob = b"\n".join(lines) + b"\n"
        if _NGINX.encoded_newline.search(blob) or _NGINX.cut_line.search(blob):
            self._judge_each(lines, results)
        else:
            self._classify_each(lines, results, known)

    def _classify_each(self, lines, results, known=None):
        """The common case, nothing in the batch could end a forging write: classify only."""
        position, index, recent = self._position, self._index, self._recent
        end = position + sum(map(len, lines)) + len(lines)
        fast = known
        if fast is None and isinstance(self.filter, Filter):
            fast = failures_in_lines(self.filter, lines)
        if fast is not None:
            offsets, failures = fast
            # No line still to come can drop or hold a failure before the batch's last write.
            keep = 0 if self.every_line else bisect_left(offsets, end - self.max_bytes - position)
            results.extend(failures[:keep])
            if keep < len(offsets):
                starts = line_starts(lines)
                for number in range(keep, len(offsets)):
                    line = bisect_left(starts, offsets[number])
                    start = position + offsets[number]
                    entry = _Line(index + line, start, start + len(lines[line]), failures[number])
                    recent.append(entry)
                    results.append(entry)
            found = ()
        else:
            found = _classify_batch(self.filter, lines)
        if found:
            # Where each line starts, summed at C speed: only failures need it.
            before = list(accumulate(map(len, lines), initial=position))
            append = results.append
            last_write = -1 if self.every_line else end - self.max_bytes
            for number, outcome in found:
                start = before[number] + number   # and a newline after each line
                if start < last_write:
                    # No line still to come can drop it, nor hold it: handed on as it is.
                    append(outcome)
                    continue
                entry = _Line(index + number, start, start + len(lines[number]), outcome)
                recent.append(entry)
                append(entry)
        position = end
        index += len(lines)
        # Keep the lines of the last max_bytes for a forging write still to come.
        kept, oldest, start = self._tail, position - self.max_bytes, position
        tail = []
        for line in reversed(lines):
            start -= len(line) + 1
            if start < oldest:
                break
            tail.append((start, line))
        if len(tail) < len(lines):
            kept.clear()
        kept.extend(reversed(tail))
        while kept and kept[0][0] < oldest:
            kept.popleft()
        # Failures further back than that no line still to come can drop: forget
        # them, or a flood read in slices (each ending mid_write) keeps them all.
        while recent and recent[0].start < oldest:
            recent.popleft()
        self._position, self._index = position, index

    def _judge_each(self, lines, results):
        classify, ignored = self.filter.classify, Outcome.IGNORED
        kept, recent, max_bytes = self._tail, self._recent, self.max_bytes
        position, index = self._position, self._index
        for line in lines:
            start, end = position, position + len(line)
            position = end + 1
            oldest = position - max_bytes
            while kept and kept[0][0] < oldest:
                kept.popleft()
            while recent and recent[0].start < oldest:
                recent.popleft()
            outcome = classify(line)
            entry = _Line(index, start, end, outcome) if outcome is not ignored else None
            if b"%0a" in line or b"%0A" in line:
                self._encoded_newline(line, entry or _Line(index, start, end, None), oldest, results)
            elif (oldest >= 0 and _NGINX.errno.search(line) is not None
                  and not (line.endswith(b'"') and _NGINX.complete.search(line))):
                self._maybe_truncated(entry or _Line(index, start, end, None), oldest, results)
            kept.append((start, line))
            if entry is not None:
                recent.append(entry)
                results.append(entry)
            index += 1
        self._position, self._index = position, index

    def _drop_from(self, head, entry):
        """Drop the failure lines from `head` (a line start) to entry's line: how many."""
        dropped = 0
        for line in [e for e in self._recent if e.start >= head] + [entry]:
            if isinstance(line.outcome, Failure):
                dropped += 1
                line.outcome = None
        return dropped

    def _encoded_newline(self, line, entry, oldest, results):
        """A line holding `%0A`: the end of a write whose decoded path wrote newlines
        if one of its tails explains the lines before it exactly (then those lines,
        and this one, are the request's), else a whole entry of its own."""
        heads, senders = [], set()
        tails = ending_tails(_SLASHES.sub(b"/", line))
        if tails:
            # nginx merges slashes, unless merge_slashes is off: compare with runs merged.
            starts = [start for start, _text in self._tail]
            before = [_SLASHES.sub(b"/", text) for _start, text in self._tail]
        for client, written in tails:
            first = write_start(before, [_SLASHES.sub(b"/", w) for w in written], self.filter)
            if first is not None:
                heads.append(starts[first])
                senders.add(_cached_parse_host(client))
        if heads:
            dropped = self._drop_from(min(heads), entry)
            # Decoys the attacker wrote can explain its write as well as the real
            # tail: then nobody is named. They never make it longer (write_start).
            sender = senders.pop() if len(senders) == 1 else None
            results.append(Forgery(sender, self.filter.name, dropped, "encoded-newline"))
        elif not (oldest >= 0 and _NGINX.errno.search(line) is not None
                  and self._maybe_truncated(entry, oldest, results)):
            # A failure line whose own request path holds an encoded newline (one
            # line, as user names hold no colon): counted as that evidence, once.
            if isinstance(entry.outcome, Failure) and any(
                    _cached_parse_host(client) == entry.outcome.host for client in newline_requests(line)):
                sender, entry.outcome = entry.outcome.host, None
                results.append(Forgery(sender, self.filter.name, 1, "encoded-newline"))

    def _maybe_truncated(self, entry, head, results):
        """True if the line ends a write nginx truncated (exactly max_bytes from a
        line that can begin a write): every failure line of that write is dropped."""
        if head >= entry.start:
            return False
        for start, text in self._tail:
            if start == head:
                if not write_head(text, self.filter):
                    return False
                dropped = self._drop_from(head, entry)
                results.append(Forgery(None, self.filter.name, dropped, "truncated"))
                return True
        return False
