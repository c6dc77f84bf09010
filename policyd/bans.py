"""Turns authentication failures into bans: findtime/maxretry window, escalation,
ignore list and loopback, IPv6 prefixes. Queues kernel changes and state
writes, and hands each batch to the kernel and to State in one piece per flush.
"""
import bisect
import heapq
import ipaddress
import itertools
import logging
import math
import socket
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from . import addr
from .errors import InputError, KernelError
from .banqueue import StateQueue

log = logging.getLogger(__name__)

IPNetwork = addr.IPNetwork

# Loopback is never banned, whatever the policy says: banning it cuts the
# proxy off from the service it fronts.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

# 2**62 * any bantime is far past any cap; stops absurd integers for
# networks with a very long history.
MAX_DOUBLINGS = 62

# Manual bans longer than this are refused: an element the kernel rejects for
# its timeout would fail the whole flush batch it is in, every time.
MAX_MANUAL_BAN = 10 * 365 * 86400

# Bans shorter than these are refused: they cut off a large share of the
# internet, which is what a policy's deny list is for (reviewed, in a file).
MIN_BAN_PREFIX = {4: 8, 6: 16}

# A network inside this module is a key (version, first address as int,
# prefix length): building, hashing and comparing ipaddress objects costs
# microseconds each, and the failure path runs for every matched log line.
# ipaddress objects exist only in Ban, at the edges.
_BITS = {4: 32, 6: 128}
_MASKS = {(version, prefixlen): ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)
          for version, bits in _BITS.items() for prefixlen in range(bits + 1)}
_NETWORK_TYPES = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}


class BanKernel(Protocol):
    def add_bans(self, bans: list[tuple[IPNetwork, int]]) -> None:
        """(network, timeout seconds); one transaction for single addresses and prefixes,
        a second for ranges; re-adding updates the timeout."""

    def remove_bans(self, networks: list[IPNetwork]) -> None:
        """One transaction; elements that are not there are not an error."""

    def replace_ban_keys(self, items: list[tuple[tuple, int]]) -> None:
        """Like add_bans, by key ((version, first address as int, prefix length), seconds):
        the ban path of a flood must not build an ipaddress object per element."""

    def add_ban_keys(self, items: list[tuple[tuple, int]], flush_ipv6: bool = False) -> None:
        """Bulk restore: ((version, first address as int, prefix length), seconds) pairs,
        one batch; elements already present keep their own timeout. flush_ipv6: the
        IPv6 ban sets are emptied first, in the same batch (ipv6_prefix changed)."""

    def list_ban_keys(self) -> set[tuple]:
        """The kernel's ban elements as (version, first address as int, prefix length)."""

    def list_bans(self) -> dict[IPNetwork, int]:
        """network -> seconds left, as the kernel has it."""


@dataclass(frozen=True, slots=True)
class Ban:
    network: IPNetwork
    expires_at: float
    failures: int
    filter: str | None
    reason: str  # "auto" | "manual"
    banned_at: float

    def seconds_left(self, now):
        return max(0.0, self.expires_at - now)

    def as_dict(self):
        """JSON-ready form, for `policyd bans --json` and the control socket."""
        fields = asdict(self)
        fields["network"] = str(self.network)
        return fields


class NewBans(Sequence):
    """The bans a batch of failures made, in order; each Ban is built when read,
    so the 100k bans of a flood cost no ipaddress objects unless someone looks."""

    __slots__ = ("_made",)

    def __init__(self, made):
        self._made = made  # [(key, entry)]

    def __len__(self):
        return len(self._made)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [_ban(key, entry) for key, entry in self._made[index]]
        return _ban(*self._made[index])

    def filters(self):
        """The filter names of these bans, sorted, without building them."""
        return sorted({entry[2] for _key, entry in self._made if entry[2] is not None})


