"""The daemon's side of list files: follow them, and put a change into the kernel
as one transaction of only the elements that changed.

Owns the entries of every list file as last loaded (by line text, so a rewrite
is diffed line by line and only new lines are parsed) and the committed slot's
interval sets they feed. A bad line keeps what is loaded and says so.
"""
import bisect
import hashlib
import logging
import threading
import time

from policyd import lists, nlbatch
from policyd.compile import COMMITTED
from policyd.errors import InputError
from policyd.logfmt import kv
from policyd.logwatch import LogWatcher

log = logging.getLogger(__name__)


class _Followed:
    """One list file as loaded: its sha256, its raw lines, each entry's value
    (version, first address as int, prefix length) by entry text, and how many
    raw lines give an entry text where that is more than one (rare: kept apart
    so 100k entries do not carry a counter each)."""
    # Raw lines are what a rewrite is diffed by: set operations at C speed over
    # 100k lines, and only lines that changed are stripped and parsed.

    def __init__(self, path, data):
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.raw, self.refs, self.entries = set(), {}, {}
        strip, parse_text = lists.strip, lists.parse_text
        for number, raw in enumerate(data.split(b"\n"), 1):
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
        lines = set(data.split(b"\n"))
        added, removed = lines - self.raw, self.raw - lines
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
            self.raw -= removed
            self.raw |= added
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


