"""Parsing the text of list files: one address or network a line, `#` and `;`
comments. Owns the strict rules (a bad line refuses the list with file:line)
and a bulk path that parses 100k plain lines with C-level passes, falling back
to the line-by-line parser (which names the bad line) on anything unusual.
"""
import gc
import socket
from itertools import chain, compress, count, repeat
from operator import and_, gt, itemgetter, not_

from policyd import pieces
from policyd.errors import InputError

_FAMILY = {4: (socket.AF_INET, 32), 6: (socket.AF_INET6, 128)}
# Host-bit masks by prefix length, per family: `first & mask` is 0 for a network.
_HOST_MASK = {bits: [(1 << (bits - prefixlen)) - 1 for prefixlen in range(bits + 1)]
              for bits in (32, 128)}
# IPv4-mapped IPv6 (::ffff:0:0/96) lies below this: only then look closer.
_BELOW_MAPPED_END = 0x10000 << 32


def strip(raw):
    """The entry on one line with comments and blanks removed (b"" if none)."""
    for mark in (b"#", b";"):
        cut = raw.find(mark)
        if cut >= 0:
            raw = raw[:cut]
    return raw.strip()


def parse_lines(data, path):
    """(v4, v6): tuples of (first address as int, prefix length, line number) in
    file order; InputError names the first bad line."""
    found = bulk(data)
    return found if found is not None else _one_by_one(data, path)


def bulk(data):
    """parse_lines' answer from the C-speed passes alone, or None (see _bulk)."""
    # 100k entries are 300k young tuples and no cycle: the collector walking
    # them again and again would double the time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        # A piece at a time (policyd.pieces): a pass over 100k lines would hold
        # the GIL, and the daemon's bans, for tens of ms.
        v4, v6, start = [], [], 1
        for piece in pieces.line_pieces(data):
            found = _bulk(piece, start)
            if found is None:
                return None
            v4.extend(found[0])
            v6.extend(found[1])
            start += piece.count(b"\n") + 1
        return tuple(v4), tuple(v6)
    finally:
        if enabled:
            gc.enable()


def texts(values):
    """{(version, first, prefix length): None} of texts that are each exactly a
    plain address or network (a policy's inline allowlist), all distinct, each
    family in order, by the bulk pass; None when any is not, or one repeats: the
    caller then reads them one by one and says which is wrong."""
    joined = "\n".join(values)
    if any(mark in joined for mark in "#; \t\r\x0b\x0c") or joined.count("\n") != len(values) - 1:
        return None  # the bulk pass would cut or strip what the caller refuses
    try:
        found = bulk(joined.encode("ascii"))
    except UnicodeEncodeError:
        return None
    if found is None or sum(map(len, found)) != len(values):
        return None  # an empty text, or one the bulk pass does not take
    first, prefixlen = itemgetter(0), itemgetter(1)
    out = dict.fromkeys(chain.from_iterable(
        zip(repeat(version), map(first, entries), map(prefixlen, entries))
        for version, entries in zip((4, 6), found)))
    return out if len(out) == len(values) else None


def _one_by_one(data, path):
    v4, v6 = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = strip(raw) if b"#" in raw or b";" in raw else raw.strip()
        if not raw:
            continue
        # parse_text takes the common shapes fast; parse_entry settles the rest
        # and says what is wrong.
        entry = parse_text(raw.decode("ascii", "replace")) or parse_entry(raw, path, number)
        (v4 if entry[0] == 4 else v6).append((entry[1], entry[2], number))
    return tuple(v4), tuple(v6)


