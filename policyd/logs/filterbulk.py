"""Filters in bulk: many lines classified at once, exactly as Filter.classify would.

Owns the two bulk forms: a slice of lines the daemon read (classify_batch) and a
region of a log buffer that test-filter reads (classify_region, which finds the
lines holding a prefilter token at C speed and never makes the others Python
objects). Both inline the first rule's common case: the line matches it with a
valid host; every other case goes through Filter.classify's own code.
"""
import re
from itertools import accumulate, count, repeat
from operator import add, sub

from policyd.logs.filters import (_HOST_CACHE, MAX_LINE_BYTES, Failure, Outcome, _cached_parse_host, _RegexRule,
                             search_token)

_Match = re.Match
_after = (1).__add__   # the start of a line, from the newline before it (or -1)


def classify_batch(log_filter, lines):
    """[(index, outcome)] of log_filter.classify(line) for each of `lines` that is
    not IGNORED: the daemon's bulk form, with the first rule's common case inlined."""
    first, look = log_filter._checked_rules[0] if log_filter._checked_rules else (None, True)
    classify, ignored, results = log_filter.classify, Outcome.IGNORED, []
    if not (log_filter.prefilter and isinstance(first, _RegexRule) and not look):
        for index, line in enumerate(lines):
            outcome = classify(line)
            if outcome is not ignored:
                results.append((index, outcome))
        return results
    match, prefilter, ignore, name = first.regex.match, log_filter.prefilter, log_filter._ignore, log_filter.name
    groups = first.regex.groupindex
    host_group, time_group, parse_time = groups["host"], groups.get("time"), first.time_parser
    cache, malformed, make = _HOST_CACHE, Outcome.MALFORMED, tuple.__new__
    times = parse_time.texts if parse_time is not None else {}
    for index, line in enumerate(lines):
        for token in prefilter:
            if token in line:
                break
        else:
            if len(line) > MAX_LINE_BYTES or b"\x00" in line or line[-1:] == b"\n":
                outcome = classify(line)
                if outcome is not ignored:
                    results.append((index, outcome))
            continue
        found = None
        if len(line) <= MAX_LINE_BYTES and b"\x00" not in line and line[-1:] != b"\n":
            found = match(line)
        if found is not None:
            raw = found.group(host_group)
            address = cache.get(raw)
            if address is None:
                address = _cached_parse_host(raw) or malformed
            if address is not malformed:
                for required, skip in ignore:
                    if required in line and skip(line):
                        break
                else:
                    raw = found.group(time_group) if parse_time is not None else None
                    when = None if raw is None else (times.get(raw) or parse_time(raw))
                    results.append((index, make(Failure, (address, name, when))))
                continue
        outcome = classify(line)
        if outcome is not ignored:
            results.append((index, outcome))
    return results


def region_failures(log_filter, buffer, low, high):
    """What test-filter counts of buffer[low:high] (whole lines, no NUL byte) when
    every line holding a prefilter token takes the first rule's common case (it
    matches with a good host, and no ignore regex can match it): (starts, ends,
    [host text]) of its failure lines, found by C loops alone, each host text
    in the host cache as a good address; else None, and classify_region()
    must judge the region."""
    starts, ends = _candidates(buffer, log_filter.prefilter, low, high)
    if not starts:
        return starts, ends, []
    raws = _common_hosts(log_filter, buffer, starts, ends)
    if raws is None:
        return None
    distinct = set(raws)
    known = set(map(id, map(_HOST_CACHE.get, distinct)))   # by id: comparing ipaddress objects is slow Python
    if id(Outcome.MALFORMED) in known:
        return None
    if id(None) in known:   # host texts new to the cache: each parsed once
        for raw in distinct.difference(_HOST_CACHE):
            if _cached_parse_host(raw) is None:
                return None
    return starts, ends, raws