class _KernelSet:
    """One committed-slot set fed by lists: what it holds as sorted (first, last)
    intervals (the form the kernel and policyd.drift want: no second copy), and
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
        # A new list, never changed in place: policyd.drift reads it from its thread.
        ordered = list(self.ordered)
        for interval in remove:
            del ordered[bisect.bisect_left(ordered, interval)]
        for interval in add:
            bisect.insort(ordered, interval)
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


class ListSync:
    """Keeps the kernel's list-fed sets equal to the list files, change by change."""

    def __init__(self, nft, policy, wake, reload):
        self.nft = nft
        self.wake = wake
        self.reload = reload  # loads the committed policy whole, then calls follow()
        self.changed = set()
        self.epoch = 0  # policyd.drift: odd while a change is between kernel and here
        self._lock = threading.Lock()
        self.watcher = None
        self.follow(policy)

    def follow(self, policy):
        """Follow the list files of `policy` (the committed one), as loaded now."""
        self.stop()
        self.policy = policy
        self.files = {}
        self.refused = {}  # path -> (sha256 of the refused version, why)
        for service in policy.services:
            for netlist in service.allow_lists + service.deny_lists:
                if netlist.path not in self.files:
                    try:
                        with open(netlist.path, "rb") as handle:
                            self.files[netlist.path] = _Followed(netlist.path, handle.read())
                    except (OSError, InputError) as exc:
                        # Followed all the same: once it is good, the policy loads whole.
                        self._refuse(netlist.path, None, exc)
                        self.files[netlist.path] = _Followed(netlist.path, b"")
                        self.files[netlist.path].sha256 = None
        self.sets = list(self._sets())
        for kernel_set in self.sets:
            kernel_set.reset(self.files)
        if self.files:
            self.watcher = LogWatcher(list(self.files), self._on_change, poll_interval=5.0)
            self.watcher.start()

    def _refuse(self, path, sha256, error):
        self.refused[path] = (sha256, str(error))
        log.error("list refused, keeping what is loaded %s", kv(list=path, error=error))

    def stats(self):
        """[{"path", "entries", "sha256", "error"}] for `policyd status`: what is
        loaded from each list, and why its current version is not (if it is not)."""
        return [{"path": path, "entries": len(followed.entries), "sha256": followed.sha256,
                 "error": self.refused.get(path, (None, None))[1]}
                for path, followed in sorted(self.files.items())]

    def stop(self):
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def _on_change(self, path):
        with self._lock:
            self.changed.add(path)
        self.wake()

    def _sets(self):
        """A _KernelSet for each committed-slot set that lists feed."""
        for service in self.policy.services:
            for kind, inline, netlists in (("v", (service.allow4, service.allow6),
                                            service.allow_lists),
                                           ("deny", (service.deny4, service.deny6),
                                            service.deny_lists)):
                if not netlists or (kind == "v" and service.allow_any):
                    continue
                for version in (4, 6):
                    yield _KernelSet(f"{COMMITTED}_{service.name}_{kind}{version}", version,
                                     inline[version == 6], [n.path for n in netlists])

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
            if self.refused.get(path, (None,))[0] != "unreadable":  # said once, not per poll
                self._refuse(path, "unreadable", exc.strerror or exc)
            return 0
        followed = self.files[path]
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 == followed.sha256:
            self.refused.pop(path, None)  # back to what is loaded
            return 0
        if self.refused.get(path, (None,))[0] == sha256:
            return 0  # a refused version is said once, not at every poll
        if followed.sha256 is None:  # was bad when followed: load whole once it is good
            try:
                lists.parse(data, path)
            except InputError as exc:
                self._refuse(path, sha256, exc)
                return 0
            self.refused.pop(path, None)
            self.reload()
            return 1
        try:
            new, gone, commit = followed.diff(data)
        except InputError as exc:
            self._refuse(path, sha256, exc)
            return 0
        self.refused.pop(path, None)
        try:
            added, removed = self._apply(path, new, gone, commit)
        except (OSError, nlbatch.Unsupported) as exc:
            # The kernel held something else (edited by hand, or a change that
            # moves nft's interval sentinel): load the whole policy, atomically.
            log.warning("list change needs a full load %s", kv(list=path, reason=exc))
            self.reload()
            return 1
        log.info("list applied %s", kv(list=path, added=added, removed=removed,
                                       ms=round((time.perf_counter() - started) * 1000, 1)))
        return 1

    def _apply(self, path, new, gone, commit):
        """One transaction: the removed intervals out and the new ones in, per set;
        commit() records the file as changed once the kernel took it."""
        encoder = nlbatch.Encoder()
        changed = (path, new, gone)
        changes = []
        for kernel_set in self.sets:
            if path not in kernel_set.paths:
                continue
            change = kernel_set.delta(new.values(), gone.values())
            simple = change is not None
            if not simple:  # nesting or repeats involved: recompute the set whole
                wanted = set(kernel_set.wanted(self.files, changed)[0])
                have = set(kernel_set.ordered)
                change = (sorted(have - wanted), sorted(wanted - have))
            remove, add = change
            if not remove and not add:
                continue
            # nft's leading end element at 0 exists only while no interval starts
            # at 0, and an empty set is not in the ruleset at all: such a change
            # reloads the policy whole.
            if (any(f == 0 for f, _ in remove) or any(f == 0 for f, _ in add)
                    or len(kernel_set) + len(add) - len(remove) == 0):
                raise nlbatch.Unsupported(f"set {kernel_set.name} becomes empty, or an interval "
                                          "at address 0 comes or goes")
            for kind, intervals in ((nlbatch.DELSETELEM, remove), (nlbatch.NEWSETELEM, add)):
                elements = nlbatch.interval_elements(intervals, kernel_set.bits // 8, lead=False)
                encoder._chunked(kind, self.policy.table, kernel_set.name, elements,
                                 nlbatch.NLM_F_CREATE if kind == nlbatch.NEWSETELEM else 0)
            changes.append((kernel_set, remove, add, simple))
        self.epoch += 1  # odd while the kernel and what we know of it may differ
        try:
            if encoder.messages:
                self.nft.netlink.send_batch(encoder.messages)
            commit()
            self._commit_sets(changes)
        finally:
            self.epoch += 1
        return (sum(len(add) for _, _, add, _ in changes),
                sum(len(remove) for _, remove, _, _ in changes))

    def _commit_sets(self, changes):
        for kernel_set, remove, add, simple in changes:
            if simple:
                kernel_set.commit_delta(remove, add)
            else:
                kernel_set.reset(self.files)


class _Entries:
    """The (first, prefix length) pairs of one version, shaped as lists.disjoint_networks
    reads a NetList."""

    def __init__(self, pairs):
        self.pairs = pairs

    def entries(self, _version):
        return [(first, prefixlen, 0) for first, prefixlen in self.pairs]
