"""What the daemon knows of its list files and of the kernel sets they feed:
each file's lines and entries as last loaded (diffed line by line on a rewrite)
and each list-fed set's sorted intervals. policyd.kernel.listsync drives them.
"""
import bisect
import hashlib

from policyd import pieces
from policyd.policy import listparse, lists
from policyd.errors import InputError


class _Followed:
    """One list file as loaded: its sha256, its raw lines (in order, and as a set),
    each entry's value (version, first address as int, prefix length) by entry
    text, and how many raw lines give an entry text where that is more than one
    (rare: kept apart so 100k entries do not carry a counter each)."""
    # Raw lines are what a rewrite is diffed by: set operations at C speed over
    # 100k lines, and only lines that changed are stripped and parsed. Their list
    # (references to the set's own objects) is what the gone ones are looked for
    # in: stepping through a list is a third of the cost of a set.

    def __init__(self, path, data, netlist=None):
        """`netlist`: the same file as policyd.policy.lists read it (in the daemon, a
        child parsed it), whose entries are taken if it is this version."""
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        parsed = (netlist.v4, netlist.v6) if getattr(netlist, "sha256", None) == self.sha256 else None
        if self._bulk(data, parsed):
            return
        self.raw, self.refs, self.entries = set(), {}, {}
        self.lines = data.split(b"\n")
        strip, parse_text = lists.strip, lists.parse_text
        for number, raw in enumerate(self.lines, 1):
            if raw in self.raw:
                continue  # a repeated line gives its entry once, as a set would
            self.raw.add(raw)
            text = strip(raw) if b"#" in raw or b";" in raw else raw.strip()
            if not text:
                continue
            count = self.count(text)
            if count:
                self.refs[text] = count + 1
            else:
                entry = parse_text(text.decode("ascii", "replace"))
                self.entries[text] = (entry if entry is not None
                                      else lists.parse_entry(text, path, number))

    def _bulk(self, data, parsed=None):
        """The usual list (every entry on a line of its own, no entry twice) read by
        listparse's C-speed passes (or as `parsed`: (v4, v6) entries as they give
        them); False, having set nothing, for anything else."""
        found = parsed if parsed is not None else listparse.bulk(data)
        if found is None:
            return False
        # In pieces (policyd.pieces): passes over 100k lines hold the GIL.
        lines = pieces.split_lines(data)
        cut = lists.strip if b"#" in data or b";" in data else bytes.strip
        entries = {}
        for version, parsed in zip((4, 6), found):
            for chunk in pieces.chunks(parsed):
                entries.update(zip([cut(lines[number - 1]) for _first, _prefixlen, number in chunk],
                                   [(version, first, prefixlen) for first, prefixlen, _n in chunk]))
        if len(entries) != len(found[0]) + len(found[1]):
            return False  # an entry given twice: the line-by-line reading counts them
        self.raw, self.lines, self.refs, self.entries = pieces.to_set(lines), lines, {}, entries
        return True

    def count(self, text):
        """How many raw lines give `text` now."""
        return self.refs.get(text) or (1 if text in self.entries else 0)

    def version(self, version, new=None, gone=None):
        """(first, prefix length) of every entry of `version`; with new and gone
        ({text: value}), as they would leave the file."""
        if new is None:
            return [(f, p) for v, f, p in self.entries.values() if v == version]
        return ([(f, p) for text, (v, f, p) in self.entries.items()
                 if v == version and text not in gone]
                + [(f, p) for v, f, p in new.values() if v == version])

    def diff(self, data):
        """(new entries {text: value}, gone entries {text: value}) if `data` replaced
        the file, and a commit() that makes it so; InputError (file:line) if a new
        line is bad, and then nothing changed."""
        ordered = pieces.split_lines(data)
        lines = pieces.to_set(ordered)
        added, removed = pieces.without(ordered, self.raw), pieces.without(self.lines, lines)
        delta = {}
        for raw in removed:
            text = lists.strip(raw)
            if text:
                delta[text] = delta.get(text, 0) - 1
        for text in map(lists.strip, added):
            if text:
                delta[text] = delta.get(text, 0) + 1
        new, gone = {}, {}
        for text, change in delta.items():
            before = self.count(text)
            if not change:
                continue
            if before == 0 and change > 0:
                try:
                    new[text] = lists.parse_entry(text, self.path)
                except InputError:
                    lists.parse_entry(text, self.path, _line_of(data, text))  # with its line
            elif before > 0 and before + change == 0:
                gone[text] = self.entries[text]

        def commit():
            self.raw, self.lines = lines, ordered
            for text, change in delta.items():
                count = self.count(text) + change
                if count > 1:
                    self.refs[text] = count
                else:
                    self.refs.pop(text, None)
            for text in gone:
                del self.entries[text]
            self.entries.update(new)
            self.sha256 = hashlib.sha256(data).hexdigest()
        return new, gone, commit


