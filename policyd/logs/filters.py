"""Log filters: which raw log line is an authentication failure, and from whom.

Owns the classification of one raw log line (bytes) into Failure / IGNORED /
MALFORMED; loading filter files is policyd.logs.filterfile's (load_filter is
re-exported here), the offline scan policyd.logs.scan's.

`contains` is the speed trick: a line that holds none of the listed substrings is
IGNORED without running the regex or parsing JSON. A rule's `regex` runs on
bytes, only the host is decoded and passed to policyd.addr.parse_host. A host
that is not exactly one address makes the line MALFORMED, never a ban. Lines over
MAX_LINE_BYTES, lines with NUL bytes, candidate JSON lines that do not parse as a
JSON object, and candidate text lines that match no rule and are not UTF-8 are
MALFORMED.
"""
import enum
import json
import re
from operator import itemgetter
from ipaddress import IPv4Address, IPv6Address  # noqa: F401 (the types a Failure's host has)

from policyd.addr import parse_host

MAX_LINE_BYTES = 64 * 1024
READ_CHUNK_BYTES = 256 * 1024   # policyd.logs.scan reads the log in slices of this size (in cache)
_EMPTY_VALUES = (None, "", "-")


def load_filter(name_or_path, search_dirs=None, mode=None, journal=False, cache=False):
    """policyd.logs.filterfile.load_filter (the YAML machinery is imported on first use)."""
    from policyd.logs.filterfile import load_filter as load
    return load(name_or_path, search_dirs=search_dirs, mode=mode, journal=journal, cache=cache)


def scan(log_filter, path, workers=1):
    """policyd.logs.scan.scan: run `log_filter` over the file at `path`, offline
    (workers: processes sharing a big file; None: one per usable CPU)."""
    from policyd.logs.scan import scan as scan_file
    return scan_file(log_filter, path, workers)


class Outcome(enum.Enum):
    IGNORED = "ignored"
    MALFORMED = "malformed"


class Failure(tuple):
    """One failure, the tuple (host, filter, time) the ban engine reads: the host and
    the filter that saw it are its identity; time, the Unix seconds the line carries
    (None: none readable), is not part of it."""

    __slots__ = ()

    def __new__(cls, host, filter, time=None):   # noqa: A002 (the field's name)
        return tuple.__new__(cls, (host, filter, time))

    host = property(itemgetter(0))
    filter = property(itemgetter(1))
    time = property(itemgetter(2))

    def __eq__(self, other):
        if isinstance(other, Failure):
            return self[0] == other[0] and self[1] == other[1]
        return NotImplemented

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self):
        return hash((self[0], self[1]))

    def __getnewargs__(self):
        return tuple(self)

    def __repr__(self):
        return f"Failure(host={self[0]!r}, filter={self[1]!r}, time={self[2]!r})"


class _RegexRule:
    def __init__(self, regex, contains, time_parser=None):
        self.regex = regex
        self.contains = contains
        self.time_parser = time_parser

    def classify(self, line):
        """(address, raw time or None), Outcome.MALFORMED, or None if the rule does not match.
        The time is parsed only when a Failure is made (the offline scan never needs it)."""
        found = self.regex.match(line)
        if found is None:
            return None
        address = _cached_parse_host(found.group("host"))
        if address is None:
            return Outcome.MALFORMED
        return address, (found.group("time") if self.time_parser is not None else None)


