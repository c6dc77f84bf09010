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
    listed = _listed(address, service.deny4 if address.version == 4 else service.deny6,
                     service.deny_lists)
    if listed is not None:
        return Decision("drop", f"{key}.deny: {listed}")
    if service.allow_any:
        return Decision("allow", f"{key}.allow: any")
    listed = _listed(address, service.allow4 if address.version == 4 else service.allow6,
                     service.allow_lists)
    if listed is not None:
        return Decision("allow", f"{key}.allow: {listed}")
    if iface is not None:
        for pattern in service.allow_interfaces:
            if fnmatch.fnmatchcase(iface, pattern):
                return Decision("allow", f"{key}.allow: iface {pattern}")
    suffix = ""
    if service.allow_interfaces and iface is None:
        suffix = f" (unless it arrives on {', '.join(service.allow_interfaces)})"
    return Decision(service.action, f"{key}.action: {service.action}{suffix}")


def _listed(address, networks, netlists):
    """Which entry holds `address`: a policy network, or "FILE:LINE (network)"; None."""
    for network in networks:
        if address in network:
            return str(network)
    for netlist in netlists:
        found = netlist.find(address)
        if found is not None:
            return f"{netlist.path}:{found[1]} ({found[0]})"
    return None
