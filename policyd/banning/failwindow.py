"""The failure window (fail2ban's FailManager): which network a failure counts
against (loopback and the ignore list never, IPv6 by prefix), the failures of each
network within findtime by the lines' own times, and which networks reach maxretry.
"""
import bisect
import ipaddress
from collections import Counter, deque
from operator import itemgetter

from policyd.banning.bankeys import MASKS, key as network_key, key_range

# Loopback is never banned, whatever the policy says: banning it cuts the
# proxy off from the service it fronts.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

_V4, _V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


class FailureWindow:
    """Failure times per network key, oldest first. `unwritten` is the state queue's
    key -> [(time, filter)] of failures not yet written: a network that reaches
    maxretry leaves both, since its ban starts the count afresh."""

    def __init__(self, settings, unwritten):
        self.unwritten = unwritten
        self.times: dict[tuple, list[float]] = {}
        # (a time, [keys]): one entry per batch of windows opened together, so
        # expire() can find windows that went quiet. Not one per failure: a flood
        # of 300k lines would keep 300k entries for findtime.
        self.order: deque[tuple[float, list]] = deque()
        self.failures_total: Counter = Counter()   # per filter, every failure seen
        self.ignored_total: Counter = Counter()    # per filter, from loopback/ignored sources
        self.configure(settings)

    def configure(self, settings):
        self.findtime, self.maxretry = settings.findtime, settings.maxretry
        self.protected = LOOPBACK + tuple(settings.ignore)
        # Per version: [(first, last)] as ints, checked for every failure.
        self._ranges = {4: [], 6: []}
        for network in self.protected:
            version, first, last = key_range(network_key(network))
            self._ranges[version].append((first, last))
        self._prefix6 = settings.ipv6_prefix
        self._mask6 = MASKS[6, self._prefix6]
        self._hostmask6 = self._mask6 ^ MASKS[6, 128]

    def overlaps_protected(self, key):
        version, first, last = key_range(key)
        return any(low <= last and first <= high for low, high in self._ranges[version])

    def key_of(self, address, filter_name):
        """The key this failure counts against, or None if it never counts."""
        self.failures_total[filter_name] += 1
        key = self._key(address)
        if key is None:
            self.ignored_total[filter_name] += 1
        return key

    def _key(self, address):
        number = int(address)
        if address.version == 4 or number >> 32 == 0xFFFF:
            number &= 0xFFFFFFFF  # IPv4, or IPv4-mapped (::ffff:0:0/96) counted as IPv4
            for low, high in self._ranges[4]:
                if low <= number <= high:
                    return None
            return (4, number, 32)
        first = number & self._mask6
        key = (6, first, self._prefix6)
        for low, high in self._ranges[6]:
            if low <= number <= high:
                return None
            if low <= first | self._hostmask6 and first <= high:
                key = (6, number, 128)  # its /prefix would cover a protected network
        return key

    def load(self, rows):
        """(key, time, filter) rows from state, oldest first."""
        for key, when, _filter_name in rows:
            times = self.times.get(key)
            if times is None:
                times = self.times[key] = []
                self.order.append((when, [key]))
            times.append(when)

    def count(self, key, filter_name, now, when=None):
        """Count one failure of `key` at `when` (None or future: now); the number of
        failures in its window if that reached maxretry (the window is then
        forgotten: the caller bans), else None."""
        cutoff = now - self.findtime
        when = now if when is None or when > now else when
        if when < cutoff:
            return None  # older than the window: it cannot help any ban now
        times = self.times.get(key)
        if times is None:
            times = self.times[key] = []
            self.order.append((now, [key]))
        while times and times[0] < cutoff:
            times.pop(0)
        bisect.insort(times, when)
        self.unwritten.setdefault(key, []).append((when, filter_name))
        if len(times) < self.maxretry:
            return None
        self.forget(key)
        return len(times)

    def count_many(self, failures, now, active, prefixlens):
        """count() for each (address, filter name, when), in order, skipping networks
        inside an active ban (`active`, `prefixlens`: the ban book's). Returns
        {key: (filter name, failures)} of the networks that reached maxretry, in
        order. The flood path: one loop with everything in locals (300k calls)."""
        failures = list(failures)
        self.failures_total.update(map(itemgetter(1), failures))
        ranges4, ranges6 = self._ranges[4], self._ranges[6]
        # The span from the lowest protected address to the highest, per version:
        # a network clear of it is clear of every protected range (most are).
        low4, high4 = _span(ranges4)
        low6, high6 = _span(ranges6)
        mask6, hostmask6, prefix6 = self._mask6, self._hostmask6, self._prefix6
        cutoff = now - self.findtime
        maxretry = self.maxretry
        window, unwritten = self.times, self.unwritten
        # Prefixes shorter than a key's own that a ban could cover it with: mostly none.
        shorter4 = sorted(p for p in prefixlens[4] if p < 32)
        shorter6 = sorted(p for p in prefixlens[6] if p < prefix6)
        shorter128 = sorted(p for p in prefixlens[6] if p < 128)
        due, opened = {}, []
        last_stamp = (None, None)
        for address, filter_name, when in failures:
            number = address._ip  # int(address), without a Python-level call per failure
            if (address.__class__ is _V6 or (address.__class__ is not _V4 and address.version == 6)) \
                    and number >> 32 != 0xFFFF:
                first = number & mask6
                key = (6, first, prefix6)
                last = first | hostmask6
                shorter = shorter6
                if first <= high6 and low6 <= last:
                    for low, high in ranges6:
                        if low <= number <= high:
                            key = None
                            break
                        if low <= last and first <= high:
                            key = (6, number, 128)  # its /prefix would cover a protected network
                            shorter = shorter128
                    if key is None:
                        self.ignored_total[filter_name] += 1
                        continue
            else:
                number &= 0xFFFFFFFF  # IPv4, or IPv4-mapped IPv6 counted as IPv4
                key = (4, number, 32)
                if low4 <= number <= high4:
                    for low, high in ranges4:
                        if low <= number <= high:
                            key = None
                            break
                    if key is None:
                        self.ignored_total[filter_name] += 1
                        continue
                shorter = shorter4
            if when is None or when >= now:
                when = now  # no time on the line, or one in the future: now
            elif when < cutoff:
                continue  # older than the window: it cannot help any ban now
            if key in active or key in due:
                continue
            if shorter and _covered(key, shorter, active):
                continue
            times = window.get(key)
            if times is None:
                times = window[key] = [when]
                opened.append(key)
            else:
                if times[0] < cutoff:
                    while times and times[0] < cutoff:
                        times.pop(0)
                if not times or when >= times[-1]:
                    times.append(when)
                else:
                    bisect.insort(times, when)  # the line's own time; lines may be out of order
            if len(times) >= maxretry:
                due[key] = (filter_name, len(times))
                del window[key]
                unwritten.pop(key, None)
                continue
            stamp = last_stamp
            if when != stamp[0] or filter_name != stamp[1]:
                # Shared by the failures of one second: a flood's lines carry few times.
                stamp = last_stamp = (when, filter_name)
            queued = unwritten.get(key)
            if queued is None:
                unwritten[key] = [stamp]
            else:
                queued.append(stamp)
        if opened:
            self.order.append((now, opened))
        return due

    def forget(self, key):
        """A ban starts the count afresh: drop this network's failures, queued and in
        memory. Stored ones stay until findtime prunes them: the ban's history row
        (last_end) makes State.load_failures skip them, which costs no per-key
        delete in a flood of 100k bans."""
        self.times.pop(key, None)
        self.unwritten.pop(key, None)

    def expire(self, now):
        """Forget failures older than findtime; returns the cutoff."""
        cutoff = now - self.findtime
        order = self.order
        while order and order[0][0] < cutoff:
            _when, keys = order.popleft()
            for key in keys:
                times = self.times.get(key)
                if times is None:
                    continue  # banned or forgotten since
                while times and times[0] < cutoff:
                    times.pop(0)
                if times:
                    order.append((times[0], [key]))  # still open: look again when it is due
                else:
                    del self.times[key]
        return cutoff


def _span(ranges):
    """(lowest first, highest last) of [(first, last)]; an empty span if none."""
    if not ranges:
        return 1, 0
    return min(first for first, _last in ranges), max(last for _first, last in ranges)


def _covered(key, shorter, active):
    """Whether an active ban with one of the `shorter` prefix lengths covers `key`."""
    version, number, prefixlen = key
    for ban_prefixlen in shorter:
        if ban_prefixlen >= prefixlen:
            return False  # ascending: the rest are no shorter
        if (version, number & MASKS[version, ban_prefixlen], ban_prefixlen) in active:
            return True
    return False
