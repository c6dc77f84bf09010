"""Turns authentication failures into bans, as fail2ban's FailManager, BanManager and
action queue do: BanManager wires the failure window (policyd.banning.failwindow), the ban
book with escalation (policyd.banning.banbook) and the write queues to the kernel and to
State (policyd.banning.banqueue), and is the one API the daemon, the CLI and the fleet use.
"""
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from policyd import addr
from policyd.banning.banbook import MAX_DOUBLINGS, BanBook  # noqa: F401 - MAX_DOUBLINGS: part of this API
from policyd.banning.bankeys import as_network, key as network_key, key_from_blob, network, sample, text, timeout
from policyd.banning.banqueue import KernelQueue, StateQueue
from policyd.errors import InputError
from policyd.banning.failwindow import LOOPBACK, FailureWindow

log = logging.getLogger(__name__)

IPNetwork = addr.IPNetwork

# Manual bans longer than this are refused: an element the kernel rejects for
# its timeout would fail the whole flush batch it is in, every time.
MAX_MANUAL_BAN = 10 * 365 * 86400

# Bans shorter than these are refused: they cut off a large share of the
# internet, which is what a policy's deny list is for (reviewed, in a file).
MIN_BAN_PREFIX = {4: 8, 6: 16}


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

    def sample(self, limit=5):
        """The first bans' networks as text, for a log line (no ipaddress objects)."""
        return " ".join(text(key) for key, _entry in self._made[:limit])

    def filters(self):
        """The filter names of these bans, sorted, without building them."""
        return sorted({entry[2] for _key, entry in self._made if entry[2] is not None})


class _OnPart:
    """An attribute of the manager kept on one of its parts (read and set there)."""

    def __init__(self, part):
        self.part = part

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, manager, owner=None):
        return self if manager is None else getattr(getattr(manager, self.part), self.name)

    def __set__(self, manager, value):
        setattr(getattr(manager, self.part), self.name, value)


