"""Required substrings of a regex: text every match must contain.

Owns the offline scan's speed trick for fail2ban filters: a line that holds no
required substring of any failregex cannot match one, so `policyd test-filter`
skips it without decoding it or cutting its date (the daemon still runs every
line in full). Uses the standard library's regex parser (re._parser).
"""
try:
    import re._parser as _parser
    from re import _constants as _c
except ImportError:  # Python < 3.11
    import sre_constants as _c
    import sre_parse as _parser

MIN_TOKEN = 3


def required_literals(pattern):
    """Substrings of which every match of `pattern` (str) holds at least one, or None."""
    try:
        parsed = _parser.parse(pattern)
    except Exception:  # noqa: BLE001 - any parser complaint means "no prefilter"
        return None
    if parsed.state.flags & (_c.SRE_FLAG_IGNORECASE | _c.SRE_FLAG_VERBOSE):
        return None
    best = _best(parsed)
    return best if best and min(map(len, best)) >= MIN_TOKEN else None


def _score(choice):
    return min(map(len, choice)) if choice else 0


def _best(items):
    """The best choice (a tuple of alternatives) in a sequence that must all match."""
    best, run = (), []

    def consider(choice):
        nonlocal best
        if choice and _score(choice) > _score(best):
            best = choice

    for op, arg in items:
        if op is _c.LITERAL:
            run.append(chr(arg))
            continue
        if op is _c.AT:
            continue  # ^ $ \b consume nothing
        consider(("".join(run),) if run else ())
        run = []
        if op is _c.SUBPATTERN and not arg[1] & _c.SRE_FLAG_IGNORECASE:
            consider(_best(arg[3]))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT) and arg[0] >= 1:
            consider(_best(arg[2]))
        elif op is _c.BRANCH:
            branches = [_best(branch) for branch in arg[1]]
            if all(branches):
                consider(tuple(literal for branch in branches for literal in branch))
    consider(("".join(run),) if run else ())
    return best


def tokens(patterns):
    """Substrings (bytes, UTF-8) of which each match of any pattern holds one, or None."""
    found = []
    for pattern in patterns:
        literals = required_literals(pattern)
        if literals is None:
            return None
        for literal in literals:
            encoded = literal.encode("utf-8")
            if encoded not in found:
                found.append(encoded)
    return tuple(found)