def _common_matches(log_filter, buffer, starts, ends):
    """The first rule's matches of the candidate lines if each takes its common
    case but for the host's validity (it matches, no ignore regex can), else None."""
    first, look = log_filter._checked_rules[0] if log_filter._checked_rules else (None, True)
    at_line = _at_line(first.regex) if isinstance(first, _RegexRule) and not look else None
    if at_line is None or max(map(sub, ends, starts)) > MAX_LINE_BYTES:
        return None
    matches = list(map(at_line, repeat(buffer), starts, ends))
    if None in matches:
        return None
    find = buffer.find
    if any(max(map(find, repeat(required), starts, ends)) >= 0 for required, _skip in log_filter._ignore):
        return None
    return matches


def _common_hosts(log_filter, buffer, starts, ends):
    """The host texts of the candidate lines if each takes the first rule's common
    case but for the host's validity, else None."""
    matches = _common_matches(log_filter, buffer, starts, ends)
    if matches is None:
        return None
    first = log_filter._checked_rules[0][0]
    return list(map(_Match.group, matches, repeat(first.regex.groupindex["host"])))


def classify_region(log_filter, buffer, low, high):
    """classify() of every line of buffer[low:high] (whole lines, no NUL byte), in
    bulk: ([(start, end, address)] of its failures, number of MALFORMED lines).
    The lines holding a prefilter token are found at C speed; no other line
    becomes a Python object. When every such line takes the first rule's
    common case (it matches with a known good host, and no ignore regex can
    match it), they are classified by C loops (map) alone; otherwise each
    goes through the per-line code."""
    starts, ends = _candidates(buffer, log_filter.prefilter, low, high)
    if not starts:
        return [], 0
    raws = _common_hosts(log_filter, buffer, starts, ends)
    if raws is not None:
        addresses = list(map(_HOST_CACHE.get, raws))
        seen = set(map(id, addresses))   # by id: comparing ipaddress objects is slow Python
        if id(None) not in seen and id(Outcome.MALFORMED) not in seen:
            return list(zip(starts, ends, addresses)), 0
    return _classify_lines(log_filter, starts, ends, list(map(buffer.__getitem__, map(slice, starts, ends))))


def line_starts(lines):
    """Where each line starts in b"\\n".join(lines), and one past the last newline
    after them: summed at C speed."""
    return list(map(add, accumulate(map(len, lines), initial=0), count()))


def failures_in_lines(log_filter, lines):
    """The daemon's common case in C loops: (offsets, failures) of the failure lines
    of `lines`, the offsets being where each starts in b"\\n".join(lines), in log
    order; or None when any line of the slice is unusual (a NUL byte, an over-long
    line, a candidate the first rule does not take, a bad host, a possible ignore
    match), and classify_batch() must judge it line by line."""
    texts = failure_texts(log_filter, lines)
    if texts is None:
        return None
    starts, hosts, times = texts
    failures = failures_of_texts(log_filter, hosts, times)
    return None if failures is None else (starts, failures)


def usable_in_bulk(log_filter):
    """Whether failure_texts() can ever answer for this filter (else it is None for
    every slice): a Filter whose first rule is a regex every line can be held to,
    and a prefilter."""
    if not getattr(log_filter, "_checked_rules", None) or not log_filter.prefilter:
        return False
    first, look = log_filter._checked_rules[0]
    return isinstance(first, _RegexRule) and not look and _at_line(first.regex) is not None


def failure_texts(log_filter, lines):
    """failures_in_lines() but for the hosts' validity, as text: (offsets, [host
    text], [time text or None]); None when a line of the slice is unusual. No
    address is parsed (policyd.logs.lookahead runs this in a child process)."""
    # Without a prefilter every line is a candidate: the token search would find none.
    if not usable_in_bulk(log_filter) or (lines and max(map(len, lines)) > MAX_LINE_BYTES):
        return None
    if not lines:
        return [], [], []
    first = log_filter._checked_rules[0][0]
    buffer = b"\n".join(lines) + b"\n"
    # One newline per line joined: no line holds one of its own.
    if b"\x00" in buffer or buffer.count(b"\n") != len(lines):
        return None
    starts, ends = _candidates(buffer, log_filter.prefilter, 0, len(buffer))
    if not starts:
        return [], [], []
    matches = _common_matches(log_filter, buffer, starts, ends)
    if matches is None:
        return None
    groups = first.regex.groupindex
    hosts = list(map(_Match.group, matches, repeat(groups["host"])))
    times = (list(map(_Match.group, matches, repeat(groups["time"]))) if first.time_parser is not None
             else [None] * len(matches))
    return starts, hosts, times


