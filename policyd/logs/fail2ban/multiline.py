"""fail2ban's `maxlines` window: failregexes that span several lines.

Owns the buffer of the last N lines (dates cut out), `<SKIPLINES>`, and which
lines a match consumes: the lines it covers leave the window, except those it
skipped over, which stay for later matches (as fail2ban does).
"""
import re

SKIPLINES = "skiplines"
# The window's text is searched once per line: bounded, so that long lines an
# attacker writes cannot make each search cost megabytes (the oldest go first).
MAX_WINDOW_CHARS = 256 * 1024


def skiplines_regex(index):
    """<SKIPLINES>: any number of whole lines, the shortest first."""
    return rf"\n(?P<skiplines{index}>(?:(?:.*\n)*?))"


class LineWindow:
    """The last `size` lines; text() is what the regexes search."""

    def __init__(self, size):
        self.size = size
        self.lines = []

    def push(self, line):
        self.lines.append(line)
        if len(self.lines) > self.size:
            del self.lines[:-self.size]
        while len(self.lines) > 1 and sum(map(len, self.lines)) > MAX_WINDOW_CHARS:
            del self.lines[0]

    def text(self):
        return "\n".join(self.lines) + "\n"

    def split(self, found):
        """(lines the match covers, lines left in the window) for a match on text()."""
        text = found.string
        start = text.rfind("\n", 0, found.start() + 1) + 1
        end = text.find("\n", max(found.end() - 1, 0))
        end = len(text) if end < 0 else end + 1
        first, last = text.count("\n", 0, start), text.count("\n", 0, end)
        covered = self.lines[first:last]
        left = self.lines[:first]
        position = 0
        for skipped in _skipped_lines(found):
            for offset, line in enumerate(covered[position:]):
                if line == skipped:
                    left.append(covered.pop(position + offset))
                    position += offset
                    break
        left.extend(self.lines[last:])
        return covered, left


def _skipped_lines(found):
    names = sorted((int(name[len(SKIPLINES):]), name) for name in found.re.groupindex
                   if re.fullmatch(r"skiplines\d+", name))
    text = "".join(found.group(name) or "" for _index, name in names)
    return text.splitlines()
