"""`policyd bans` printed: one line per ban, or the JSON list README documents,
from the columns of policyd.operator.banlist or from rows (a kernel listing).

The output is exactly what formatting each ban as a dict gave (tests compare
them); it is built by C-level maps over whole columns, 100k bans in one write.
"""
import json

from policyd.operator.banlist import seconds_left

# "%.1f" of a float spells it as repr(round(x, 1)) did (both round the exact
# binary value half-even to one decimal; a test holds them together), once.
_TEXT_LINE = "%s\t%.1fs left\t%s\n"
_TEXT_TAIL = _TEXT_LINE[2:]
_ROW_LINE = "%s\t%ss left\t%s\n"
# json.dumps(rows, indent=2, sort_keys=True) of one ban; the cause's fields
# (failures, filter before network; reason after) come pre-rendered.
_JSON_ROW = ('  {\n    "banned_at": %s,\n    "expires_at": %s,\n%s    "network": %s,\n'
             '%s    "seconds_left": %.1f\n  }')


def details(failures, name, reason):
    """The third column of a text line: failures=N filter=NAME reason=WHY, as known."""
    return " ".join(part for part in (
        None if failures is None else f"failures={failures}",
        None if name is None else f"filter={name}",
        None if reason is None else f"reason={reason}") if part)


def columns_text(columns, order=None):
    """Every ban of `columns` as a text line, soonest expiry first.

    One '%' format over the whole list: the networks, joined, become the format
    (each line's end replaced by the rest of its line, its details too when all
    bans have one cause) and seconds left (and details) its arguments; a format
    call per line costs twice as much."""
    order = columns.soonest_first() if order is None else order
    if not len(order):
        return ""
    words = [details(*cause) for cause in columns.causes]
    networks = (columns.lines if _whole(order, columns.expires_at)
                else "\n".join(map(columns.network.__getitem__, order)))
    if networks.count("\n") != len(order) - 1:  # a network with a newline in it
        return _per_line(columns, order, words)
    networks = networks.replace("%", "%%") + "\n"
    if len(words) == 1:
        tail = _TEXT_TAIL.replace("%s", words[0].replace("%", "%%"))
        return networks.replace("\n", tail) % tuple(seconds_left(columns, order))
    arguments = [None] * (2 * len(order))
    arguments[0::2] = seconds_left(columns, order)
    arguments[1::2] = map(words.__getitem__, map(columns.cause.__getitem__, order))
    return networks.replace("\n", _TEXT_TAIL) % tuple(arguments)


def _whole(order, column):
    return isinstance(order, range) and order == range(len(column))


def _per_line(columns, order, words):
    return "".join(map(_TEXT_LINE.__mod__, zip(
        map(columns.network.__getitem__, order),
        seconds_left(columns, order),
        map(words.__getitem__, map(columns.cause.__getitem__, order)))))


def columns_json(columns, order=None):
    """json.dumps(rows, indent=2, sort_keys=True) of the bans as objects (README's
    keys), each value encoded by json itself, a whole column per call."""
    order = columns.soonest_first() if order is None else order
    return "[\n" + _json_rows(columns, order) + "\n]" if order else "[]"


def _json_rows(columns, order):
    heads = [f'    "failures": {json.dumps(failures)},\n    "filter": {json.dumps(name)},\n'
             for failures, name, _reason in columns.causes]
    tails = [f'    "reason": {json.dumps(reason)},\n' for _f, _n, reason in columns.causes]
    causes = list(map(columns.cause.__getitem__, order))
    return ",\n".join(map(_JSON_ROW.__mod__, zip(
        _encoded(map(columns.banned_at.__getitem__, order)),
        _encoded(map(columns.expires_at.__getitem__, order)),
        map(heads.__getitem__, causes),
        _encoded(map(columns.network.__getitem__, order)),
        map(tails.__getitem__, causes),
        seconds_left(columns, order))))


def write_parts(parts, as_json, write):
    """Print streamed columns (each already soonest first) as they come: the
    same text, or the same JSON list, as printing them all at once."""
    first = True
    for columns in parts:
        order = range(len(columns))
        if not order:
            continue
        if as_json:
            write(("[\n" if first else ",\n") + _json_rows(columns, order))
        else:
            write(columns_text(columns, order))
        first = False
    if as_json:
        write("[]\n" if first else "\n]\n")


def write_columns(columns, as_json, write, pieces=8):
    """Print columns (the state file's) as `text` or `as_json` would, written in
    pieces when they are recorded soonest first (the usual): a reader, such as
    a pipe, takes one while the next is made."""
    order = columns.soonest_first()
    if not isinstance(order, range) or len(order) < 2 * pieces:
        write(columns_json(columns, order) + "\n" if as_json else columns_text(columns, order))
        return
    write_parts(columns.pieces(pieces), as_json, write)


def _encoded(values):
    """json's encoding of each value: one json.dumps of the whole column, split where
    it put a newline between items (json escapes every newline inside a string)."""
    text = json.dumps(list(values), separators=("\n", ":"))
    return text[1:-1].split("\n") if text != "[]" else []


def rows_text(rows):
    """Text lines of ban objects (a kernel listing: only network and seconds left)."""
    return "".join(map(_ROW_LINE.__mod__, zip(
        (row["network"] for row in rows), (row["seconds_left"] for row in rows),
        (details(row.get("failures"), row.get("filter"), row.get("reason")) for row in rows))))


def rows_json(rows):
    return json.dumps(rows, indent=2, sort_keys=True)


def text(result):
    """Lines for a `bans` answer: columns (policyd.operator.banlist.BanColumns) or rows."""
    return rows_text(result) if isinstance(result, list) else columns_text(result)


def as_json(result):
    return rows_json(result) if isinstance(result, list) else columns_json(result)