def _entry_lines(data):
    for number, raw in enumerate(data.split(b"\n"), 1):
        text = lists.strip(raw)
        if text:
            yield number, text


def _line_of(data, text):
    return next((number for number, entry in _entry_lines(data) if entry == text), None)


# Up to this many intervals out and in, a list change is committed to a set one
# by one; more, by a pass over the whole set.
FEW_CHANGES = 64


class _KernelSet:
    """One committed-slot set fed by lists: what it holds as sorted (first, last)
    intervals (the form the kernel and policyd.kernel.drift want: no second copy), and
    how many entries feed it (more than it holds when entries nest or repeat).
    Membership is by bisection: a set of 100k tuples beside the list would
    double the memory."""

    def __init__(self, name, version, inline, paths):
        self.name, self.version, self.inline, self.paths = name, version, inline, paths
        self.bits = 32 if version == 4 else 128
        self.ordered, self.count = [], 0

    def interval(self, first, prefixlen):
        return first, first + (1 << (self.bits - prefixlen)) - 1

    def __len__(self):
        return len(self.ordered)

    def holds(self, interval):
        i = bisect.bisect_left(self.ordered, interval)
        return i < len(self.ordered) and self.ordered[i] == interval

    def delta(self, new, gone):
        """(remove, add) when no entry nests in or repeats another (the usual list),
        in O(changes x log n); None when it is not that simple."""
        gone = sorted(self.interval(f, p) for v, f, p in gone if v == self.version)
        new = sorted(self.interval(f, p) for v, f, p in new if v == self.version)
        if self.count != len(self.ordered) or not all(self.holds(g) for g in gone):
            return None
        last_end = -1
        for first, last in new:
            if first <= last_end:
                return None
            last_end = last
            i = bisect.bisect_left(self.ordered, (first, -1))
            for other in self.ordered[max(0, i - 1):i + 1]:
                if other[0] <= last and first <= other[1]:
                    return None  # overlaps a kept (or even a leaving) element
        return gone, new

    def commit_delta(self, remove, add):
        """The set as it is once `remove` (intervals it holds) are out and `add` in,
        both sorted. A new list, never changed in place: policyd.kernel.drift reads
        it from its thread."""
        if len(remove) + len(add) <= FEW_CHANGES:
            ordered = list(self.ordered)
            for interval in remove:
                del ordered[bisect.bisect_left(ordered, interval)]
            for interval in add:
                bisect.insort(ordered, interval)
        else:
            # Each delete or insert above moves half the list: 1000 of them in 50k
            # intervals took 15 ms. Kept ones filtered and merged with the new: O(n).
            ordered = pieces.merge(pieces.kept(self.ordered, set(remove)), add)
        self.ordered = ordered
        self.count += len(add) - len(remove)

    def intervals(self):
        """(first, last) of what the set holds; the same object until it changes."""
        return self.ordered

    def wanted(self, files, changed=None):
        """(sorted intervals, entry count) from every source (the slow, general way);
        `changed` = (path, new, gone) computes them as that change would leave them."""
        pairs = []
        for path in self.paths:
            if path not in files:
                continue
            if changed is not None and changed[0] == path:
                pairs.append(files[path].version(self.version, *changed[1:]))
            else:
                pairs.append(files[path].version(self.version))
        disjoint = lists.disjoint_networks(self.version, self.inline,
                                           [_Entries(e) for e in pairs])
        return ([self.interval(f, p) for f, p in disjoint],
                len(self.inline) + sum(len(e) for e in pairs))

    def reset(self, files):
        self.ordered, self.count = self.wanted(files)


class _Entries:
    """The (first, prefix length) pairs of one version, shaped as lists.disjoint_networks
    reads a NetList."""

    def __init__(self, pairs):
        self.pairs = pairs

    def entries(self, _version):
        return [(first, prefixlen, 0) for first, prefixlen in self.pairs]
