"""The daemon's side of list files: follow them, and put a change into the kernel
as one transaction of only the elements that changed.

Owns the entries of every list file as last loaded (by line text, so a rewrite
is diffed line by line and only new lines are parsed) and the committed slot's
interval sets they feed. A bad line keeps what is loaded and says so.
"""
import hashlib
import bisect
import logging
import re
import threading
import time

from policyd import lists, nlbatch
from policyd.compile import COMMITTED
from policyd.errors import InputError
from policyd.systemd import kv
from policyd.tail import LogWatcher

log = logging.getLogger("policyd.lists")


class _Followed:
    """One list file: its sha256 and entries by line text -> (version, first, prefix length)."""

    def __init__(self, path, data):
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.entries = {}
        for number, text in _entry_lines(data):
            if text not in self.entries:
                self.entries[text] = lists.parse_entry(text, path, number)

    def version(self, version):
        return [(first, prefixlen) for v, first, prefixlen in self.entries.values() if v == version]


def _entry_lines(data):
    for number, raw in enumerate(data.split(b"\n"), 1):
        text = lists.strip(raw)
        if text:
            yield number, text


_COMMENT = re.compile(rb"[#;][^\n]*")


def _entry_texts(data):
    """The set of entry texts in a list file, at C speed (comments cut in one pass)."""
    texts = {line.strip() for line in _COMMENT.sub(b"", data).split(b"\n")}
    texts.discard(b"")
    return texts


def _line_of(data, text):
    return next((number for number, entry in _entry_lines(data) if entry == text), None)


