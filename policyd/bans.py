"""Turns authentication failures into bans: findtime/maxretry window, escalation,
ignore list and loopback, IPv6 prefixes. Queues kernel changes and state
writes, and hands each batch to the kernel and to State in one piece per flush.
"""
import heapq
import ipaddress
import itertools
import logging
import math
import sqlite3
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Protocol

from . import addr
from .errors import InputError, KernelError

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
        """(network, timeout seconds); one call = one transaction; re-adding updates the timeout."""

    def remove_bans(self, networks: list[IPNetwork]) -> None:
        """One transaction; elements that are not there are not an error."""

    def add_ban_keys(self, items: list[tuple[tuple, int]]) -> None:
        """Bulk restore: ((version, first address as int, prefix length), seconds) pairs,
        one batch; elements already present keep their own timeout."""

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


class BanManager:
    """Decides bans in memory, mirrors them to `state` and `kernel` on flush()."""

    def __init__(self, settings, state, kernel, clock=time.time):
        self.state = state
        self.kernel = kernel
        self.clock = clock

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
        # This holds the entries changed since the last write.
        self._history_unwritten: dict[tuple, tuple[int, float]] = {}  # key -> (times banned, last end)
        self._window: dict[tuple, list[float]] = {}       # failure times, oldest first
        self._window_order: deque[tuple[float, tuple]] = deque()

        # Kernel queue: what the next flush must add and remove.
        self._kernel_add: dict[tuple, Ban] = {}
        self._kernel_remove: dict[tuple, IPNetwork] = {}
        # State queue: what the next flush must write.
        self._state_upsert: dict[tuple, Ban] = {}
        self._state_delete: set[tuple] = set()
        self._state_failures: dict[tuple, list[tuple[float, str]]] = {}
        self._state_forget: set[tuple] = set()
        self._state_prune_before: float | None = None

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
            self._window.setdefault(key, []).append(when)
            self._window_order.append((when, key))

    # The ban path.

    def record_failure(self, address, filter_name):
        """Count one failure from `address`; returns the Ban it triggered, else None."""
        self.failures_total[filter_name] += 1
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        version, number = address.version, int(address)
        if self._is_protected(version, number):
            self.ignored_total[filter_name] += 1
            return None
        key = self._unit_of(version, number)
        if self._covering_ban(key) is not None:
            return None
        now = self.clock()
        times = self._window.setdefault(key, [])
        cutoff = now - self.settings.findtime
        while times and times[0] < cutoff:
            times.pop(0)
        times.append(now)
        self._window_order.append((now, key))
        self._state_failures.setdefault(key, []).append((now, filter_name))
        if len(times) < self.settings.maxretry:
            return None
        failures = len(times)
        self._forget_window(key)
        ban = self._make_ban(key, None, failures, filter_name, "auto", now)
        log.debug("ban %s until %s after %d failures (%s)", ban.network, ban.expires_at,
                  failures, filter_name)
        return ban

    def flush(self):
        """Push queued changes to the kernel (one add, one remove call), then write
        them to state (one transaction); returns how many kernel changes were pushed.

        The kernel goes first: enforcement is what the ban latency is measured
        by, and a ban the kernel has but the file lacks still expires by itself."""
        pushed = self._push_to_kernel()
        self._write_state()
        return pushed

    def _push_to_kernel(self):
        now = self.clock()
        pushed = 0
        additions = [(ban.network, _timeout(ban.expires_at, now)) for ban in self._kernel_add.values()
                     if ban.expires_at > now]
        if additions:
            try:
                self.kernel.add_bans(additions)
            except (KernelError, OSError) as error:
                log.error("kernel refused %d ban(s), kept queued for the next flush: %s",
                          len(additions), error)
                return pushed
            pushed += len(additions)
            log.info("banned %d: %s", len(additions), _sample(network for network, _ in additions))
        self._kernel_add.clear()
        if self._kernel_remove:
            removals = list(self._kernel_remove.values())
            try:
                self.kernel.remove_bans(removals)
            except (KernelError, OSError) as error:
                log.error("kernel refused %d unban(s), kept queued for the next flush: %s",
                          len(removals), error)
                return pushed
            pushed += len(removals)
            log.info("unbanned %d: %s", len(removals), _sample(removals))
            self._kernel_remove.clear()
        return pushed

    # Manual operations; the caller flushes.

    def ban(self, network_or_address, duration=None, reason="manual"):
        """Ban a network or address for `duration` seconds (None: the escalated bantime)."""
        network = _as_network(network_or_address)
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int)
                                     or not 0 < duration <= MAX_MANUAL_BAN):
            raise InputError(f"ban duration must be 1 to {MAX_MANUAL_BAN} seconds, not {duration!r}",
                             key="duration")
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
        return self._make_ban(key, duration, 0, None, reason, self.clock())

    def unban(self, network_or_address):
        """Lift the ban on this network, or the ban covering this address. False if none."""
        key = self._covering_ban(_key(_as_network(network_or_address)))
        if key is None:
            return False
        self._end_ban(key, self.clock())
        self._kernel_add.pop(key, None)
        self._kernel_remove[key] = _network(key)
        return True

    # Housekeeping.

    def expire(self):
        """Forget bans whose time has passed (the kernel expires its own elements)
        and failures older than findtime; writes that to state now."""
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
        while self._window_order and self._window_order[0][0] < cutoff:
            _when, key = self._window_order.popleft()
            times = self._window.get(key)
            if times is None:
                continue
            while times and times[0] < cutoff:
                times.pop(0)
            if not times:
                del self._window[key]
        self._state_prune_before = cutoff
        self._write_state()
        return expired

    def active(self):
        """Bans in force now, soonest expiry first."""
        now = self.clock()
        return sorted((_ban(key, entry) for key, entry in self._active.items() if entry[0] > now),
                      key=lambda ban: (ban.expires_at, ban.network.version, ban.network))

    def active_rows(self):
        """((version, first address as int, prefix length), (expires_at, failures,
        filter, reason, banned_at)) of the bans in force now, soonest expiry first:
        active() without building 100k ipaddress objects, for listing them."""
        now = self.clock()
        return sorted(((key, entry) for key, entry in self._active.items() if entry[0] > now),
                      key=lambda item: (item[1][0], item[0]))

    def restore(self):
        """Push every active ban to the kernel with its remaining time, in one batch.

        For a restart or a kernel whose tables were flushed by someone else.
        Raises what the kernel raises; returns the number of bans pushed."""
        now = self.clock()
        additions = [(key, _timeout(entry[0], now)) for key, entry in self._active.items()
                     if entry[0] > now]
        if additions:
            self.kernel.add_ban_keys(additions)
        self._kernel_add.clear()
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

    def stats(self):
        return {
            "failures_total": dict(self.failures_total),
            "ignored_total": dict(self.ignored_total),
            "bans_total": dict(self.bans_total),
            "active": self.active_count,
            "queued": len(self._kernel_add) + len(self._kernel_remove),
        }

    @property
    def active_count(self):
        return len(self._active)

    # Internals.

    def _is_protected(self, version, number):
        for first, last in self._protected_ranges[version]:
            if first <= number <= last:
                return True
        return False

    def _unit_of(self, version, number):
        """The key a failure counts against: the address, or its IPv6 /prefix
        unless that prefix would also cover a protected network."""
        if version == 4:
            return (4, number, 32)
        prefixlen = self.settings.ipv6_prefix
        key = (6, number & _MASKS[6, prefixlen], prefixlen)
        if self._overlaps_protected(key):
            return (6, number, 128)
        return key

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
        entry = self._history_unwritten.get(key)
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
        """duration None: the bantime escalated by this network's history."""
        times_banned = self._history(key)[0]
        if duration is None:
            duration = self._escalated_bantime(times_banned)
        previous = self._active.get(key)
        if previous is not None:
            self._drop_active(key)
        ban = Ban(_network(key), now + duration, failures, filter_name, reason, now)
        self._set_active(key, (ban.expires_at, failures, filter_name, reason, now))
        # Extending a ban in force is not a new offence.
        if previous is None:
            times_banned += 1
        self._history_unwritten[key] = (times_banned, ban.expires_at)
        self._state_upsert[key] = ban
        self._state_delete.discard(key)
        self._kernel_add[key] = ban
        self._kernel_remove.pop(key, None)
        self.bans_total[reason] += 1
        return ban

    def _end_ban(self, key, ended_at):
        self._drop_active(key)
        self._history_unwritten[key] = (self._history(key)[0], ended_at)
        self._state_upsert.pop(key, None)
        self._state_delete.add(key)

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
        """A ban starts the count afresh: drop this network's failures, queued and stored."""
        in_window = self._window.pop(key, ())
        not_yet_written = self._state_failures.pop(key, ())
        # Unwritten failures are the newest; only older ones can be in the file.
        if len(in_window) > len(not_yet_written):
            self._state_forget.add(key)

    def _write_state(self):
        """Persist everything queued in one transaction. On a write error the queue
        is kept and the kernel is still served: enforcement matters more."""
        if not (self._state_upsert or self._state_delete or self._history_unwritten
                or self._state_failures or self._state_forget or self._state_prune_before is not None):
            return
        try:
            with self.state.transaction() as writer:
                writer.delete_bans([_blob(key) for key in self._state_delete])
                writer.upsert_bans([
                    (_blob(key), str(ban.network), key[0], ban.banned_at, ban.expires_at,
                     ban.failures, ban.filter, ban.reason)
                    for key, ban in self._state_upsert.items()])
                writer.upsert_history([(_blob(key), *entry) for key, entry in self._history_unwritten.items()])
                writer.forget_failures([_blob(key) for key in self._state_forget])
                writer.add_failures([(_blob(key), when, filter_name)
                                     for key, entries in self._state_failures.items()
                                     for when, filter_name in entries])
                if self._state_prune_before is not None:
                    writer.prune_failures(self._state_prune_before)
        except (sqlite3.Error, OSError) as error:  # disk full, read-only, locked
            log.error("could not write ban state to %s, will retry on the next flush: %s",
                      self.state.path, error)
            return
        self._state_upsert.clear()
        self._state_delete.clear()
        self._history_unwritten.clear()
        self._state_failures.clear()
        self._state_forget.clear()
        self._state_prune_before = None


def _key(network):
    return (network.version, int(network.network_address), network.prefixlen)


def _network(key):
    version, number, prefixlen = key
    return _NETWORK_TYPES[version]((number, prefixlen))


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
