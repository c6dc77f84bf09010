"""What one nginx error.log write looks like, for the forged-line guard (policyd.logs.guard).

Owns the facts about nginx's entries the guard relies on: the server-written
prefix and tail, how a raw request path is decoded and normalized into the lines
it writes, and which lines a write that ends in a given tail must have held.
"""
import re
from urllib.parse import unquote_to_bytes

from policyd.logs.filters import Failure, _cached_parse_host


class _Patterns:
    """The nginx patterns, compiled on first use: compiling is most of a small
    command's start-up, and test-filter needs them only near a suspect line."""

    SOURCES = {
        # nginx writes the client, server and raw request after the message; the raw
        # request line holds no space or control byte (nginx >= 1.21.1 refuses them).
        # The client is an address, or `unix:` behind a proxy on a socket.
        "tail": rb', client: ([^, ]*), server: [^,]*, request: "[A-Z_-]+ ([^ ]*)',
        # A complete nginx entry ends with the host (which holds no quote or space) or
        # the referrer nginx writes after it.
        "complete": rb', (?:host|referrer): "[^" ]*"\Z',
        # A message naming a path comes with the errno (ngx_log_errno keeps 50 bytes for
        # it, marking the cut with "..."), so a truncated entry that wrote newlines ends
        # in a line holding the errno and no complete tail.
        "errno": rb' \(\d+: ',
        "encoded_newline": rb'%0[aA]',
        "cut_line": rb' \(\d+: (?![^\n]*, (?:host|referrer): "[^" \n]*"\n)[^\n]*\n',
        # What nginx writes before the message of every entry: time, level, pid#tid.
        "entry_start": rb'\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[[a-z]+\] \d+#\d+: ',
        # Between the end of a logged path and the tail: the path's closing quote (after
        # the index file nginx appends to a directory), the message's words and errno:
        # `" failed (2: No such file or directory)`, `index.html" is not found (2: ...)`.
        "message_end": rb'[^"/]*" [a-z]+(?: [a-z]+)*(?: \(\d+: [^()"]*\))?',
    }

    def __getattr__(self, name):
        compiled = re.compile(self.SOURCES[name])
        setattr(self, name, compiled)
        return compiled


_NGINX = _Patterns()
_ABSOLUTE = re.compile(rb"\A[A-Za-z][A-Za-z0-9+.-]*:/+[^/?#]*")   # slashes may come merged


def written_lines(raw_target):
    """The lines nginx writes for a raw request target's path when it logs the
    decoded path ([first, ..., last], at least two), or None if it writes no newline.
    The path starts after an absolute form's `scheme://host` and ends at a raw
    `?` or `#`; %XX is decoded, slashes merged and dot segments resolved
    (checked against nginx 1.22 in tests/netns/test_forged_lines.py)."""
    path = _ABSOLUTE.sub(b"", raw_target).split(b"?", 1)[0].split(b"#", 1)[0]
    if b"%0a" not in path and b"%0A" not in path:
        return None
    lines = _nginx_normalized(unquote_to_bytes(path)).split(b"\n")
    return lines if len(lines) > 1 else None


def ending_tails(line):
    """[(client text, written lines)] of each tail in `line` that could be the
    server-written tail of a write whose decoded path wrote newlines: its request
    path writes lines, the line starts with the last of them, and only the path's
    closing quote and the message's end lie between that and the tail. The real
    tail always qualifies; a decoy qualifies only where the attacker wrote the
    line's start, which is on a line the decoded path wrote."""
    tails = []
    for found in _NGINX.tail.finditer(line):
        raw = found.group(2)
        if line[found.end():found.end() + 1] != b" ":
            # No version: an HTTP/0.9 request (no headers either, so the line ends
            # with the request's closing quote), or a raw request cut off.
            if found.end() != len(line) or not raw.endswith(b'"'):
                continue
            raw = raw[:-1]
        lines = written_lines(raw)
        if (lines is not None and line.startswith(lines[-1])
                and _NGINX.message_end.fullmatch(line, len(lines[-1]), found.start()) is not None):
            tails.append((found.group(1), lines))
    return tails


def newline_requests(line):
    """The clients of the tails in `line` whose request path writes newlines."""
    return [found.group(1) for found in _NGINX.tail.finditer(line) if written_lines(found.group(2))]


def write_start(previous, written, log_filter):
    """Where the write that a tail with `written` lines ends began: the index in
    `previous` (the physical lines before the tail's line, oldest first, none of
    them further back than one write) of its first line, or None if those lines
    are not what nginx would have written. The lines between must be exactly the
    decoded path's (the write's own first line, with its time, pid and connection
    id, included), and the first is an entry start ending in the path's first part
    that is no failure line."""
    first = len(previous) - (len(written) - 1)
    if first < 0:
        return None
    if any(have != want for have, want in zip(previous[first + 1:], written[1:-1])):
        return None
    head = previous[first]
    if (not head.endswith(written[0]) or _NGINX.entry_start.match(head) is None
            or isinstance(log_filter.classify(head), Failure)):
        return None
    return first


def write_head(line, log_filter):
    """True if `line` can be the first line of a write nginx truncated: an entry
    start, and not a failure line (a path message's entry begins with the path)."""
    return _NGINX.entry_start.match(line) is not None and not isinstance(log_filter.classify(line), Failure)


def nginx_sender(line):
    """The client nginx named in the tail of an entry whose raw request wrote newlines,
    read from its last line alone: the one client among the tails that can end the
    write (ending_tails), else None. policyd.logs.guard checks the lines before too."""
    senders = {_cached_parse_host(client) for client, _lines in ending_tails(line)}
    return senders.pop() if len(senders) == 1 else None


def _nginx_normalized(path):
    """The path as nginx writes it after decoding: slashes merged, dot segments resolved."""
    kept = []
    for segment in path.split(b"/")[1:]:
        if segment == b"." or segment == b"":
            continue
        if segment == b"..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    trailing = b"/" if path.endswith((b"/", b"/.", b"/..")) and kept else b""
    return b"/" + b"/".join(kept) + trailing