class ListSync:
    """Keeps the kernel's list-fed sets equal to the list files, change by change."""

    def __init__(self, nft, policy, wake, reload):
        self.nft = nft
        self.wake = wake
        self.reload = reload  # loads the committed policy whole, then calls follow()
        self.changed = set()
        self._lock = threading.Lock()
        self.watcher = None
        self.follow(policy)

    def follow(self, policy):
        """Follow the list files of `policy` (the committed one), as loaded now."""
        self.stop()
        self.policy = policy
        self.files = {}
        self.elements = {}  # kernel set name -> set of (first, prefix length) it holds
        for service in policy.services:
            for netlist in service.allow_lists + service.deny_lists:
                if netlist.path not in self.files:
                    try:
                        with open(netlist.path, "rb") as handle:
                            self.files[netlist.path] = _Followed(netlist.path, handle.read())
                    except (OSError, InputError) as exc:
                        log.error("list unreadable %s", kv(list=netlist.path, error=exc))
        self.sorted, self.counts = {}, {}
        for name, _service, version, inline, paths in self._sets():
            self.elements[name] = self._wanted(version, inline, paths)
            self.sorted[name] = sorted(self.elements[name])
            self.counts[name] = len(inline) + sum(
                len(self.files[p].version(version)) for p in paths if p in self.files)
        if self.files:
            self.watcher = LogWatcher(list(self.files), self._on_change, poll_interval=5.0)
            self.watcher.start()

    def stop(self):
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def _on_change(self, path):
        with self._lock:
            self.changed.add(path)
        self.wake()

    def _sets(self):
        """(kernel set name, service, version, inline networks, list paths) fed by lists."""
        for service in self.policy.services:
            for kind, inline, netlists in (("v", (service.allow4, service.allow6),
                                            service.allow_lists),
                                           ("deny", (service.deny4, service.deny6),
                                            service.deny_lists)):
                if not netlists or (kind == "v" and service.allow_any):
                    continue
                for version in (4, 6):
                    yield (f"{COMMITTED}_{service.name}_{kind}{version}", service, version,
                           inline[version == 6], [n.path for n in netlists])

    def _wanted(self, version, inline, paths):
        netlist_entries = []
        for path in paths:
            if path in self.files:
                netlist_entries.append(self.files[path].version(version))
        return set(lists.disjoint_networks(version, inline, [_Entries(e) for e in netlist_entries]))

    def sync(self):
        """Apply the list files that changed since the last call; returns how many did."""
        with self._lock:
            changed, self.changed = self.changed, set()
        applied = 0
        for path in sorted(changed & self.files.keys()):
            applied += self._sync_one(path)
        return applied

    def _sync_one(self, path):
        started = time.perf_counter()
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            log.error("list unreadable, keeping what is loaded %s", kv(list=path, error=exc))
            return 0
        followed = self.files[path]
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 == followed.sha256:
            return 0
        texts = _entry_texts(data)
        entries = dict(followed.entries)
        gone = {text: entries.pop(text) for text in followed.entries.keys() - texts}
        new = {}
        try:
            for text in texts - followed.entries.keys():
                try:
                    new[text] = lists.parse_entry(text, path)
                except InputError:
                    lists.parse_entry(text, path, _line_of(data, text))  # again, with its line
        except InputError as exc:
            log.error("list refused, keeping what is loaded %s", kv(list=path, error=exc))
            return 0
        entries.update(new)
        previous = (followed.sha256, followed.entries)
        followed.sha256, followed.entries = sha256, entries
        try:
            added, removed = self._apply(path, new.values(), gone.values())
        except (OSError, nlbatch.Unsupported) as exc:
            # The kernel held something else (edited by hand, or a change that
            # moves nft's interval sentinel): load the whole policy, atomically.
            followed.sha256, followed.entries = previous
            log.warning("list change needs a full load %s", kv(list=path, reason=exc))
            self.reload()
            return 1
        log.info("list applied %s", kv(list=path, added=added, removed=removed,
                                       ms=round((time.perf_counter() - started) * 1000, 1)))
        return 1

    def _apply(self, path, new, gone):
        """One transaction: the removed intervals out and the new ones in, per set."""
        encoder = nlbatch.Encoder()
        wanted_by_set, added, removed = {}, 0, 0
        for name, _service, version, inline, paths in self._sets():
            if path not in paths:
                continue
            have = self.elements[name]
            wanted, ordered = self._delta(name, version, new, gone)
            if wanted is None:  # nesting or duplicates involved: recompute the set whole
                wanted = self._wanted(version, inline, paths)
                ordered = sorted(wanted)
            # nft's leading end element at 0 exists only while no interval starts
            # at 0; a change there (or to or from empty) reloads the set whole.
            if not have or not ordered or (self.sorted[name][0][0] == 0) != (ordered[0][0] == 0):
                raise nlbatch.Unsupported("the set's first interval moves to or from 0")
            bits = 32 if version == 4 else 128
            for kind, networks in ((nlbatch.DELSETELEM, have - wanted),
                                   (nlbatch.NEWSETELEM, wanted - have)):
                intervals = sorted((f, f + (1 << (bits - p)) - 1) for f, p in networks)
                elements = nlbatch.interval_elements(intervals, bits // 8, lead=False)
                encoder._chunked(kind, self.policy.table, name, elements,
                                 nlbatch.NLM_F_CREATE if kind == nlbatch.NEWSETELEM else 0)
            added += len(wanted - have)
            removed += len(have - wanted)
            wanted_by_set[name] = wanted, ordered
        self.nft.netlink.send_batch(encoder.messages)
        for name, (wanted, ordered) in wanted_by_set.items():
            self.elements[name], self.sorted[name] = wanted, ordered
        return added, removed

    def _delta(self, name, version, new, gone):
        """The set after the change when no entry nests in or repeats another (the
        usual list); None when it is not that simple. Costs O(changes x log n)."""
        have, ordered = self.elements[name], self.sorted[name]
        bits = 32 if version == 4 else 128
        gone = {(f, p) for v, f, p in gone if v == version}
        new = sorted((f, p) for v, f, p in new if v == version)
        if self.counts[name] != len(have) or not gone <= have:
            return None, None
        last_end = -1
        for first, prefixlen in new:
            end = first + (1 << (bits - prefixlen)) - 1
            if first <= last_end:
                return None, None
            last_end = end
            i = bisect.bisect_left(ordered, (first, -1))
            for neighbour in ordered[max(0, i - 1):i + 1]:
                n_end = neighbour[0] + (1 << (bits - neighbour[1])) - 1
                if neighbour[0] <= end and first <= n_end:
                    return None, None  # overlaps a kept (or even a leaving) element
        self.counts[name] += len(new) - len(gone)
        ordered = list(ordered)
        for element in gone:
            del ordered[bisect.bisect_left(ordered, element)]
        for element in new:
            bisect.insort(ordered, element)
        return (have - gone) | set(new), ordered


class _Entries:
    """The (first, prefix length) pairs of one version, shaped as lists.disjoint_networks
    reads a NetList."""

    def __init__(self, pairs):
        self.pairs = pairs

    def entries(self, _version):
        return [(first, prefixlen, 0) for first, prefixlen in self.pairs]
