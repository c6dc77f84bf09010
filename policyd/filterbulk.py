"""Filters in bulk: many lines classified at once, exactly as Filter.classify would.

Owns the two bulk forms: a slice of lines the daemon read (classify_batch) and a
region of a log buffer that test-filter reads (classify_region, which finds the
lines holding a prefilter token at C speed and never makes the others Python
objects). Both inline the first rule's common case: the line matches it with a
valid host; every other case goes through Filter.classify's own code.
"""
from policyd.filters import (_FIND_WINDOW, _HOST_CACHE, MAX_LINE_BYTES, Failure, Outcome, _cached_parse_host,
                             _holds_any, _RegexRule, search_token)


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


def classify_region(log_filter, buffer, low, high):
    """classify() of every line of buffer[low:high] (whole lines, no NUL byte), in
    bulk: ([(start, end, address)] of its failures, number of MALFORMED lines).
    The lines holding a prefilter token are found at C speed; no other line
    becomes a Python object. The first rule's common case is inlined."""
    first, look = log_filter._checked_rules[0] if log_filter._checked_rules else (None, True)
    fast = isinstance(first, _RegexRule) and not look
    match = first.regex.match if fast else None
    host_group = first.regex.groupindex["host"] if fast else 0
    ignore, cache, host_of = log_filter._ignore, _HOST_CACHE, log_filter._candidate_host
    find, rfind, malformed_outcome = buffer.find, buffer.rfind, Outcome.MALFORMED
    failures, add, malformed = [], None, 0
    add = failures.append
    tokens = log_filter.prefilter
    for number, token in enumerate(tokens):
        earlier = tokens[:number]   # a line holding one of these was classified already
        position = search_token(buffer, token, low, high)
        while position >= 0:
            start = rfind(b"\n", 0, position) + 1
            end = find(b"\n", position, high)
            # The next hit is usually a few lines on: one window's plain find first.
            position = find(token, end + 1, min(high, end + _FIND_WINDOW))
            if position < 0 and end + _FIND_WINDOW < high:
                position = search_token(buffer, token, end + _FIND_WINDOW - len(token) + 1, high)
            line = buffer[start:end]
            if earlier and _holds_any(line, earlier):
                continue
            if end - start > MAX_LINE_BYTES:
                malformed += 1
                continue
            if fast:
                found = match(line)
                if found is not None:
                    address = cache.get(found.group(host_group))
                    if address is not None and address is not malformed_outcome:
                        for required, skip in ignore:
                            if required in line and skip(line):
                                break
                        else:
                            add((start, end, address))
                        continue
            outcome = host_of(line)
            if outcome is malformed_outcome:
                malformed += 1
            elif outcome is not Outcome.IGNORED:
                add((start, end, outcome[0]))
    return failures, malformed
