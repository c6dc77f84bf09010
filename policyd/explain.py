"""Answer "what happens to SRC on PORT?" from the policy alone, plus live bans.

Mirrors the order of the compiled rules: a ban first, then the service that
guards the port, then its allow entries in order, then its action.
"""
import fnmatch
from dataclasses import dataclass

from policyd.compile import ban_ports


@dataclass(frozen=True)
class Decision:
    verdict: str  # allow | drop | reject | banned
    rule: str


def decide(policy, address, port, proto="tcp", iface=None, bans=()):
    """The verdict for a new connection from `address` to `port`.

    `bans` is an iterable of (network, seconds left) from the ban table. A ban
    drops only what the ban rules match: their port sets are per protocol.
    """
    if port in ban_ports(policy)[proto]:
        for network, left in bans:
            if address in network:
                return Decision("banned", f"ban on {network} ({left}s left), bans.ports ({proto})")
    for service in policy.services:
        if service.proto == proto and port in service.ports:
            return _service_decision(service, address, iface)
    return Decision("allow", f"{proto} port {port} is not guarded by any service")


def _service_decision(service, address, iface):
    key = f"services.{service.name}"
    if service.allow_any:
        return Decision("allow", f"{key}.allow: any")
    networks = service.allow4 if address.version == 4 else service.allow6
    for network in networks:
        if address in network:
            return Decision("allow", f"{key}.allow: {network}")
    if iface is not None:
        for pattern in service.allow_interfaces:
            if fnmatch.fnmatchcase(iface, pattern):
                return Decision("allow", f"{key}.allow: iface {pattern}")
    suffix = ""
    if service.allow_interfaces and iface is None:
        suffix = f" (unless it arrives on {', '.join(service.allow_interfaces)})"
    return Decision(service.action, f"{key}.action: {service.action}{suffix}")
