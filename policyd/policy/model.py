"""The policy model: what a validated policy file says, as frozen dataclasses.

Owns the shape every other module reads (services, their allow and deny
networks, ban settings, log sources); policyd.policy.reader builds it from YAML.
"""
import ipaddress
from dataclasses import dataclass, field

from policyd.policy import lists
from policyd.fleet.config import FleetSettings


@dataclass(frozen=True)
class Rate:
    count: int
    per: str  # second | minute | hour | day


@dataclass(frozen=True)
class Service:
    name: str
    ports: tuple[int, ...]
    proto: str = "tcp"
    allow_any: bool = False
    allow4: tuple[ipaddress.IPv4Network, ...] = ()
    allow6: tuple[ipaddress.IPv6Network, ...] = ()
    allow_interfaces: tuple[str, ...] = ()
    action: str = "drop"
    rate: Rate | None = None
    allow_lists: tuple[lists.NetList, ...] = ()  # `- file: PATH` entries of allow
    deny4: tuple[ipaddress.IPv4Network, ...] = ()  # dropped before allow is consulted
    deny6: tuple[ipaddress.IPv6Network, ...] = ()
    deny_lists: tuple[lists.NetList, ...] = ()


@dataclass(frozen=True)
class LogSource:
    path: str | None            # a log file, or None for a journal source
    filter: str
    journal: str | None = None  # a systemd unit, matched on the journal's _SYSTEMD_UNIT
    mode: str | None = None     # fail2ban filters: the jail's `mode`
    journal_dir: str | None = None  # a journal directory other than the system's
    # Where the entry is written, so check and apply can name the line of a
    # filter that does not load or a path that cannot be followed.
    path_line: int | None = field(default=None, compare=False)
    filter_line: int | None = field(default=None, compare=False)

    @property
    def label(self):
        return self.path if self.path is not None else f"journal:{self.journal}"


@dataclass(frozen=True)
class BanSettings:
    ports: tuple[int, ...]
    maxretry: int = 5
    findtime: int = 600
    bantime: int = 3600
    bantime_max: int = 604800
    ipv6_prefix: int = 64
    ignore: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    logs: tuple[LogSource, ...] = ()


@dataclass(frozen=True)
class Policy:
    table: str
    services: tuple[Service, ...]
    bans: BanSettings
    source: str = "<policy>"
    digest: str = field(default="", compare=False)
    fleet: FleetSettings | None = None

    @property
    def bans_table(self):
        return self.table + "_bans"

    def guarded(self):
        """(proto, port) pairs that this policy guards."""
        return sorted({(s.proto, p) for s in self.services for p in s.ports})