class BanManager:
    """Decides bans in memory, mirrors them to `state` and `kernel` on flush()."""

    def __init__(self, settings, state, kernel, clock=time.time, writer=None):
        self.state = state
        self.kernel = kernel
        self.clock = clock
        # What the next state write must hold, and the batches on their way.
        self.queue = StateQueue(state, writer, blob=_blob, text=_text)

        # key -> Ban fields after `network`, as a plain tuple: 100k Ban and
        # ipaddress objects cost ~80 MB and ~0.6 s to build at startup, and
        # most of them are only ever needed as kernel elements.
        self._active: dict[tuple, tuple] = {}
        # (expires_at, tie-breaker, key); entries of replaced or lifted bans
        # stay until popped, then are skipped.
        self._expiry_heap: list[tuple[float, int, tuple]] = []
        self._heap_sequence = itertools.count()
        # Prefix lengths in use by active bans, per IP version, so "is this
        # address already covered by a ban?" is a few dict lookups.
        self._ban_prefixlens: dict[int, Counter] = {4: Counter(), 6: Counter()}
        # Escalation history is read from State when a ban is made (one indexed
        # lookup), not loaded whole: it only grows, and startup must stay fast.
        # The entries changed since the last write are the queue's.
        self._window: dict[tuple, list[float]] = {}       # failure times, oldest first
        # (a time, key): one entry per window when it opens, so expire() can find
        # windows that went quiet. Not one per failure: a flood of 300k lines
        # would keep 300k entries for findtime.
        self._window_order: deque[tuple[float, tuple]] = deque()
        # History rows read in one query for a batch of failures (record_failures).
        self._history_prefetched: dict[tuple, tuple[int, float] | None] = {}

        # Kernel queue: what the next flush must add and remove. Keys never banned
        # before (no element can linger in the kernel) are in _kernel_fresh too:
        # they need no delete-then-add to set their timeout.
        self._kernel_add: dict[tuple, float] = {}  # key -> expires_at
        self._kernel_fresh: set[tuple] = set()
        self._kernel_remove: dict[tuple, IPNetwork] = {}

        self.failures_total: Counter = Counter()   # per filter, every failure seen
        self.ignored_total: Counter = Counter()    # per filter, failures from loopback/ignored sources
        self.bans_total: Counter = Counter()       # per reason, bans made since start
        self._use_settings(settings)
        self._load()
        self._lift_protected()

    def reconfigure(self, settings):
        """Take new settings (a policy reload); bans now on the ignore list are lifted
        (queued; the caller flushes). Every other ban and all history are kept."""
        self._use_settings(settings)
        return self._lift_protected()

    def _use_settings(self, settings):
        self.settings = settings
        self._protected = LOOPBACK + tuple(settings.ignore)
        # Per version: [(first, last)] as ints, checked for every failure.
        self._protected_ranges = {4: [], 6: []}
        for network in self._protected:
            version, first, last = _range(_key(network))
            self._protected_ranges[version].append((first, last))
        self._prefix6 = settings.ipv6_prefix
        self._mask6 = _MASKS[6, self._prefix6]
        self._hostmask6 = self._mask6 ^ _MASKS[6, 128]

    def _lift_protected(self):
        """Lift bans that cover a protected address: the ignore list may have grown
        since they were made. Returns the lifted bans."""
        lifted = [key for key in self._active if self._overlaps_protected(key)]
        now = self.clock()
        bans = [_ban(key, self._active[key]) for key in lifted]
        for key in lifted:
            self._end_ban(key, now)
            self._kernel_add.pop(key, None)
            self._kernel_remove[key] = _network(key)
        if lifted:
            log.warning("lifted %d ban(s) covering ignored addresses: %s", len(lifted),
                        _sample(ban.network for ban in bans))
        return bans

    # Startup.

    def _load(self):
        now = self.clock()
        for blob, _text, _version, banned_at, expires_at, failures, filter_name, reason \
                in self.state.load_bans(now):
            key = _key_from_blob(blob)
            self._set_active(key, (expires_at, failures, filter_name, reason, banned_at), heap=False)
        self._expiry_heap = [(entry[0], next(self._heap_sequence), key)
                             for key, entry in self._active.items()]
        heapq.heapify(self._expiry_heap)
        for blob, when, _filter_name in self.state.load_failures(now - self.settings.findtime):
            key = _key_from_blob(blob)
            times = self._window.get(key)
            if times is None:
                times = self._window[key] = []
                self._window_order.append((when, key))
            times.append(when)

    # The ban path.

    def record_failure(self, address, filter_name, when=None):
        """Count one failure from `address` at `when` (the log line's own time; None:
        now; a future time counts as now); returns the Ban it triggered, else None.
        Times may arrive out of order: the window counts failures by their time."""
        key = self._failure_key(address, filter_name)
        if key is None:
            return None
        return self._count_failure(key, filter_name, self.clock(), when)

    def record_failures(self, failures):
        """record_failure for each (address, filter name, when), in order; returns the
        Bans made. The flood path: one loop with everything it needs in locals (a flood
        is 300k calls), and the ban history of every network that may reach
        maxretry here read in one query, not one query per ban."""
        # _failure_key, inlined: this loop runs once per failure of a flood.
        keyed = []
        seen = Counter()
        protected4, protected6 = self._protected_ranges[4], self._protected_ranges[6]
        mask6, hostmask6, prefix6 = self._mask6, self._hostmask6, self._prefix6
        for address, filter_name, when in failures:
            seen[filter_name] += 1
            number = int(address)
            if address.version == 6 and number >> 32 != 0xFFFF:
                first = number & mask6
                last = first | hostmask6
                key = (6, first, prefix6)
                for low, high in protected6:
                    if low <= number <= high:
                        key = None
                        break
                    if low <= last and first <= high:
                        key = (6, number, 128)  # its /prefix would cover a protected network
            else:
                number &= 0xFFFFFFFF  # IPv4, or IPv4-mapped IPv6 (::ffff:0:0/96) counted as IPv4
                key = (4, number, 32)
                for low, high in protected4:
                    if low <= number <= high:
                        key = None
                        break
            if key is None:
                self.ignored_total[filter_name] += 1
            else:
                keyed.append((key, filter_name, when))
        self.failures_total.update(seen)
        if not keyed:
            return NewBans([])
        self._prefetch_history([(key, name) for key, name, _when in keyed])
        now = self.clock()
        cutoff = now - self.settings.findtime
        maxretry = self.settings.maxretry
        active, prefixlens, window = self._active, self._ban_prefixlens, self._window
        open_window = self._window_order.append
        unwritten = self.queue.failures
        stamps = {}
        bans = []
        try:
            for key, filter_name, when in keyed:
                if when is None or when >= now:
                    when = now  # no time on the line, or one in the future: now
                elif when < cutoff:
                    continue  # older than the window: it cannot help any ban now
                if key in active:
                    continue
                version, number, prefixlen = key
                covered = False
                for ban_prefixlen in prefixlens[version]:
                    if ban_prefixlen < prefixlen and (
                            version, number & _MASKS[version, ban_prefixlen], ban_prefixlen) in active:
                        covered = True
                        break
                if covered:
                    continue
                times = window.get(key)
                if times is None:
                    times = window[key] = []
                    open_window((now, key))
                elif times[0] < cutoff:
                    while times and times[0] < cutoff:
                        times.pop(0)
                if not times or when >= times[-1]:
                    times.append(when)
                else:
                    bisect.insort(times, when)  # the line's own time; lines may be out of order
                stamp = stamps.get((when, filter_name))
                if stamp is None:
                    # Shared by the failures of one second: a flood's lines carry few times.
                    stamp = stamps[when, filter_name] = (when, filter_name)
                queued = unwritten.get(key)
                if queued is None:
                    unwritten[key] = [stamp]
                else:
                    queued.append(stamp)
                if len(times) >= maxretry:
                    bans.append((key, self._ban_after_failures(key, filter_name, now)))
        finally:
            self._history_prefetched = {}
        return NewBans(bans)

    def _failure_key(self, address, filter_name):
        """The key this failure counts against, or None if it never counts."""
        self.failures_total[filter_name] += 1
        number = int(address)
        if address.version == 4:
            version = 4
        elif number >> 32 == 0xFFFF:  # IPv4-mapped (::ffff:0:0/96) counts as IPv4
            version, number = 4, number & 0xFFFFFFFF
        else:
            version = 6
        for first, last in self._protected_ranges[version]:
            if first <= number <= last:
                self.ignored_total[filter_name] += 1
                return None
        if version == 4:
            return (4, number, 32)
        first = number & self._mask6
        for protected_first, protected_last in self._protected_ranges[6]:
            if protected_first <= first | self._hostmask6 and first <= protected_last:
                return (6, number, 128)  # its /prefix would cover a protected network
        return (6, first, self._prefix6)

    def _prefetch_history(self, keyed):
        counts = Counter(key for key, _filter in keyed)
        maxretry = self.settings.maxretry
        due = [key for key, count in counts.items()
               if count + len(self._window.get(key, ())) >= maxretry
               and self.queue.history(key) is None]
        if not due:
            return
        blobs = [_blob(key) for key in due]
        try:
            found = self.state.load_history_of_many(blobs)
        except InputError as error:
            log.error("ban history unreadable, reading it ban by ban: %s", error)
            return
        self._history_prefetched = {key: found.get(blob) for key, blob in zip(due, blobs)}

    def _count_failure(self, key, filter_name, now, when=None):
        cutoff = now - self.settings.findtime
        when = now if when is None or when > now else when
        if when < cutoff:
            return None  # older than the window: it cannot help any ban now
        if self._covering_ban(key) is not None:
            return None
        times = self._window.get(key)
        if times is None:
            times = self._window[key] = []
            self._window_order.append((now, key))
        while times and times[0] < cutoff:
            times.pop(0)
        bisect.insort(times, when)
        self.queue.failures.setdefault(key, []).append((when, filter_name))
        if len(times) < self.settings.maxretry:
            return None
        return _ban(key, self._ban_after_failures(key, filter_name, now))

    def _ban_after_failures(self, key, filter_name, now):
        """The auto ban of `key`, whose window just reached maxretry; its entry."""
        failures = len(self._window[key])
        self._forget_window(key)
        return self._start_ban(key, None, failures, filter_name, "auto", now)

    def flush(self, write_state=True):
        """Push queued changes to the kernel (one add, one remove call), then write
        them to state (one transaction); returns how many kernel changes were pushed.

        The kernel goes first: enforcement is what the ban latency is measured
        by, and a ban the kernel has but the file lacks still expires by itself.
        write_state=False leaves the state queue for a later flush: in a flood,
        one transaction per few hundred ms instead of one per slice of lines
        (SQLite rewrites every page a transaction touches, and random keys
        touch a page per row)."""
        pushed = self._push_to_kernel()
        if write_state:
            self.write_state()
        return pushed

    def _push_to_kernel(self):
        now = self.clock()
        pushed = 0
        additions = [(key, _timeout(expires_at, now)) for key, expires_at in self._kernel_add.items()
                     if expires_at > now]
        if additions:
            fresh = self._kernel_fresh
            try:
                if fresh:
                    self.kernel.add_ban_keys([item for item in additions if item[0] in fresh])
                    additions_left = [item for item in additions if item[0] not in fresh]
                    fresh.clear()
                else:
                    additions_left = additions
                if additions_left:
                    self.kernel.replace_ban_keys(additions_left)
            except (KernelError, OSError) as error:
                log.error("kernel refused %d ban(s), kept queued for the next flush: %s",
                          len(additions), error)
                return pushed
            pushed += len(additions)
            # debug: the daemon logs each ban once, as key=value, with its reason.
            log.debug("banned %d: %s", len(additions), _sample(_network(key) for key, _ in additions))
        self._kernel_add.clear()
        self._kernel_fresh.clear()
        if self._kernel_remove:
            removals = list(self._kernel_remove.values())
            try:
                self.kernel.remove_bans(removals)
            except (KernelError, OSError) as error:
                log.error("kernel refused %d unban(s), kept queued for the next flush: %s",
                          len(removals), error)
                return pushed
            pushed += len(removals)
            log.debug("unbanned %d: %s", len(removals), _sample(removals))
            self._kernel_remove.clear()
        return pushed

    # Manual operations; the caller flushes.

    def ban(self, network_or_address, duration=None, reason="manual", filter_name=None):
        """Ban a network or address for `duration` seconds (None: the escalated bantime)."""
        network = _as_network(network_or_address)
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int)
                                     or not 0 < duration <= MAX_MANUAL_BAN):
            raise InputError(f"ban duration must be 1 to {MAX_MANUAL_BAN} seconds, not {duration!r}",
                             key="duration")
        if network.prefixlen < MIN_BAN_PREFIX[network.version]:
            raise InputError(f"refusing to ban {network}: shorter than "
                             f"/{MIN_BAN_PREFIX[network.version]}; put networks that large in a "
                             "service's deny list", key="address")
        for protected in self._protected:
            if network.version == protected.version and network.overlaps(protected):
                what = "loopback" if protected in LOOPBACK else "on the ignore list"
                raise InputError(f"refusing to ban {network}: {protected} is {what}", key="address")
        key = _key(network)
        covering = self._covering_ban(key)
        if covering is not None and covering != key:
            raise InputError(f"{network} is already inside the ban on {_network(covering)}",
                             key="address")
        inside = self._bans_inside(key)
        if inside:
            # The kernel's interval sets refuse overlapping elements, and one
            # refused element would fail every later flush batch.
            raise InputError(f"{network} would overlap the ban on {inside[0]}; unban it first",
                             key="address")
        self._forget_window(key)
        return self._make_ban(key, duration, 0, filter_name, reason, self.clock())

    def protects(self, network_or_address):
        """True if banning this network would cover loopback or an ignored address."""
        return self._overlaps_protected(_key(_as_network(network_or_address)))

    def covering(self, network_or_address):
        """The active Ban that covers this network (itself included), or None."""
        key = self._covering_ban(_key(_as_network(network_or_address)))
        return None if key is None else _ban(key, self._active[key])

    def unban(self, network_or_address):
        """Lift the ban on this network, or the ban covering this address (for an
        IPv6 address usually its /64). Returns the network lifted, or None."""
        key = self._covering_ban(_key(_as_network(network_or_address)))
        if key is None:
            return None
        self._end_ban(key, self.clock())
        self._kernel_add.pop(key, None)
        self._kernel_remove[key] = _network(key)
        return _network(key)

    # Housekeeping.

    def expire(self, write_state=True):
        """Forget bans whose time has passed (the kernel expires its own elements)
        and failures older than findtime; writes that to state now, unless
        write_state is False (a later flush writes it)."""
        now = self.clock()
        expired = []
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            expires_at, _sequence, key = heapq.heappop(self._expiry_heap)
            entry = self._active.get(key)
            if entry is not None and entry[0] == expires_at:
                expired.append(_ban(key, entry))
                self._end_ban(key, expires_at)
                self._kernel_add.pop(key, None)
        cutoff = now - self.settings.findtime
        order = self._window_order
        while order and order[0][0] < cutoff:
            _when, key = order.popleft()
            times = self._window.get(key)
            if times is None:
                continue  # banned or forgotten since
            while times and times[0] < cutoff:
                times.pop(0)
            if times:
                order.append((times[0], key))  # still open: look again when it is due
            else:
                del self._window[key]
        self.queue.prune_before = cutoff
        if write_state:
            self.write_state()
        return expired

    def active(self):
        """Bans in force now, soonest expiry first."""
        return active_in(self.snapshot(), self.clock())

    def snapshot(self):
        """The ban book as it is now, for active_in() on another thread: a copy of
        immutable pairs, a few ms for 100k bans where building them all takes 1 s."""
        return list(self._active.items())

    def restore(self, flush_ipv6=False):
        """Push every active ban to the kernel with its remaining time, in one batch.

        For a restart or a kernel whose tables were flushed by someone else;
        flush_ipv6 after bans.ipv6_prefix changed (the kernel's IPv6 elements
        are replaced, atomically). Raises what the kernel raises; returns the
        number of bans pushed."""
        now = self.clock()
        additions = [(key, _timeout(entry[0], now)) for key, entry in self._active.items()
                     if entry[0] > now]
        if flush_ipv6:
            self.kernel.add_ban_keys(additions, flush_ipv6=True)
        elif additions:
            self.kernel.add_ban_keys(additions)
        self._kernel_add.clear()
        self._kernel_fresh.clear()
        log.info("restored %d ban(s) to the kernel", len(additions))
        return len(additions)

    def reconcile(self):
        """Re-add, in one batch, active bans the kernel does not have; returns how many."""
        now = self.clock()
        present = self.kernel.list_ban_keys()
        missing = [(key, _timeout(entry[0], now)) for key, entry in self._active.items()
                   if entry[0] > now and key not in present]
        if missing:
            self.kernel.add_ban_keys(missing)
            for key, _seconds in missing:
                self._kernel_add.pop(key, None)
            log.warning("kernel lacked %d ban(s), re-added: %s", len(missing),
                        _sample(_network(key) for key, _seconds in missing))
        return len(missing)

    @property
    def active_count(self):
        return len(self._active)

    # Internals.

    def _overlaps_protected(self, key):
        version, first, last = _range(key)
        for protected_first, protected_last in self._protected_ranges[version]:
            if protected_first <= last and first <= protected_last:
                return True
        return False

    def _covering_ban(self, key):
        """The key of the active ban that contains `key` (itself included), or None."""
        version, number, prefixlen = key
        for ban_prefixlen in self._ban_prefixlens[version]:
            if ban_prefixlen <= prefixlen:
                candidate = (version, number & _MASKS[version, ban_prefixlen], ban_prefixlen)
                if candidate in self._active:
                    return candidate
        return None

    def _bans_inside(self, key):
        """Networks of active bans strictly inside `key`."""
        version, number, prefixlen = key
        if not any(p > prefixlen for p in self._ban_prefixlens[version]):
            return []
        mask = _MASKS[version, prefixlen]
        return sorted(_network((v, n, p)) for v, n, p in self._active
                      if v == version and p > prefixlen and n & mask == number)

    def _history(self, key):
        """(times banned, end of the last ban) for this key; (0, 0.0) if never banned."""
        entry = self.queue.history(key)
        if entry is None and key in self._history_prefetched:
            entry = self._history_prefetched[key] or (0, 0.0)
        if entry is None:
            try:
                entry = self.state.load_history_of(_blob(key)) or (0, 0.0)
            except InputError as error:
                # Banning without escalation beats not banning.
                log.error("ban history unreadable, using a first-offence ban: %s", error)
                entry = (0, 0.0)
        return entry

    def _escalated_bantime(self, times_banned):
        doublings = min(times_banned, MAX_DOUBLINGS)
        return min(self.settings.bantime * 2 ** doublings, self.settings.bantime_max)

    def _make_ban(self, key, duration, failures, filter_name, reason, now):
        return _ban(key, self._start_ban(key, duration, failures, filter_name, reason, now))

    def _start_ban(self, key, duration, failures, filter_name, reason, now):
        """Make the ban and queue it; returns its entry. duration None: the bantime
        escalated by this network's history. No Ban (and no ipaddress object) is
        built here: a flood makes 100k bans that are only ever kernel elements."""
        history = self._history(key)
        times_banned, last_ended = history
        if now - last_ended >= self.settings.bantime_max:
            # History decays: a network quiet for bantime_max since its last ban
            # ended starts again at the first bantime.
            times_banned = 0
        if duration is None:
            duration = self._escalated_bantime(times_banned)
        previous = self._active.get(key)
        if previous is not None:
            self._drop_active(key)
        expires_at = now + duration
        entry = (expires_at, failures, filter_name, reason, now)
        self._set_active(key, entry)
        # Extending a ban in force is not a new offence.
        if previous is None:
            times_banned += 1
        self.queue.ban_started(key, entry, (times_banned, expires_at))
        self._kernel_add[key] = expires_at
        if previous is None and history == (0, 0.0):
            self._kernel_fresh.add(key)
        else:
            self._kernel_fresh.discard(key)
        self._kernel_remove.pop(key, None)
        self.bans_total[reason] += 1
        return entry

    def _end_ban(self, key, ended_at):
        self._drop_active(key)
        self.queue.ban_ended(key, (self._history(key)[0], ended_at))

    def _set_active(self, key, entry, heap=True):
        self._active[key] = entry
        self._ban_prefixlens[key[0]][key[2]] += 1
        if heap:
            heapq.heappush(self._expiry_heap, (entry[0], next(self._heap_sequence), key))

    def _drop_active(self, key):
        del self._active[key]
        counts = self._ban_prefixlens[key[0]]
        counts[key[2]] -= 1
        if not counts[key[2]]:
            del counts[key[2]]

    def _forget_window(self, key):
        """A ban starts the count afresh: drop this network's failures, queued and in
        memory. Stored ones stay until findtime prunes them: the ban's history row
        (last_end) makes State.load_failures skip them, which costs no per-key
        delete in a flood of 100k bans."""
        self._window.pop(key, None)
        self.queue.failures.pop(key, None)

    # The state queue's side of the ban manager's API (the daemon's loop drives it).

    @property
    def writer(self):
        return self.queue.writer

    @writer.setter
    def writer(self, writer):
        self.queue.writer = writer

    def queue_position(self, key, position):
        """Store a log position with the next state write (with the failures before it)."""
        self.queue.positions[key] = position

    def state_pending(self):
        return self.queue.pending()

    def write_state(self, max_rows=None):
        return self.queue.write(max_rows)

    def state_written(self, batches):
        self.queue.written(batches)

    def state_in_flight(self):
        return self.queue.in_flight()


