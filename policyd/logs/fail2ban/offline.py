"""`policyd test-filter` over a fail2ban filter: whole buffers at a time.

Owns the offline scan's speed trick: a buffer-wide search for the substrings
every failregex requires (literals.py) picks the only lines that can match; the
rest are counted without being decoded. The daemon never takes this path: it
runs every line in full, so a required text split by a cut-out date (the one
blind spot of a raw-line search) can only make test-filter undercount.
"""
from policyd.logs.filters import Outcome, _plain_region, lines_holding


def scan_region(flt, buffer, end, result, hosts):
    """policyd.logs.filters.scan's hook: buffer[:end] is whole lines. Decoded at once
    when it is plain UTF-8 without over-long lines; else line by line."""
    if flt.scan_tokens and _plain_region(buffer, end):
        return _scan_candidates(flt, buffer, end, result, hosts)
    if _plain_region(buffer, end):
        try:
            text = buffer[:end].decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return scan_text(flt, text, result, hosts)
    lines = buffer[:end].split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    _add(result, len(lines), (flt.classify_timed(line, None, False)[0] for line in lines), hosts)


def _scan_candidates(flt, buffer, end, result, hosts):
    spans = lines_holding(buffer, end, flt.scan_tokens)
    cut, match = flt.dates.cut, flt._match

    def outcomes():
        for start, stop in sorted(spans):   # file order: the connection cache needs it
            # classify_timed() inlined: the region has no NUL and no over-long line.
            try:
                text = buffer[start:stop].decode("utf-8")
                yield match(cut(text)[0] + "\n")
            except (UnicodeDecodeError, ValueError, KeyError, TypeError):
                yield Outcome.MALFORMED

    _add(result, buffer.count(b"\n", 0, end), outcomes(), hosts)


def scan_text(flt, text, result, hosts):
    """Offline scan of decoded whole lines."""
    classify = flt.classify_text
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    _add(result, len(lines), (Outcome.MALFORMED if "\x00" in line else classify(line, None, False)[0]
                              for line in lines), hosts)


def _add(result, line_count, outcomes, hosts):
    """Count `line_count` lines into `result`, of which `outcomes` are the ones
    classified (the rest were ignored unread); each match tallied by host."""
    malformed = 0
    addresses = []   # _address caches objects: HostTally counts them by id
    for outcome in outcomes:
        if outcome is Outcome.IGNORED:
            continue
        if outcome is Outcome.MALFORMED:
            malformed += 1
            continue
        addresses.append(outcome.host)
    hosts.add_all(addresses)
    matched = len(addresses)
    result.lines += line_count
    result.matched += matched
    result.malformed += malformed
    result.ignored += line_count - matched - malformed
