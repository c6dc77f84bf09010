"""Fakes the unit tests share: a clock, the kernel's ban table, the kernel's
ruleset (enough of nftables to run compiled documents), log positions in memory."""
import copy
import ipaddress
from dataclasses import dataclass

from policyd.errors import KernelError


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
    """Same attribute names as policy.BanSettings; bans.py only reads them."""
    ports: tuple = (11434,)
    maxretry: int = 5
    findtime: int = 600
    bantime: int = 3600
    bantime_max: int = 604800
    ipv6_prefix: int = 64
    ignore: tuple = ()
    logs: tuple = ()


class MemoryPositions:
    """A log PositionStore in a dict (policyd.state.State is the daemon's)."""

    def __init__(self):
        self._positions = {}

    def load(self, path):
        position = self._positions.get(path)
        return dict(position) if position is not None else None

    def save(self, path, position):
        self._positions[path] = dict(position)


class FakeBanKernel:
    """The ban table (policyd.nft.BanTable): records each call as one batch and keeps
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

    def add_ban_keys(self, items):
        self.add_bans([(ipaddress.ip_network((number, prefixlen)), timeout)
                       for (_version, number, prefixlen), timeout in items])

    def list_ban_keys(self):
        return {(n.version, int(n.network_address), n.prefixlen) for n in self.list_bans()}


class FakeNft:
    """Enough of nftables to run compiled documents: tables, sets with expiring
    elements, chains; one load is all or nothing, like one transaction.

    `timers=False` models a kernel whose trial element never expires, so only
    the daemon's deadline can end a trial.
    """

    def __init__(self, clock, timers=True):
        self.clock = clock
        self.timers = timers
        self.tables = {}
        self.loads = []
        self.refuse = None  # a message: the next load fails with it
        self.before_load = None  # called with the document before it is applied

    def load(self, document):
        if self.before_load:
            self.before_load(document)
        if self.refuse:
            message, self.refuse = self.refuse, None
            raise KernelError(message)
        tables = copy.deepcopy(self.tables)
        for command in document["nftables"]:
            (verb, body), = command.items()
            if verb != "metainfo":
                self._run(tables, verb, body)
        self.tables = tables
        self.loads.append(document)

    def _run(self, tables, verb, body):
        (kind, obj), = body.items()
        name = obj.get("table", obj.get("name"))
        if kind == "table":
            if verb == "add":
                tables.setdefault(obj["name"], {"sets": {}, "chains": set()})
            elif verb == "delete":
                if obj["name"] not in tables:
                    raise KernelError("No such file or directory")
                del tables[obj["name"]]
            return
        table = tables.get(name)
        if table is None:
            raise KernelError(f"No such file or directory: table {name}")
        if kind == "set" and verb == "add":
            table["sets"].setdefault(obj["name"], {})
        elif kind == "set" and verb == "flush":
            table["sets"][obj["name"]].clear()
        elif kind == "chain" and verb == "add":
            table["chains"].add(obj["name"])
        elif kind == "element":
            elements = table["sets"].get(obj["name"])
            if elements is None:
                raise KernelError("No such file or directory: set")
            self._expire(elements)
            for elem in obj["elem"]:
                value, timeout = elem, None
                if isinstance(elem, dict) and "elem" in elem:
                    value, timeout = elem["elem"]["val"], elem["elem"].get("timeout")
                if verb == "add":
                    elements[value] = None if timeout is None else self.clock.now + timeout
                elif verb == "delete":
                    if value not in elements:
                        raise KernelError("Could not process rule: No such file or directory")
                    del elements[value]

    def _expire(self, elements):
        if not self.timers:
            return
        for value, expiry in list(elements.items()):
            if expiry is not None and expiry <= self.clock.now:
                del elements[value]

    def set_elements(self, table, name):
        try:
            elements = self.tables[table]["sets"][name]
        except KeyError:
            raise KernelError("No such file or directory") from None
        self._expire(elements)
        return [(value, None if expiry is None else 0,
                 None if expiry is None else int(expiry - self.clock.now))
                for value, expiry in elements.items()]

    def active_services(self, table="policyd"):
        """Service names the kernel enforces now, from the chains and the trial set."""
        chains = self.tables[table]["chains"]
        slot = "committed"
        if "trial" in self.tables[table]["sets"] and self.set_elements(table, "trial"):
            slot = "candidate"
        prefix = f"{slot}_svc_"
        return sorted(c[len(prefix):] for c in chains if c.startswith(prefix))
