"""Answer "what happens to SRC on PORT?" by walking the compiled ruleset in the
kernel's order (policyd.rules.walk), so the answer cannot disagree with nftables; the
rule that decides is named in the policy's words, plus live bans.
"""
from dataclasses import dataclass

from policyd.rules.compile import BAN_SETS, RANGE_BAN_SETS, compile_policy
from policyd.rules.walk import Packet, walk

_BAN_SETS = set(BAN_SETS.values()) | set(RANGE_BAN_SETS.values())


@dataclass(frozen=True)
class Decision:
    verdict: str  # allow | drop | reject | banned
    rule: str


def decide(policy, address, port, proto="tcp", iface=None, bans=()):
    """The verdict for a new connection from `address` to `port`.

    `bans` is an iterable of (network, seconds left) from the ban table.
    """
    return Explainer(policy).decide(address, port, proto, iface, bans)


class Explainer:
    """One policy compiled once and asked about many connections (the lockout lint)."""

    def __init__(self, policy):
        self.policy = policy
        self.ruleset = compile_policy(policy)

    def decide(self, address, port, proto="tcp", iface=None, bans=()):
        bans = dict(bans)
        bans_table = self.policy.bans_table

        def contents(table, name):
            # The ban sets are the kernel's to fill: the model has the rules only.
            return list(bans) if table == bans_table and name in _BAN_SETS else None

        packet = Packet(address, port, proto, iface)
        outcome = walk(self.ruleset, packet, contents)
        if outcome.table == bans_table and outcome.verdict == "drop":
            network = outcome.element
            return Decision("banned", f"ban on {network} ({bans[network]}s left), "
                                      f"bans.ports ({proto})")
        verdict = "allow" if outcome.verdict == "accept" else outcome.verdict
        why = outcome.rule.why if outcome.rule is not None else outcome.chain.why
        return Decision(verdict, _words(why, packet))


def _words(why, packet):
    kind, service = why
    if kind == "unguarded":
        return f"{packet.proto} port {packet.port} is not guarded by any service"
    key = f"services.{service.name}"
    if kind == "deny":
        return f"{key}.deny: {_listed(packet.source, service, 'deny')}"
    if kind == "allow any":
        return f"{key}.allow: any"
    if kind == "allow":
        return f"{key}.allow: {_listed(packet.source, service, 'allow')}"
    if kind == "allow iface":
        pattern = next(p for p in service.allow_interfaces if _iface_matches(packet.iif, p))
        return f"{key}.allow: iface {pattern}"
    if kind == "action":
        suffix = ""
        if service.allow_interfaces and packet.iif is None:
            suffix = f" (unless it arrives on {', '.join(service.allow_interfaces)})"
        return f"{key}.action: {service.action}{suffix}"
    raise ValueError(f"no words for a rule of kind {kind!r}")


def _iface_matches(name, pattern):
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def _listed(address, service, which):
    """Which entry holds `address`: the first policy network, or "FILE:LINE (network)"."""
    version = "4" if address.version == 4 else "6"
    for network in getattr(service, f"{which}{version}"):
        if address in network:
            return str(network)
    for netlist in getattr(service, f"{which}_lists"):
        found = netlist.find(address)
        if found is not None:
            return f"{netlist.path}:{found[1]} ({found[0]})"
    raise ValueError(f"the walk matched {address} in services.{service.name}.{which}, "
                     "the policy does not")
