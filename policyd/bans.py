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


class BanKernel(Protocol):
    def add_bans(self, bans: list[tuple[IPNetwork, int]]) -> None:
        """(network, timeout seconds); one call = one transaction; re-adding updates the timeout."""

    def remove_bans(self, networks: list[IPNetwork]) -> None:
        """One transaction; elements that are not there are not an error."""

    def list_bans(self) -> dict[IPNetwork, int]:
        """network -> seconds left, as the kernel has it."""


@dataclass(frozen=True)
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


def _ban_row(ban):
    return (str(ban.network), ban.network.version, ban.banned_at, ban.expires_at,
            ban.failures, ban.filter, ban.reason)


def _ban_from_row(row):
    network, _version, banned_at, expires_at, failures, filter_name, reason = row
    return Ban(ipaddress.ip_network(network), expires_at, failures, filter_name, reason, banned_at)


class BanManager:
    """Decides bans in memory, mirrors them to `state` and `kernel` on flush()."""

    def __init__(self, settings, state, kernel, clock=time.time):
        self.settings = settings
        self.state = state
        self.kernel = kernel
        self.clock = clock
        self._protected = LOOPBACK + tuple(settings.ignore)

        self._active: dict[IPNetwork, Ban] = {}
        # (expires_at, tie-breaker, network): IPv4 and IPv6 networks do not
        # compare, so equal expiry times must never reach the network. Entries
        # of replaced or lifted bans stay until popped, then are skipped.
        self._expiry_heap: list[tuple[float, int, IPNetwork]] = []
        self._heap_sequence = itertools.count()
        # Prefix lengths in use by active bans, per IP version, so "is this
        # address already covered by a ban?" is a few dict lookups.
        self._ban_prefixlens: dict[int, Counter] = {4: Counter(), 6: Counter()}
        self._history: dict[str, tuple[int, float]] = {}  # network text -> (times banned, last end)
        self._window: dict[IPNetwork, list[float]] = {}   # failure times, oldest first
        self._window_order: deque[tuple[float, IPNetwork]] = deque()

        # Kernel queue: what the next flush must add and remove.
        self._kernel_add: dict[IPNetwork, Ban] = {}
        self._kernel_remove: set[IPNetwork] = set()
        # State queue: what the next flush must write.
        self._state_upsert: dict[IPNetwork, Ban] = {}
        self._state_delete: set[IPNetwork] = set()
        self._state_history: set[str] = set()
        self._state_failures: dict[IPNetwork, list[tuple[float, str]]] = {}
        self._state_forget: set[IPNetwork] = set()
        self._state_prune_before: float | None = None

        self.failures_total: Counter = Counter()   # per filter, every failure seen
        self.ignored_total: Counter = Counter()    # per filter, failures from loopback/ignored sources
        self.bans_total: Counter = Counter()       # per reason, bans made since start
        self._load()

    # Startup.

    def _load(self):
        now = self.clock()
        for row in self.state.load_bans(now):
            self._set_active(_ban_from_row(row))
        self._history = self.state.load_history()
        for network_text, when, filter_name in self.state.load_failures(now - self.settings.findtime):
            network = ipaddress.ip_network(network_text)
            if network not in self._active:
                self._window.setdefault(network, []).append(when)
                self._window_order.append((when, network))

    # The ban path.

    def record_failure(self, address, filter_name):
        """Count one failure from `address`; returns the Ban it triggered, else None."""
        self.failures_total[filter_name] += 1
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if self._is_protected(address):
            self.ignored_total[filter_name] += 1
            return None
        network = self._unit_of(address)
        if self._covering_ban(network) is not None:
            return None
        now = self.clock()
        times = self._window.setdefault(network, [])
        cutoff = now - self.settings.findtime
        while times and times[0] < cutoff:
            times.pop(0)
        times.append(now)
        self._window_order.append((now, network))
        self._state_failures.setdefault(network, []).append((now, filter_name))
        if len(times) < self.settings.maxretry:
            return None
        failures = len(times)
        self._forget_window(network)
        ban = self._make_ban(network, self._escalated_bantime(network), failures, filter_name, "auto", now)
        log.info("ban %s for %ds after %d failures (%s)", network, ban.expires_at - now,
                 failures, filter_name)
        return ban

    def flush(self):
        """Write queued changes to state (one transaction) and the kernel (one add,
        one remove call); returns how many kernel changes were pushed."""
        self._write_state()
        now = self.clock()
        pushed = 0
        additions = [(network, _timeout(ban, now)) for network, ban in self._kernel_add.items()
                     if ban.expires_at > now]
        if additions:
            try:
                self.kernel.add_bans(additions)
            except (KernelError, OSError) as error:
                log.error("kernel refused %d ban(s), kept queued for the next flush: %s",
                          len(additions), error)
                return pushed
            pushed += len(additions)
        self._kernel_add.clear()
        if self._kernel_remove:
            removals = list(self._kernel_remove)
            try:
                self.kernel.remove_bans(removals)
            except (KernelError, OSError) as error:
                log.error("kernel refused %d unban(s), kept queued for the next flush: %s",
                          len(removals), error)
                return pushed
            pushed += len(removals)
            self._kernel_remove.clear()
        return pushed

    # Manual operations; the caller flushes.

    def ban(self, network_or_address, duration=None, reason="manual"):
        """Ban a network or address for `duration` seconds (None: the escalated bantime)."""
        network = _as_network(network_or_address)
        if duration is not None and (not isinstance(duration, int) or duration <= 0):
            raise InputError(f"ban duration must be a positive number of seconds, not {duration!r}",
                             key="duration")
        for protected in self._protected:
            if network.version == protected.version and network.overlaps(protected):
                what = "loopback" if protected in LOOPBACK else "on the ignore list"
                raise InputError(f"refusing to ban {network}: {protected} is {what}", key="address")
        covering = self._covering_ban(network)
        if covering is not None and covering != network:
            raise InputError(f"{network} is already inside the ban on {covering}", key="address")
        inside = self._bans_inside(network)
        if inside:
            # The kernel's interval sets refuse overlapping elements, and one
            # refused element would fail every later flush batch.
            raise InputError(f"{network} would overlap the ban on {inside[0]}; unban it first",
                             key="address")
        if duration is None:
            duration = self._escalated_bantime(network)
        self._forget_window(network)
        return self._make_ban(network, duration, 0, None, reason, self.clock())

    def unban(self, network_or_address):
        """Lift the ban on this network, or the ban covering this address. False if none."""
        network = _as_network(network_or_address)
        banned = network if network in self._active else self._covering_ban(network)
        if banned is None:
            return False
        self._end_ban(self._active[banned], self.clock())
        self._kernel_add.pop(banned, None)
        self._kernel_remove.add(banned)
        log.info("unban %s", banned)
        return True

    # Housekeeping.

    def expire(self):
        """Forget bans whose time has passed (the kernel expires its own elements)
        and failures older than findtime; writes that to state now."""
        now = self.clock()
        expired = []
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            expires_at, _sequence, network = heapq.heappop(self._expiry_heap)
            ban = self._active.get(network)
            if ban is not None and ban.expires_at == expires_at:
                self._end_ban(ban, expires_at)
                self._kernel_add.pop(ban.network, None)
                expired.append(ban)
        cutoff = now - self.settings.findtime
        while self._window_order and self._window_order[0][0] < cutoff:
            _when, network = self._window_order.popleft()
            times = self._window.get(network)
            if times is None:
                continue
            while times and times[0] < cutoff:
                times.pop(0)
            if not times:
                del self._window[network]
        self._state_prune_before = cutoff
        self._write_state()
        return expired

    def active(self):
        """Bans in force now, soonest expiry first."""
        now = self.clock()
        return sorted((ban for ban in self._active.values() if ban.expires_at > now),
                      key=lambda ban: (ban.expires_at, str(ban.network)))

    def restore(self):
        """Push every active ban to the kernel with its remaining time, in one batch.

        For a restart or a kernel whose tables were flushed by someone else.
        Raises what the kernel raises; returns the number of bans pushed."""
        now = self.clock()
        additions = [(network, _timeout(ban, now)) for network, ban in self._active.items()
                     if ban.expires_at > now]
        if additions:
            self.kernel.add_bans(additions)
        self._kernel_add.clear()
        log.info("restored %d ban(s) to the kernel", len(additions))
        return len(additions)

    def reconcile(self):
        """Re-add, in one batch, active bans the kernel does not have; returns how many."""
        now = self.clock()
        present = self.kernel.list_bans()
        missing = [(network, _timeout(ban, now)) for network, ban in self._active.items()
                   if ban.expires_at > now and network not in present]
        if missing:
            self.kernel.add_bans(missing)
            for network, _timeout_seconds in missing:
                self._kernel_add.pop(network, None)
            log.warning("kernel lacked %d ban(s); re-added", len(missing))
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

    def _is_protected(self, address):
        return any(address in network for network in self._protected if network.version == address.version)

    def _unit_of(self, address):
        """The network a failure counts against: the address, or its IPv6 /prefix
        unless that prefix would also cover a protected network."""
        network = addr.ban_network(address, self.settings.ipv6_prefix)
        if network.prefixlen != network.max_prefixlen and any(
                network.overlaps(protected) for protected in self._protected
                if protected.version == network.version):
            return addr.ban_network(address, network.max_prefixlen)
        return network

    def _covering_ban(self, network):
        """The active ban that contains `network` (itself included), or None."""
        for prefixlen in self._ban_prefixlens[network.version]:
            if prefixlen <= network.prefixlen:
                candidate = network if prefixlen == network.prefixlen else network.supernet(new_prefix=prefixlen)
                if candidate in self._active:
                    return candidate
        return None

    def _bans_inside(self, network):
        """Active bans strictly inside `network`."""
        if not any(p > network.prefixlen for p in self._ban_prefixlens[network.version]):
            return []
        return sorted((other for other in self._active
                       if other.version == network.version and other != network
                       and other.subnet_of(network)), key=str)

    def _escalated_bantime(self, network):
        previous = self._history.get(str(network), (0, 0.0))[0]
        doublings = min(previous, MAX_DOUBLINGS)
        return min(self.settings.bantime * 2 ** doublings, self.settings.bantime_max)

    def _make_ban(self, network, duration, failures, filter_name, reason, now):
        previous = self._active.get(network)
        if previous is not None:
            self._drop_active(previous)
        ban = Ban(network, now + duration, failures, filter_name, reason, now)
        self._set_active(ban)
        key = str(network)
        count = self._history.get(key, (0, 0.0))[0]
        self._history[key] = (count if previous is not None else count + 1, ban.expires_at)
        self._state_history.add(key)
        self._state_upsert[network] = ban
        self._state_delete.discard(network)
        self._kernel_add[network] = ban
        self._kernel_remove.discard(network)
        self.bans_total[reason] += 1
        return ban

    def _end_ban(self, ban, ended_at):
        self._drop_active(ban)
        key = str(ban.network)
        count = self._history.get(key, (1, 0.0))[0]
        self._history[key] = (count, ended_at)
        self._state_history.add(key)
        self._state_upsert.pop(ban.network, None)
        self._state_delete.add(ban.network)

    def _set_active(self, ban):
        self._active[ban.network] = ban
        self._ban_prefixlens[ban.network.version][ban.network.prefixlen] += 1
        heapq.heappush(self._expiry_heap, (ban.expires_at, next(self._heap_sequence), ban.network))

    def _drop_active(self, ban):
        del self._active[ban.network]
        counts = self._ban_prefixlens[ban.network.version]
        counts[ban.network.prefixlen] -= 1
        if not counts[ban.network.prefixlen]:
            del counts[ban.network.prefixlen]

    def _forget_window(self, network):
        """A ban starts the count afresh: drop this network's failures, queued and stored."""
        in_window = self._window.pop(network, ())
        not_yet_written = self._state_failures.pop(network, ())
        # Unwritten failures are the newest; only older ones can be in the file.
        if len(in_window) > len(not_yet_written):
            self._state_forget.add(network)

    def _write_state(self):
        """Persist everything queued in one transaction. On a write error the queue
        is kept and the kernel is still served: enforcement matters more."""
        if not (self._state_upsert or self._state_delete or self._state_history
                or self._state_failures or self._state_forget or self._state_prune_before is not None):
            return
        try:
            with self.state.transaction() as writer:
                writer.delete_bans([str(network) for network in self._state_delete])
                writer.upsert_bans([_ban_row(ban) for ban in self._state_upsert.values()])
                writer.upsert_history([(key, *self._history[key]) for key in self._state_history])
                writer.forget_failures([str(network) for network in self._state_forget])
                writer.add_failures([(str(network), when, filter_name)
                                     for network, entries in self._state_failures.items()
                                     for when, filter_name in entries])
                if self._state_prune_before is not None:
                    writer.prune_failures(self._state_prune_before)
        except (sqlite3.Error, OSError) as error:  # disk full, read-only, locked
            log.error("could not write ban state to %s, will retry on the next flush: %s",
                      self.state.path, error)
            return
        self._state_upsert.clear()
        self._state_delete.clear()
        self._state_history.clear()
        self._state_failures.clear()
        self._state_forget.clear()
        self._state_prune_before = None


def _timeout(ban, now):
    """Whole seconds for the kernel, rounded up so the kernel never lifts a ban early."""
    return max(1, math.ceil(ban.expires_at - now))


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