def active_in(snapshot, now):
    """The Bans of a snapshot() in force at `now`, soonest expiry first."""
    return sorted((_ban(key, entry) for key, entry in snapshot if entry[0] > now),
                  key=lambda ban: (ban.expires_at, ban.network.version, ban.network))


def _key(network):
    return (network.version, int(network.network_address), network.prefixlen)


def _network(key):
    version, number, prefixlen = key
    return _NETWORK_TYPES[version]((number, prefixlen))


def _text(key):
    """str(_network(key)), without building the network: a flood writes 100k of them."""
    version, number, prefixlen = key
    if version == 4:
        return f"{socket.inet_ntop(socket.AF_INET, number.to_bytes(4, 'big'))}/{prefixlen}"
    text = socket.inet_ntop(socket.AF_INET6, number.to_bytes(16, "big"))
    # glibc writes an embedded IPv4 (::1.2.3.4) where ipaddress writes hex.
    return f"{text}/{prefixlen}" if "." not in text else str(_network(key))


def _range(key):
    version, number, prefixlen = key
    return (version, number, number | (_MASKS[version, prefixlen] ^ _MASKS[version, _BITS[version]]))


def _blob(key):
    """The State key: packed address (4 or 16 bytes, so the version) + prefix length."""
    version, number, prefixlen = key
    return number.to_bytes(4 if version == 4 else 16, "big") + bytes((prefixlen,))


def _key_from_blob(blob):
    return (4 if len(blob) == 5 else 6, int.from_bytes(blob[:-1], "big"), blob[-1])


def _ban(key, entry):
    return Ban(_network(key), *entry)


def _timeout(expires_at, now):
    """Whole seconds for the kernel, rounded up so the kernel never lifts a ban early."""
    return max(1, math.ceil(expires_at - now))


def _sample(networks, limit=5):
    """A log-sized list: a burst of 100k bans must not become a 2 MB log line."""
    head = list(itertools.islice(networks, limit + 1))
    text = " ".join(str(network) for network in head[:limit])
    return text + (" ..." if len(head) > limit else "")


def _as_network(value):
    """An address, a network, or their text; a bare address means exactly that host."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        if value.version == 6 and value.ipv4_mapped is not None:
            value = value.ipv4_mapped
        return ipaddress.ip_network(value)
    try:
        return addr.parse_network(str(value).strip())
    except ValueError as error:
        raise InputError(f"not an address or network: {value!r} ({error})", key="address") from None