class BanManager:
    """Decides bans in memory, mirrors them to `state` and `kernel` on flush()."""

    kernel = _OnPart("kernel_queue")   # the ban sets (a policy reload may swap them)
    writer = _OnPart("queue")          # the state writer's thread, or None

    def __init__(self, settings, state, kernel, clock=time.time, writer=None, history_ahead=None):
        """history_ahead: read which networks have a ban history on a thread now, so
        that first offenders cost no query (None: if there is a writer thread, i.e.
        for the daemon; a CLI's short-lived manager does not need it)."""
        self.state = state
        self.clock = clock
        # What the next state write must hold, and the batches on their way.
        self.queue = StateQueue(state, writer,
                                history_ahead=writer is not None if history_ahead is None
                                else history_ahead)
        self.kernel_queue = KernelQueue(kernel)
        self.window = FailureWindow(settings, self.queue.failures)
        self.book = BanBook(settings, state, self.queue, self.kernel_queue)
        self.settings = settings
        now = clock()
        self.book.load(state.load_bans(now))
        self.window.load((key_from_blob(data), when, name) for data, when, name
                         in state.load_failures(now - settings.findtime))
        self._lift_protected()

    # Counters the daemon's status and metrics read.

    @property
    def failures_total(self):
        return self.window.failures_total

    @property
    def ignored_total(self):
        return self.window.ignored_total

    @property
    def bans_total(self):
        return self.book.bans_total

    def reconfigure(self, settings):
        """Take new settings (a policy reload); bans now on the ignore list are lifted
        (queued; the caller flushes). Every other ban and all history are kept."""
        self.settings = self.book.settings = settings
        self.window.configure(settings)
        return self._lift_protected()

    def _lift_protected(self):
        """Lift bans that cover a protected address: the ignore list may have grown
        since they were made. Returns the lifted bans."""
        lifted = [(key, entry) for key, entry in self.book.active.items()
                  if self.window.overlaps_protected(key)]
        now = self.clock()
        for key, _entry in lifted:
            self.book.lift(key, now)
        bans = [_ban(key, entry) for key, entry in lifted]
        if lifted:
            log.warning("lifted %d ban(s) covering ignored addresses: %s", len(lifted),
                        sample(ban.network for ban in bans))
        return bans

    # The ban path.

    def record_failure(self, address, filter_name, when=None):
        """Count one failure from `address` at `when` (the log line's own time; None:
        now; a future time counts as now); returns the Ban it triggered, else None.
        Times may arrive out of order: the window counts failures by their time."""
        key = self.window.key_of(address, filter_name)
        if key is None or self.book.covering(key) is not None:
            return None
        now = self.clock()
        failures = self.window.count(key, filter_name, now, when)
        if failures is None:
            return None
        return _ban(key, self.book.start(key, None, failures, filter_name, "auto", now))

    def record_failures(self, failures):
        """record_failure for each (address, filter name, when), in order; returns the
        Bans made (NewBans). The flood path: the window counts the whole batch in one
        loop, then the book starts its bans with their histories read in one query."""
        now = self.clock()
        due = self.window.count_many(failures, now, self.book.active, self.book.prefixlens)
        return NewBans(self.book.start_auto(due, now) if due else [])

    def flush(self, write_state=True):
        """Push queued changes to the kernel (one add, one remove call), then write
        them to state (one transaction); returns how many kernel changes were pushed.

        The kernel goes first: enforcement is what the ban latency is measured
        by, and a ban the kernel has but the file lacks still expires by itself.
        write_state=False leaves the state queue for a later flush: in a flood,
        one transaction per few hundred ms instead of one per slice of lines
        (SQLite rewrites every page a transaction touches, and random keys
        touch a page per row)."""
        pushed = self.kernel_queue.push(self.clock())
        if write_state:
            self.write_state()
        return pushed

    # Manual operations; the caller flushes.

    def ban(self, network_or_address, duration=None, reason="manual", filter_name=None):
        """Ban a network or address for `duration` seconds (None: the escalated bantime)."""
        network_ = as_network(network_or_address)
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int)
                                     or not 0 < duration <= MAX_MANUAL_BAN):
            raise InputError(f"ban duration must be 1 to {MAX_MANUAL_BAN} seconds, not {duration!r}",
                             key="duration")
        if network_.prefixlen < MIN_BAN_PREFIX[network_.version]:
            raise InputError(f"refusing to ban {network_}: shorter than "
                             f"/{MIN_BAN_PREFIX[network_.version]}; put networks that large in a "
                             "service's deny list", key="address")
        for protected in self.window.protected:
            if network_.version == protected.version and network_.overlaps(protected):
                what = "loopback" if protected in LOOPBACK else "on the ignore list"
                raise InputError(f"refusing to ban {network_}: {protected} is {what}", key="address")
        key = network_key(network_)
        covering = self.book.covering(key)
        if covering is not None and covering != key:
            raise InputError(f"{network_} is already inside the ban on {network(covering)}",
                             key="address")
        inside = self.book.inside(key)
        if inside:
            # The kernel's interval sets refuse overlapping elements, and one
            # refused element would fail every later flush batch.
            raise InputError(f"{network_} would overlap the ban on {inside[0]}; unban it first",
                             key="address")
        self.window.forget(key)
        return _ban(key, self.book.start(key, duration, 0, filter_name, reason, self.clock()))

    def protects(self, network_or_address):
        """True if banning this network would cover loopback or an ignored address."""
        return self.window.overlaps_protected(network_key(as_network(network_or_address)))

    def covering(self, network_or_address):
        """The active Ban that covers this network (itself included), or None."""
        key = self.book.covering(network_key(as_network(network_or_address)))
        return None if key is None else _ban(key, self.book.active[key])

    def unban(self, network_or_address):
        """Lift the ban on this network, or the ban covering this address (for an
        IPv6 address usually its /64). Returns the network lifted, or None."""
        key = self.book.covering(network_key(as_network(network_or_address)))
        if key is None:
            return None
        self.book.lift(key, self.clock())
        return network(key)

    # Housekeeping.

    def expire(self, write_state=True):
        """Forget bans whose time has passed (the kernel expires its own elements)
        and failures older than findtime; writes that to state now, unless
        write_state is False (a later flush writes it)."""
        now = self.clock()
        expired = [_ban(key, entry) for key, entry in self.book.expire(now)]
        self.queue.prune_before = self.window.expire(now)
        if write_state:
            self.write_state()
        return expired

    def active(self):
        """Bans in force now, soonest expiry first."""
        return active_in(self.snapshot(), self.clock())

    def snapshot(self):
        """The ban book as it is now, for active_in() on another thread: a copy of
        immutable pairs, a few ms for 100k bans where building them all takes 1 s."""
        return list(self.book.active.items())

    def restore(self, flush_ipv6=False, with_tables=None):
        """Push every active ban to the kernel with its remaining time, in one batch.

        For a restart or a kernel whose tables were flushed by someone else;
        flush_ipv6 after bans.ipv6_prefix changed (the kernel's IPv6 elements
        are replaced, atomically); with_tables(bans): the tables are gone, and
        it loads them with these bans in one transaction. Raises what the
        kernel raises; returns the number of bans pushed."""
        now = self.clock()
        additions = self._in_force(now)
        if with_tables is not None:
            with_tables(additions)
        elif flush_ipv6:
            self.kernel.add_ban_keys(additions, flush_ipv6=True)
        elif additions:
            self.kernel.add_ban_keys(additions)
        self.kernel_queue.clear_adds()
        log.info("restored %d ban(s) to the kernel", len(additions))
        return len(additions)

    def reconcile(self):
        """Re-add, in one batch, active bans the kernel does not have; returns how many."""
        now = self.clock()
        present = self.kernel.list_ban_keys()
        missing = [item for item in self._in_force(now) if item[0] not in present]
        if missing:
            self.kernel.add_ban_keys(missing)
            self.kernel_queue.added(key for key, _seconds in missing)
            log.warning("kernel lacked %d ban(s), re-added: %s", len(missing),
                        sample(network(key) for key, _seconds in missing))
        return len(missing)

    def _in_force(self, now):
        """[(key, seconds left)] of the bans in force at `now`."""
        return in_force(self.book.active.items(), now)

    def in_force_now(self):
        """_in_force for another thread (the worker putting flushed tables back):
        read from a snapshot(), as the main thread may change the book meanwhile."""
        return in_force(self.snapshot(), self.clock())

    @property
    def active_count(self):
        return len(self.book.active)

    # The state queue's side of the ban manager's API (the daemon's loop drives it).

    def queue_position(self, key, position):
        """Store a log position with the next state write (with the failures before it)."""
        self.queue.positions[key] = position

    def state_pending(self):
        return self.queue.pending()

    def write_state(self, max_rows=None, backlog=False):
        return self.queue.write(max_rows, backlog)

    def state_written(self, batches):
        self.queue.written(batches)

    def state_in_flight(self):
        return self.queue.in_flight()


def in_force(items, now):
    """[(key, seconds left)] of the (key, entry) items in force at `now`."""
    return [(key, timeout(entry[0], now)) for key, entry in items if entry[0] > now]


def active_in(snapshot, now):
    """The Bans of a snapshot() in force at `now`, soonest expiry first."""
    return sorted((_ban(key, entry) for key, entry in snapshot if entry[0] > now),
                  key=lambda ban: (ban.expires_at, ban.network.version, ban.network))


def _ban(key, entry):
    return Ban(network(key), *entry)