class _JsonRule:
    # A plain class, not a dataclass: importing dataclasses (and inspect) is a
    # tenth of test-filter's start-up.
    def __init__(self, contains, match, match_regex, host, present, nonempty, time=None,
                 time_parser=None):
        self.contains, self.match, self.match_regex = contains, match, match_regex
        self.host, self.present, self.nonempty = host, present, nonempty
        self.time, self.time_parser = time, time_parser

    def __repr__(self):
        return f"_JsonRule(contains={self.contains!r}, host={self.host!r})"

    def classify(self, line):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return Outcome.MALFORMED
        if not isinstance(record, dict):
            return Outcome.MALFORMED
        for path, wanted in self.match:
            value = _lookup(record, path)
            # bool is an int in Python; a JSON `true` must not equal 1.
            if value is _MISSING or not any(type(value) is type(w) and value == w for w in wanted):
                return None
        for path, pattern in self.match_regex:
            value = _lookup(record, path)
            if not isinstance(value, str) or pattern.match(value) is None:
                return None
        for path in self.present:
            if _lookup(record, path) is _MISSING:
                return None
        for path in self.nonempty:
            value = _lookup(record, path)
            if value is _MISSING or value in _EMPTY_VALUES or value == [] or value == {}:
                return None
        for path in self.host:
            value = _lookup(record, path)
            if value is _MISSING or value in _EMPTY_VALUES:
                continue
            if not isinstance(value, str):
                return Outcome.MALFORMED
            address = _parse_host_maybe_port(value)
            if address is None:
                return Outcome.MALFORMED
            raw = None
            if self.time is not None:
                raw = _lookup(record, self.time)
                raw = None if raw is _MISSING else raw
            return address, raw
        return Outcome.MALFORMED


_MISSING = object()
_HOST_CACHE = {}
# A flood names each of up to ~100k sources a few times; a cache that holds them
# all parses each once. 131072 entries of host text -> address: about 27 MB at
# most (measured: 20 MB for 100k IPv6 hosts); cleared whole when full.
_HOST_CACHE_LIMIT = 1 << 17


def _cached_parse_host(raw):
    # Failures repeat the same few hosts; ipaddress parsing is the costliest step.
    address = _HOST_CACHE.get(raw)
    if address is None:
        if len(_HOST_CACHE) >= _HOST_CACHE_LIMIT:
            _HOST_CACHE.clear()
        address = _HOST_CACHE[raw] = parse_host(raw) or Outcome.MALFORMED
    return address if address is not Outcome.MALFORMED else None


def _lookup(record, path):
    value = record
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_HOST_PORT = r"(\[[0-9A-Fa-f:.]+\]|[0-9.]+):(\d{1,5})\Z"   # compiled (and cached) by re on use


def _parse_host_maybe_port(text):
    """An address, or `ipv4:port` / `[ipv6]:port` as Go's RemoteAddr writes it."""
    address = parse_host(text)
    if address is None:
        with_port = re.match(_HOST_PORT, text)
        if with_port and int(with_port.group(2)) <= 65535:
            address = parse_host(with_port.group(1))
    return address


class Filter:
    """One loaded filter file; classify() is safe on any bytes."""

    def __init__(self, name, rules, ignore, source=None, guard=None):
        self.name = name
        self.rules = tuple(rules)
        self.ignore = tuple(ignore)
        self.source = source
        self.guard = guard  # dict from the `guard` key, read by policyd.logs.guard; None: no guard
        # An ignore regex runs on every failure line: first the text it cannot match without.
        self._ignore = tuple((_required_text(pattern), pattern.match) for pattern in self.ignore)
        tokens = []
        for rule in self.rules:
            tokens.extend(t for t in rule.contains if t not in tokens)
        # A rule without `contains` must see every line, so no shared prefilter.
        self.prefilter = tuple(tokens) if all(r.contains for r in self.rules) else ()
        # Passing the shared prefilter already proves the `contains` of a rule that
        # lists every prefilter token: only the other rules look again.
        self._checked_rules = tuple(
            (rule, bool(rule.contains) and not (self.prefilter and set(self.prefilter) <= set(rule.contains)))
            for rule in self.rules)

    def __repr__(self):
        return f"Filter({self.name!r})"

    def classify(self, line):
        """Failure(host, filter), Outcome.IGNORED or Outcome.MALFORMED; never raises."""
        if line.endswith(b"\n"):
            line = line[:-1]
        if len(line) > MAX_LINE_BYTES or b"\x00" in line:
            return Outcome.MALFORMED
        if self.prefilter:
            for token in self.prefilter:
                if token in line:
                    break
            else:
                return Outcome.IGNORED
        outcome = self._candidate_host(line)
        if isinstance(outcome, Outcome):
            return outcome
        address, rule, raw_time = outcome
        return Failure(address, self.name, rule.time_parser(raw_time) if raw_time is not None else None)

    def classify_batch(self, lines):
        """[(index, outcome)] of classify(line) for each of `lines` that is not
        IGNORED, in bulk (policyd.logs.filterbulk): the daemon's form."""
        from policyd.logs.filterbulk import classify_batch
        return classify_batch(self, lines)

    def classify_region(self, buffer, low, high):
        """classify() of every line of buffer[low:high] in bulk (policyd.logs.filterbulk):
        ([(start, end, address)] of its failures, number of MALFORMED lines)."""
        from policyd.logs.filterbulk import classify_region
        return classify_region(self, buffer, low, high)

    def _candidate_host(self, line):
        """(host, time) of a failing line that passed the prefilter, or an Outcome."""
        malformed = False
        for rule, look in self._checked_rules:
            if look and not _holds_any(line, rule.contains):
                continue
            result = rule.classify(line)
            if result is None:
                continue
            if result is Outcome.MALFORMED:
                malformed = True
                continue
            for required, match in self._ignore:
                if required in line and match(line):
                    return Outcome.IGNORED
            return result[0], rule, result[1]
        if malformed or b"\x00" in line or not _is_utf8(line):
            return Outcome.MALFORMED
        return Outcome.IGNORED


