"""Bulk work on 100k items in pieces, so a ban never waits behind it.

Owns the rule for the daemon's worker: one C-level pass (set(), sorted(), a
map over a list, bytes.split) holds the GIL from its start to its end, and a
pass over 100k items is 10-40 ms in which the main loop cannot run. Passes
over at most PIECE items (or PIECE_BYTES of text) keep each hold well under
2 ms; between two of them the interpreter hands the GIL to a waiting thread.
"""
import bisect
from itertools import filterfalse, islice

PIECE = 2048
PIECE_BYTES = 32768


def line_pieces(data, size=None):
    """`data` (bytes or str) cut at newlines into pieces of about `size`: joined
    with newlines they are `data`, and their split lines are data's split lines."""
    size = size or PIECE_BYTES
    newline = b"\n" if isinstance(data, bytes) else "\n"
    at = 0
    while True:
        cut = data.find(newline, at + size) if at + size < len(data) else -1
        if cut < 0:
            yield data[at:]
            return
        yield data[at:cut]
        at = cut + 1


def split_lines(data):
    """data.split(newline), in pieces."""
    out = []
    for piece in line_pieces(data):
        out.extend(piece.split(b"\n" if isinstance(data, bytes) else "\n"))
    return out


def chunks(items, size=None):
    """Slices of a sequence, `size` (PIECE) items each."""
    size = size or PIECE
    for at in range(0, len(items), size):
        yield items[at:at + size]


def to_set(items):
    """set(items) of a sequence, in pieces."""
    out = set()
    for chunk in chunks(items):
        out.update(chunk)
    return out


def without(items, other):
    """The items of a list or a set that are not in `other` (a set or dict), as a set."""
    out = set()
    if isinstance(items, (list, tuple)):
        for chunk in chunks(items):
            out.update(filterfalse(other.__contains__, chunk))
        return out
    source = iter(items)
    while True:
        chunk = list(islice(source, PIECE))
        if not chunk:
            return out
        out.update(filterfalse(other.__contains__, chunk))


def kept(items, drop):
    """The items of a sequence that are not in `drop` (a set), in their order."""
    out = []
    for chunk in chunks(items):
        out.extend(filterfalse(drop.__contains__, chunk))
    return out


def equal(a, b):
    """a == b for two sequences, compared piece by piece."""
    return len(a) == len(b) and all(x == y for x, y in zip(chunks(a), chunks(b)))


def sort(items):
    """sorted(items) of a sequence: each piece sorted, runs already in order
    joined (lists mostly come sorted), the rest merged pairwise a block at a time."""
    runs = []
    for chunk in chunks(items):
        run = sorted(chunk)
        if runs and runs[-1][-1] <= run[0]:
            runs[-1].extend(run)
        else:
            runs.append(run)
    while len(runs) > 1:
        runs = [merge(runs[i], runs[i + 1]) if i + 1 < len(runs) else runs[i]
                for i in range(0, len(runs), 2)]
    return runs[0] if runs else []


def merge(a, b):
    """Two sorted lists as one (a's items first among equals): whole blocks of one
    that come before the other's next item are found by bisection and copied."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if b[j] < a[i]:
            k = bisect.bisect_left(b, a[i], j, min(len(b), j + PIECE))
            out.extend(b[j:k])
            j = k
        else:
            k = bisect.bisect_right(a, b[j], i, min(len(a), i + PIECE))
            out.extend(a[i:k])
            i = k
    for rest, at in ((a, i), (b, j)):
        for chunk in chunks(rest[at:] if at else rest):
            out.extend(chunk)
    return out