def _bulk(data, start=1):
    """parse_lines' answer for a file of plain lines (the first numbered `start`),
    each pass over all lines at C speed (map, compress, zip); None when anything
    is unusual (a bad line, a mapped IPv6 address, a bare `/`): then the
    line-by-line parser decides."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    if any(mark in text for mark in "\x1c\x1d\x1e\x1f"):
        return None  # str.strip() takes these, bytes.strip() does not
    if "#" in text or ";" in text:
        text = _cut_comments(text)
    lines = text.split("\n")
    if any(space in text for space in " \t\r\x0b\x0c"):  # what else str.strip() takes
        lines = list(map(str.strip, lines))
    entries, numbers = _present(lines, start)
    six = list(map(str.__contains__, entries, repeat(":")))
    out = []
    for version, keep in ((4, list(map(not_, six))), (6, six)):
        family, bits = _FAMILY[version]
        texts, lines_of = list(compress(entries, keep)), list(compress(numbers, keep))
        if not texts:
            out.append(())
            continue
        addresses, slashes, lengths = _split_lengths(texts)
        try:
            firsts = list(map(int.from_bytes, map(socket.inet_pton, repeat(family), addresses),
                              repeat("big")))
        except OSError:
            return None
        given = [length for length in lengths if length]
        if (len(given) != sum(map(len, slashes)) or not all(map(str.isdigit, given))
                or max(map(len, given), default=0) > 3):
            return None
        prefixes = (list(map(int, lengths)) if len(given) == len(texts)
                    else [int(length) if length else bits for length in lengths])
        if max(prefixes) > bits or any(map(and_, firsts, map(_HOST_MASK[bits].__getitem__,
                                                             prefixes))):
            return None
        if version == 6 and any(map(gt, repeat(_BELOW_MAPPED_END), firsts)) and any(
                first >> 32 == 0xFFFF for first in firsts):
            return None  # IPv4-mapped: parse_entry decides
        out.append(tuple(zip(firsts, prefixes, lines_of)))
    return out[0], out[1]


def _present(lines, start=1):
    """(the lines that are not empty, their numbers from `start`). Lists have few
    empty lines (a comment header, the end): then they are picked out, not filtered."""
    empty = lines.count("")
    if empty > 8:
        present = list(map(bool, lines))
        return list(compress(lines, present)), list(compress(count(start), present))
    found, at = [], -1
    for _ in range(empty):
        at = lines.index("", at + 1)
        found.append(at)
    entries, numbers = list(lines), list(range(start, start + len(lines)))
    for at in reversed(found):  # from the end, so the earlier indexes hold
        del entries[at], numbers[at]
    return entries, numbers


def _cut_comments(text):
    """`text` without what strip() cuts from each line: from a line's first `#` or
    `;` to its end. A jump per comment, not a pass per line: lists carry a few."""
    parts, at = [], 0
    marks = {mark: text.find(mark) for mark in "#;"}
    while True:
        for mark, where in marks.items():
            if 0 <= where < at:
                marks[mark] = text.find(mark, at)
        found = [where for where in marks.values() if where >= 0]
        if not found:
            parts.append(text[at:])
            return "".join(parts)
        cut = min(found)
        parts.append(text[at:cut])
        at = text.find("\n", cut)
        if at < 0:
            return "".join(parts)


def _split_lengths(texts):
    """(addresses, slashes, lengths) of `address/length` texts: one split of the
    joined texts when every text has exactly one slash (the usual list)."""
    joined = "\n".join(texts)
    if joined.count("/") == len(texts) and all(map(str.__contains__, texts, repeat("/"))):
        parts = joined.replace("/", "\n").split("\n")
        return parts[0::2], repeat("/", len(texts)), parts[1::2]
    return zip(*map(str.partition, texts, repeat("/")))


def parse_text(text):
    """(version, first address as int, prefix length) of a plain address or CIDR
    network text, or None for anything else (the caller then says why)."""
    address, _, length = text.partition("/")
    try:
        if ":" in address:
            first, bits = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big"), 128
        else:
            first, bits = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big"), 32
    except OSError:
        return None
    if length and not (length.isdigit() and len(length) <= 3):
        return None
    prefixlen = int(length) if length else bits
    if prefixlen > bits or first & ((1 << (bits - prefixlen)) - 1):
        return None
    if bits == 128 and first >> 32 == 0xFFFF:
        return None  # IPv4-mapped: parse_network decides
    return (4 if bits == 32 else 6), first, prefixlen


def parse_entry(text, path="<list>", line=None):
    """b"192.0.2.0/24" -> (4, first address as int, 24); strict: host bits are an error."""
    try:
        address, slash, length = text.decode("ascii").partition("/")
    except UnicodeDecodeError:
        raise InputError("not an address or network (non-ASCII)", path, line) from None
    version = 6 if ":" in address else 4
    family, bits = _FAMILY[version]
    try:
        first = int.from_bytes(socket.inet_pton(family, address), "big")
    except OSError:
        raise InputError(f"{text.decode('ascii')!r} is not an address or network",
                         path, line) from None
    prefixlen = bits
    if slash:
        if not length.isdigit() or len(length) > 3 or int(length) > bits:
            raise InputError(f"{text.decode('ascii')!r} has a bad prefix length", path, line)
        prefixlen = int(length)
    if first & ((1 << (bits - prefixlen)) - 1):
        raise InputError(f"{text.decode('ascii')!r} has host bits set", path, line)
    if version == 6 and first >> 32 == 0xFFFF:  # as addr.parse_network reads it
        if prefixlen != 128:
            raise InputError(f"{text.decode('ascii')!r} is an IPv4-mapped network; "
                             "write it as IPv4", path, line)
        return 4, first & 0xFFFFFFFF, 32
    return version, first, prefixlen