def _required_text(pattern):
    """The longest run of bytes every match of the compiled bytes `pattern` holds
    (b"" when none can be shown): its top-level literals, which a match of the
    whole sequence always contains, in a pattern without case folding."""
    try:
        from re import _parser
        parsed = _parser.parse(pattern.pattern, pattern.flags)
    except Exception:   # another Python's parser: no shortcut, the regex decides
        return b""
    if not isinstance(pattern.pattern, bytes) or parsed.state.flags & (re.IGNORECASE | re.LOCALE):
        return b""
    best, run = b"", bytearray()
    for op, value in list(parsed.data) + [(None, None)]:
        if op is _parser.LITERAL:
            run.append(value)
            continue
        if len(run) > len(best):
            best = bytes(run)
        run.clear()
    return best


def _holds_any(line, tokens):
    for token in tokens:
        if token in line:
            return True
    return False


def _is_utf8(line):
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Below this many bytes str.find runs its simple skip loop, which beats the
# two-way search it picks for longer haystacks by about 2x on log text.
_FIND_WINDOW = 20000


def search_token(buffer, token, start, end):
    """buffer.find(token, start, end), in windows of _FIND_WINDOW bytes."""
    over = len(token) - 1
    while start < end:
        stop = start + _FIND_WINDOW
        if stop + over >= end:
            return buffer.find(token, start, end)
        found = buffer.find(token, start, stop + over)
        if found >= 0:
            return found
        start = stop
    return -1


def _plain_region(buffer, end):
    """True if buffer[:end] has no NUL byte and no line near MAX_LINE_BYTES.

    Such regions take the fast path; the check is conservative (a line of
    half the limit already sends the region down the per-line path).
    """
    if buffer.find(b"\x00", 0, end) >= 0:
        return False
    step = MAX_LINE_BYTES // 2
    for window in range(0, end, step):
        if buffer.find(b"\n", window, min(window + step, end)) < 0:
            return False
    return True


def lines_holding(buffer, end, tokens, low=0):
    """{(start, end)} of the whole lines of buffer[low:end] that hold any of `tokens`:
    found at C speed, without a Python object for any other line."""
    spans = set()
    add, find, rfind = spans.add, buffer.find, buffer.rfind
    for token in tokens:
        position = search_token(buffer, token, low, end)
        while position >= 0:
            stop = find(b"\n", position, end)
            add((rfind(b"\n", 0, position) + 1, stop))
            # The next hit is usually a few lines on: one window's plain find first.
            position = find(token, stop + 1, min(end, stop + _FIND_WINDOW))
            if position < 0 and stop + _FIND_WINDOW < end:
                position = search_token(buffer, token, stop + _FIND_WINDOW - len(token) + 1, end)
    return spans
