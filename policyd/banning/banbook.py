"""The ban book (fail2ban's BanManager): bans in force by network key, their expiry
order, and escalation by each network's ban history. Tells the state queue and
the kernel queue (policyd.banning.banqueue) of every ban it starts or ends.
"""
import heapq
import itertools
import logging
from collections import Counter

from policyd.banning.bankeys import MASKS, blob, key_from_blob, network
from policyd.errors import PolicydError

log = logging.getLogger(__name__)

# 2**62 * any bantime is far past any cap; stops absurd integers for
# networks with a very long history.
MAX_DOUBLINGS = 62
# Stamps of the books' contents, unique in the process (see BanBook.stamp).
_STAMPS = itertools.count(1)


class BanBook:
    """key -> entry (expires_at, failures, filter, reason, banned_at): a plain tuple,
    since 100k Ban and ipaddress objects cost ~80 MB and ~0.6 s to build, and most
    bans are only ever kernel elements."""

    def __init__(self, settings, state, state_queue, kernel_queue):
        self.settings = settings
        self.state = state
        self.state_queue = state_queue
        self.kernel_queue = kernel_queue
        self.active: dict[tuple, tuple] = {}
        # Prefix lengths in use by active bans, per IP version, so "is this
        # address already covered by a ban?" is a few dict lookups.
        self.prefixlens: dict[int, Counter] = {4: Counter(), 6: Counter()}
        # (expires_at, tie-breaker, keys): one entry per expiry time of a batch, as
        # a flood's bans of one slice share theirs. Keys replaced or lifted since
        # stay until popped, then are skipped.
        self._expiry: list[tuple[float, int, list]] = []
        self._sequence = itertools.count()
        self.bans_total: Counter = Counter()   # per reason, bans made since start
        # A new stamp at every change of `active`: what was made from a copy of it
        # (an operator's listing) is still right while the stamp is the same.
        self.stamp = next(_STAMPS)

    def load(self, rows):
        """State's ban rows (BAN_COLUMNS order) at startup."""
        by_expiry = {}
        for data, _text, _version, banned_at, expires_at, failures, filter_name, reason in rows:
            key = key_from_blob(data)
            self.active[key] = (expires_at, failures, filter_name, reason, banned_at)
            self.prefixlens[key[0]][key[2]] += 1
            by_expiry.setdefault(expires_at, []).append(key)
        self._expiry = [(expires_at, next(self._sequence), keys)
                        for expires_at, keys in by_expiry.items()]
        heapq.heapify(self._expiry)
        self.stamp = next(_STAMPS)

    # Escalation.

    def history(self, key):
        """(times banned, end of the last ban) for this key; (0, 0.0) if never banned."""
        return self._histories([key]).get(key) or (0, 0.0)

    def _histories(self, keys):
        """{key: (times banned, end of the last ban)} of those of `keys` with history:
        the queue's unwritten ones, the rest in one query."""
        found, ask, blobs = {}, [], []
        unwritten = self.state_queue.history
        stored = self.state_queue.history_filter
        may_have = stored.may_have if stored is not None else None
        for key in keys:
            entry = unwritten(key)
            if entry is not None:
                found[key] = entry
                continue
            data = blob(key)
            if may_have is None or may_have(data):
                ask.append(key)
                blobs.append(data)
        if ask:
            try:
                stored = self.state.load_history_of_many(blobs)
            except PolicydError as error:
                # Banning without escalation beats not banning.
                log.error("ban history unreadable, using first-offence bans: %s", error)
                stored = {}
            if stored:
                for key, data in zip(ask, blobs):
                    entry = stored.get(data)
                    if entry is not None:
                        found[key] = entry
        return found

    def escalated_bantime(self, times_banned):
        doublings = min(times_banned, MAX_DOUBLINGS)
        return min(self.settings.bantime * 2 ** doublings, self.settings.bantime_max)

    def _offences(self, history, now):
        """Times banned that count for escalation: history decays once a network was
        quiet for bantime_max since its last ban ended."""
        if history is None:
            return 0
        times_banned, last_ended = history
        return 0 if now - last_ended >= self.settings.bantime_max else times_banned

    # Starting and ending bans.

    def start(self, key, duration, failures, filter_name, reason, now):
        """Make the ban and queue it; returns its entry. duration None: the bantime
        escalated by this network's history."""
        history = self._histories([key]).get(key)
        times_banned = self._offences(history, now)
        if duration is None:
            duration = self.escalated_bantime(times_banned)
        previous = self.active.get(key)
        if previous is not None:
            self._drop(key)
        expires_at = now + duration
        entry = (expires_at, failures, filter_name, reason, now)
        self._add(key, entry)
        heapq.heappush(self._expiry, (expires_at, next(self._sequence), [key]))
        # Extending a ban in force is not a new offence.
        if previous is None:
            times_banned += 1
        self.state_queue.ban_started(key, entry, (times_banned, expires_at))
        self.kernel_queue.banned(key, expires_at, fresh=previous is None and history is None)
        self.bans_total[reason] += 1
        return entry

    def start_auto(self, due, now):
        """start() of the auto bans {key: (filter name, failures)} of one batch of
        failures (none of them active), with their histories read in one query;
        returns [(key, entry)]. Bans of one duration share one expiry time."""
        histories = self._histories(list(due))
        bantime = self.settings.bantime
        active, prefixlens = self.active, self.prefixlens
        # The queues' ban_started/banned, inlined: a flood makes 100k bans.
        upsert, history_unwritten = self.state_queue.upsert, self.state_queue.history_unwritten
        deleted = self.state_queue.delete
        kernel_add, kernel_fresh = self.kernel_queue.add, self.kernel_queue.fresh
        kernel_removed = self.kernel_queue.remove
        made, by_expiry, expiries, first_offences = [], {}, {}, {}
        for key, (filter_name, failures) in due.items():
            history = histories.get(key)
            times_banned = self._offences(history, now) if history is not None else 0
            duration = bantime if not times_banned else self.escalated_bantime(times_banned)
            expires_at = expiries.get(duration)
            if expires_at is None:
                expires_at = expiries[duration] = now + duration
                by_expiry[expires_at] = []
                first_offences[expires_at] = (1, expires_at)
            if key in active:
                self._drop(key)
            entry = (expires_at, failures, filter_name, "auto", now)
            active[key] = entry
            prefixlens[key[0]][key[2]] += 1
            by_expiry[expires_at].append(key)
            made.append((key, entry))
            upsert[key] = entry
            history_unwritten[key] = first_offences[expires_at] if not times_banned \
                else (times_banned + 1, expires_at)
            kernel_add[key] = expires_at
            if history is None:
                kernel_fresh.add(key)
            else:
                kernel_fresh.discard(key)
            if deleted:
                deleted.discard(key)
            if kernel_removed:
                kernel_removed.pop(key, None)
        for expires_at, keys in by_expiry.items():
            heapq.heappush(self._expiry, (expires_at, next(self._sequence), keys))
        self.bans_total["auto"] += len(made)
        self.stamp = next(_STAMPS)
        return made

    def end(self, key, ended_at, history=None):
        """Take the ban off the book (the caller says what the kernel does).
        history: this key's, if the caller read it already."""
        self._drop(key)
        times_banned = (history or self.history(key))[0]
        self.state_queue.ban_ended(key, (times_banned, ended_at))

    def lift(self, key, now):
        """End the ban now and queue its removal from the kernel."""
        self.end(key, now)
        self.kernel_queue.lifted(key)

    def expire(self, now):
        """End the bans whose time has passed (the kernel expires its own elements);
        returns [(key, entry)] of them."""
        found = {}  # a key may sit in two entries of one expiry time
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires_at, _sequence, keys = heapq.heappop(heap)
            for key in keys:
                entry = self.active.get(key)
                if entry is not None and entry[0] == expires_at:
                    found[key] = entry
        expired = list(found.items())
        # A flood's bans end together: their histories in one query, not one each.
        histories = self._histories([key for key, _entry in expired]) if expired else {}
        for key, entry in expired:
            self.end(key, entry[0], histories.get(key) or (0, 0.0))
            self.kernel_queue.expired(key)
        return expired

    def _add(self, key, entry):
        self.active[key] = entry
        self.prefixlens[key[0]][key[2]] += 1
        self.stamp = next(_STAMPS)

    def _drop(self, key):
        del self.active[key]
        self.stamp = next(_STAMPS)
        counts = self.prefixlens[key[0]]
        counts[key[2]] -= 1
        if not counts[key[2]]:
            del counts[key[2]]

    # Looking things up.

    def covering(self, key):
        """The key of the active ban that contains `key` (itself included), or None."""
        version, number, prefixlen = key
        for ban_prefixlen in self.prefixlens[version]:
            if ban_prefixlen <= prefixlen:
                candidate = (version, number & MASKS[version, ban_prefixlen], ban_prefixlen)
                if candidate in self.active:
                    return candidate
        return None

    def inside(self, key):
        """Networks of active bans strictly inside `key`."""
        version, number, prefixlen = key
        if not any(p > prefixlen for p in self.prefixlens[version]):
            return []
        mask = MASKS[version, prefixlen]
        return sorted(network((v, n, p)) for v, n, p in self.active
                      if v == version and p > prefixlen and n & mask == number)
