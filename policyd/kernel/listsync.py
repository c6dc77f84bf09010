"""The daemon's side of list files: follow them, and put a change into the kernel
as one transaction of only the elements that changed.

Owns the entries of every list file as last loaded (by line text, so a rewrite
is diffed line by line and only new lines are parsed) and the committed slot's
interval sets they feed. A bad line keeps what is loaded and says so.
"""
import hashlib
import logging
import threading
import time

from policyd.kernel import nlbatch
from policyd.policy import lists
from policyd.policy.listmodel import _Followed, _KernelSet
from policyd.rules.compile import COMMITTED
from policyd.errors import InputError
from policyd.logfmt import kv
from policyd.logs.logwatch import LogWatcher

log = logging.getLogger(__name__)


class ListSync:
    """Keeps the kernel's list-fed sets equal to the list files, change by change."""

    def __init__(self, nft, policy, wake, reload, submit=None):
        self.nft = nft
        self.wake = wake
        self.reload = reload  # loads the committed policy whole, then calls follow()
        # submit(kind, job, done) runs job(nft) on the daemon's worker (policy.chores)
        # and done(result, error) back on the main loop; without it, sync() works here.
        self.submit = submit
        self.changed = set()
        self.epoch = 0  # policyd.kernel.drift: odd while a change is between kernel and here
        self._lock = threading.Lock()
        self.watcher = None
        self._prepared = self._taken = 0  # prepare() results made, and the last taken
        self.follow(policy)

    def follow(self, policy, prepared=None):
        """Follow the list files of `policy` (the committed one), as `prepared` read
        them (prepare() and take(), on the worker), else as read now."""
        if prepared is None:
            prepared = self.prepare(policy)
        if prepared[4] > self._taken:
            self.take(prepared)
        if self.watcher is not None and sorted(self.watcher.paths) == sorted(self.files):
            return  # the same files: the watcher goes on (stopping one costs 10-100 ms)
        self.stop()
        if self.files:
            self.watcher = LogWatcher(list(self.files), self._on_change, poll_interval=5.0)
            self.watcher.start()

    def take(self, prepared):
        """What list changes are diffed against from now on: prepare()'s result, taken
        on the worker right after the kernel got what it read (so the next change
        is diffed against what the kernel has, not what it had)."""
        self.policy, self.files, self.refused, self.sets, self._taken = prepared

    def prepare(self, policy):
        """(policy, files, refused, sets, sequence number): every list file of
        `policy` read and parsed, touching nothing else of ours (the daemon's
        worker runs it). A file as it was last loaded here, and sets fed the same
        way by such files, are taken over as they are, not parsed again."""
        files, refused = {}, {}
        current = getattr(self, "files", {})
        for service in policy.services:
            for netlist in service.allow_lists + service.deny_lists:
                if netlist.path not in files:
                    try:
                        files[netlist.path] = self._read(netlist.path, current.get(netlist.path),
                                                         netlist)
                    except (OSError, InputError) as exc:
                        # Followed all the same: once it is good, the policy loads whole.
                        refused[netlist.path] = (None, str(exc))
                        log.error("list refused, keeping what is loaded %s",
                                  kv(list=netlist.path, error=exc))
                        files[netlist.path] = _Followed(netlist.path, b"")
                        files[netlist.path].sha256 = None
        kept = {_shape(kernel_set): kernel_set for kernel_set in getattr(self, "sets", ())
                if all(files.get(path) is current.get(path) for path in kernel_set.paths)}
        sets = []
        for kernel_set in self._sets(policy):
            if _shape(kernel_set) in kept:
                sets.append(kept[_shape(kernel_set)])
            else:
                kernel_set.reset(files)
                sets.append(kernel_set)
        self._prepared += 1
        return policy, files, refused, sets, self._prepared

    @staticmethod
    def _read(path, loaded, netlist=None):
        """The _Followed of the file at `path`: `loaded` if the file is as it was, else
        read anew (with the entries of `netlist`, the policy's, if it is this version)."""
        with open(path, "rb") as handle:
            data = handle.read()
        if loaded is not None and loaded.sha256 == hashlib.sha256(data).hexdigest():
            return loaded
        return _Followed(path, data, netlist)

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

    @staticmethod
    def _sets(policy):
        """A _KernelSet for each committed-slot set that lists feed."""
        for service in policy.services:
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
        """Apply the list files that changed since the last call: on the worker if
        there is one (reading, diffing and parsing 100k lines stays off the main
        loop), else here; returns how many were applied here (0 when handed on)."""
        with self._lock:
            changed, self.changed = self.changed, set()
        if self.submit is not None:
            # One sync at a time: while one runs, what changed meanwhile waits.
            if not self.submit("lists", lambda nft: self._sync_paths(changed, nft),
                               self._synced):
                with self._lock:
                    self.changed |= changed
            return 0
        applied, reload = self._sync_paths(changed, self.nft)
        if reload:
            self.reload()
        return applied

    def _synced(self, result, error):
        """On the main loop: the worker's sync is done."""
        if error is not None:
            log.error("list sync failed %s", kv(error=error))
            return
        if result[1]:
            self.reload()

    def _sync_paths(self, changed, nft):
        """(how many applied, whether the policy must be loaded whole)."""
        applied = reload = 0
        for path in sorted(changed & self.files.keys()):
            done, whole = self._sync_one(path, nft)
            applied += done
            reload = reload or whole
        return applied, reload

    def _sync_one(self, path, nft):
        started = time.perf_counter()
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            if self.refused.get(path, (None,))[0] != "unreadable":  # said once, not per poll
                self._refuse(path, "unreadable", exc.strerror or exc)
            return 0, False
        followed = self.files[path]
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 == followed.sha256:
            self.refused.pop(path, None)  # back to what is loaded
            return 0, False
        if self.refused.get(path, (None,))[0] == sha256:
            return 0, False  # a refused version is said once, not at every poll
        if followed.sha256 is None:  # was bad when followed: load whole once it is good
            try:
                lists.parse(data, path)
            except InputError as exc:
                self._refuse(path, sha256, exc)
                return 0, False
            self.refused.pop(path, None)
            return 1, True
        try:
            new, gone, commit = followed.diff(data)
        except InputError as exc:
            self._refuse(path, sha256, exc)
            return 0, False
        self.refused.pop(path, None)
        try:
            added, removed = self._apply(path, new, gone, commit, nft)
        except (OSError, nlbatch.Unsupported) as exc:
            # The kernel held something else (edited by hand, or a change that
            # moves nft's interval sentinel): load the whole policy, atomically.
            log.warning("list change needs a full load %s", kv(list=path, reason=exc))
            return 1, True
        log.info("list applied %s", kv(list=path, added=added, removed=removed,
                                       ms=round((time.perf_counter() - started) * 1000, 1)))
        return 1, False

    def _apply(self, path, new, gone, commit, nft):
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
                nft.netlink.send_batch(encoder.messages)
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


def _shape(kernel_set):
    """What a list-fed set is made of: equal shapes hold the same elements."""
    inline = tuple(tuple(getattr(networks, "pairs", networks)) for networks in (kernel_set.inline,))
    return kernel_set.name, kernel_set.version, inline, tuple(kernel_set.paths)