def failures_of_texts(log_filter, hosts, times):
    """[Failure] of failure_texts()' host and time texts, or None if a host is not
    an address. Each host text is parsed once (the host cache); times likewise."""
    addresses = list(map(_HOST_CACHE.get, hosts))
    seen = set(map(id, addresses))   # by id: comparing ipaddress objects is slow Python
    if id(None) in seen:
        # Host texts new to the cache: each parsed once (a flood's are mostly new),
        # and taken from here: the cache may be cleared while they are parsed.
        parsed = {raw: _cached_parse_host(raw) or Outcome.MALFORMED
                  for raw in set(hosts).difference(_HOST_CACHE)}
        addresses = list(map(parsed.get, hosts, addresses))
        seen = set(map(id, addresses))
    if id(None) in seen or id(Outcome.MALFORMED) in seen:
        return None
    parse_time = log_filter._checked_rules[0][0].time_parser
    if parse_time is None:
        times = repeat(None)
    else:
        raw, times = times, list(map(parse_time.texts.get, times))
        if None in times:   # a time text new to the parser's cache (a flood's share a few)
            for number, when in enumerate(times):
                if when is None and raw[number] is not None:
                    times[number] = parse_time(raw[number])
    return list(map(tuple.__new__, repeat(Failure), zip(addresses, repeat(log_filter.name), times)))


def _candidates(buffer, tokens, low, high):
    """Sorted starts and ends of the lines of buffer[low:high] holding a token."""
    starts = {}
    find, rfind = buffer.find, buffer.rfind
    for token in tokens:
        hits, size = [], len(token)
        add = hits.append
        position = search_token(buffer, token, low, high)
        # bytes.find skips ahead (about 1.4 instructions a byte); a regex's search
        # for a literal steps byte by byte, several times the cost on a slice.
        while position >= 0:
            add(position)
            position = find(token, position + size, high)
        if hits:   # their lines' starts, once each (a line may hold several tokens)
            starts.update(dict.fromkeys(map(_after, map(rfind, repeat(b"\n"), repeat(0), hits))))
    starts = sorted(starts)
    return starts, list(map(find, repeat(b"\n"), starts, repeat(high)))


_AT_LINE = {}


def _at_line(regex):
    """match(buffer, start, end) of `regex` on the line buffer[start:end], or None.

    sre's ^ matches only at the real start of a buffer, so a rule's regex cannot
    run at a line's offset as it is; its leading ^ made multi-line can (it then
    matches after the newline before the line, as ^ at the start of the line
    itself). With endpos the line's end is the end of the text for \\Z and $; only
    a lookbehind could see before the line, so a regex with one is not changed.
    """
    if regex not in _AT_LINE:
        source = regex.pattern
        usable = (isinstance(source, bytes) and source.startswith(b"^") and b"(?<" not in source
                  and not regex.flags & re.MULTILINE)
        _AT_LINE[regex] = re.compile(b"(?m:^)" + source[1:], regex.flags).match if usable else None
    return _AT_LINE[regex]


def _classify_lines(log_filter, starts, ends, lines):
    """classify_region()'s result, line by line (Filter._candidate_host)."""
    failures, malformed = [], 0
    host_of, malformed_outcome = log_filter._candidate_host, Outcome.MALFORMED
    for start, end, line in zip(starts, ends, lines):
        if end - start > MAX_LINE_BYTES:
            malformed += 1
            continue
        outcome = host_of(line)
        if outcome is malformed_outcome:
            malformed += 1
        elif outcome is not Outcome.IGNORED:
            failures.append((start, end, outcome[0]))
    return failures, malformed
