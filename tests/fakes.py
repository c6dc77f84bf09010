"""Fakes the unit tests share: a clock, the kernel's ban table, the kernel's
ruleset (the ruleset model's replay of each load), log positions in memory."""
import ipaddress
from dataclasses import dataclass

from policyd.errors import KernelError
from policyd.rules.model import Ruleset


class FakeClock:
    """A wall clock that moves only when told; call it for the time."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@dataclass(frozen=True)
class Settings:
    """Same attribute names as policymodel.BanSettings; bans.py only reads them."""
    ports: tuple = (11434,)
    maxretry: int = 5
    findtime: int = 600
    bantime: int = 3600
    bantime_max: int = 604800
    ipv6_prefix: int = 64
    ignore: tuple = ()
    logs: tuple = ()


class MemoryPositions:
    """A log PositionStore in a dict (policyd.banning.state.State is the daemon's)."""

    def __init__(self):
        self._positions = {}

    def load(self, path):
        position = self._positions.get(path)
        return dict(position) if position is not None else None

    def save(self, path, position):
        self._positions[path] = dict(position)


class FakeBanKernel:
    """The ban table (policyd.kernel.nft.BanTable): records each call as one batch and keeps
    elements with an expiry like the kernel."""

    def __init__(self, clock):
        self.clock = clock
        self.batches = []
        self.elements = {}
        self.failing = False

    def add_bans(self, bans):
        if self.failing:
            raise KernelError("netlink: Operation not permitted")
        self.batches.append(("add", list(bans)))
        for network, timeout in bans:
            self.elements[network] = self.clock() + timeout

    def remove_bans(self, networks):
        if self.failing:
            raise KernelError("netlink: Operation not permitted")
        self.batches.append(("remove", list(networks)))
        for network in networks:
            self.elements.pop(network, None)

    def list_bans(self):
        now = self.clock()
        return {n: round(end - now) for n, end in self.elements.items() if end > now}

    def replace_ban_keys(self, items):
        self.add_bans([(ipaddress.ip_network((number, prefixlen)), timeout)
                       for (_version, number, prefixlen), timeout in items])

    def add_ban_keys(self, items, flush_ipv6=False):
        if flush_ipv6:
            self.batches.append(("flush6", []))
            self.elements = {n: end for n, end in self.elements.items() if n.version == 4}
        self.add_bans([(ipaddress.ip_network((number, prefixlen)), timeout)
                       for (_version, number, prefixlen), timeout in items])

    def list_ban_keys(self):
        return {(n.version, int(n.network_address), n.prefixlen) for n in self.list_bans()}


class FakeNft:
    """nftables for the trial tests: each load runs on the tables the earlier loads
    left, through the ruleset model's replay (policyd.rules.model) with the kernel's
    strictness, all or nothing like one transaction; elements with a timeout
    expire on the fake clock.

    `timers=False` models a kernel whose trial element never expires, so only
    the daemon's deadline can end a trial.
    """

    def __init__(self, clock, timers=True):
        self.clock = clock
        self.timers = timers
        self.model = Ruleset()
        self.expiry = {}  # (table, set, element value) -> when its timeout ends
        self.loads = []
        self.ban_loads = []  # (index into loads, ban table, ipv6 prefix, bans) of a load with bans
        self.refuse = None  # a message: the next load fails with it
        self.before_load = None  # called with the document before it is applied

    @property
    def tables(self):
        return self.model.tables

    def load(self, document, bans=None):
        if self.before_load:
            self.before_load(document)
        if self.refuse:
            message, self.refuse = self.refuse, None
            raise KernelError(message)
        self._expire()
        try:
            model = Ruleset.replay(document, onto=self.model, strict=True)
        except LookupError as exc:
            raise KernelError(f"Could not process rule: No such file or directory ({exc})") from None
        for command in document["nftables"]:
            (verb, body), = command.items()
            obj = body.get("element") if isinstance(body, dict) else None
            if verb == "add" and obj is not None:
                for elem in obj["elem"]:
                    if isinstance(elem, dict) and "timeout" in elem.get("elem", {}):
                        key = (obj["table"], obj["name"], elem["elem"]["val"])
                        self.expiry[key] = self.clock.now + elem["elem"]["timeout"]
        self.model = model
        self.loads.append(document)
        if bans is not None:
            self.ban_loads.append((len(self.loads) - 1, bans.table, bans.ipv6_prefix, bans.items))

    def _expire(self):
        if not self.timers:
            return
        for (table, name, value), ends in list(self.expiry.items()):
            if ends > self.clock.now:
                continue
            del self.expiry[(table, name, value)]
            found = self.model.tables.get(table)
            if found is not None and name in found.sets:
                found.sets[name].elem = [e for e in found.sets[name].elem
                                         if (e["elem"]["val"] if isinstance(e, dict) else e) != value]

    def set_elements(self, table, name):
        self._expire()
        try:
            elements = self.model.tables[table].sets[name].elem
        except KeyError:
            raise KernelError("No such file or directory") from None
        out = []
        for elem in elements:
            value = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
            ends = self.expiry.get((table, name, value))
            out.append((value, None if ends is None else 0,
                        None if ends is None else int(ends - self.clock.now)))
        return out

    def skeleton(self, table):
        """What policyd.kernel.nfnetlink reports cheaply: chains with rule counts, set names."""
        return self.model.skeleton(table)

    def active_services(self, table="policyd"):
        """Service names the kernel enforces now, from the chains and the trial set."""
        found = self.model.tables[table]
        slot = "committed"
        if "trial" in found.sets and self.set_elements(table, "trial"):
            slot = "candidate"
        prefix = f"{slot}_svc_"
        return sorted(c[len(prefix):] for c in found.chains if c.startswith(prefix))
