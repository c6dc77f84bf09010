"""A packet's way through a Ruleset as the kernel takes it: base chains of every
table in priority order, rules in order, goto and jump, set lookups.

Covers exactly the expressions the compiler emits, for a new connection on the
input hook; anything else raises, so explain can never quietly disagree with
the kernel about a rule it does not understand.
"""
import ipaddress
from dataclasses import dataclass

VERDICTS = ("accept", "drop", "reject")


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection: from `source` to `port` over `proto`,
    arriving on interface `iif` (None: not known, so no interface rule matches)."""
    source: object          # ipaddress.IPv4Address | IPv6Address
    port: int
    proto: str = "tcp"
    iif: str | None = None


@dataclass(frozen=True)
class Outcome:
    verdict: str            # accept | drop | reject
    table: str | None       # where it was decided; None: no table had a say
    chain: object           # the ruleset.Chain last walked (its end, if rule is None)
    rule: object            # the ruleset.Rule that decided, or None (a chain's policy)
    element: object         # what a set lookup in that rule matched, or None


class _NoMatch(Exception):
    """The packet has no such field (a TCP match on a UDP packet): the rule does not apply."""


def walk(ruleset, packet, contents=None, hook="input"):
    """The verdict of `ruleset` on `packet`. `contents(table, set_name)` may give a
    set's elements where the model has none to give (the ban sets: the kernel's);
    it returns None to keep the model's."""
    base = []
    for order, table in enumerate(ruleset.tables.values()):
        for chain in table.base_chains(hook):
            base.append((chain.fields.get("prio", 0), order, table, chain))
    last = Outcome("accept", None, None, None, None)
    for _prio, _order, table, chain in sorted(base, key=lambda item: item[:2]):
        outcome = _run(table, chain, packet, contents)
        if outcome.verdict != "accept":
            return outcome
        last = outcome  # accepted here: the next table's base chains still see it
    return last


def _run(table, chain, packet, contents, depth=0):
    if depth > 16:
        raise ValueError(f"chain {chain.name}: jumps nest too deep")
    for rule in chain.rules:
        element, verdict = _evaluate(table, rule, packet, contents)
        if verdict is None:
            continue
        kind, target = verdict
        if kind in VERDICTS:
            return Outcome(kind, table.name, chain, rule, element)
        inner = _run(table, table.chains[target], packet, contents, depth + 1)
        if kind == "goto" or inner.rule is not None:
            return inner
        # A jump whose chain ended without a verdict comes back here.
    return Outcome(chain.fields.get("policy", "accept"), table.name, chain, None, None)


def _evaluate(table, rule, packet, contents):
    """(matched element or None, (verdict kind, goto/jump target) or None)."""
    element = None
    try:
        for expr in rule.exprs:
            (kind, body), = expr.items()
            if kind == "match":
                found = _match(table, body, packet, contents)
                if found is False:
                    return None, None
                if found is not True:
                    element = found
            elif kind in ("set", "limit"):
                # `update @set { ... limit rate over N }`: one new connection is
                # never over a rate, so the rule stops here.
                if _limit_of(body) is None:
                    raise ValueError(f"cannot walk statement {expr!r}")
                return None, None
            elif kind == "counter":
                continue
            elif kind in VERDICTS:
                return element, (kind, None)
            elif kind in ("goto", "jump"):
                return element, (kind, body["target"])
            else:
                raise ValueError(f"cannot walk statement {kind}")
    except _NoMatch:
        return None, None
    return None, None  # no verdict: the rule only counts or updates


def _limit_of(body):
    if "rate" in body:
        return body
    for stmt in body.get("stmt", []):
        if "limit" in stmt:
            return stmt["limit"]
    return None


def _match(table, body, packet, contents):
    """True/False, or the set element that matched (which also means True)."""
    value = _field(body["left"], packet)
    right, op = body["right"], body["op"]
    if op == "!=":
        return not _holds(table, value, right, packet, contents)
    if op not in ("==", "in"):
        raise ValueError(f"cannot walk operator {op}")
    return _holds(table, value, right, packet, contents)


def _holds(table, value, right, packet, contents):
    if isinstance(right, str) and right.startswith("@"):
        name = right[1:]
        elements = contents(table.name, name) if contents else None
        if elements is None:
            elements = table.sets[name].elem
        found = _lookup(value, elements)
        return False if found is None else found
    if isinstance(right, dict) and "set" in right:
        return _lookup(value, right["set"]) is not None
    return _lookup(value, [right]) is not None


def _field(left, packet):
    if "&" in left:
        inner, mask = left["&"]
        address = _field(inner, packet)
        return ipaddress.ip_address(int(address) & int(ipaddress.ip_address(mask)))
    if "payload" in left:
        protocol, name = left["payload"]["protocol"], left["payload"]["field"]
        if protocol in ("tcp", "udp") and name == "dport":
            if packet.proto != protocol:
                raise _NoMatch
            return packet.port
        if protocol in ("ip", "ip6") and name == "saddr":
            if packet.source.version != (4 if protocol == "ip" else 6):
                raise _NoMatch
            return packet.source
    elif "meta" in left:
        key = left["meta"]["key"]
        if key == "l4proto":
            return packet.proto
        if key == "nfproto":
            return f"ipv{packet.source.version}"
        if key == "iifname":
            if packet.iif is None:
                raise _NoMatch
            return packet.iif
    elif "ct" in left:
        key = left["ct"]["key"]
        if key == "state":
            return "new"
        if key == "direction":
            return "original"
        if key == "status":
            return "none"   # on the input hook nothing was DNATed
        if key == "proto-dst":
            return packet.port
    raise ValueError(f"cannot walk expression {left!r}")


def _lookup(value, elements):
    """The element of `elements` holding `value`, or None."""
    find = getattr(elements, "find", None)  # policyd.policy.lists.Elements: asked, never built
    if find is not None and hasattr(value, "version"):
        return find(value)
    for element in elements:
        if isinstance(element, dict) and "elem" in element:
            element = element["elem"]["val"]
        if _holds_one(value, element):
            return element
    return None


def _holds_one(value, element):
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        if isinstance(element, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return value in element
        if isinstance(element, dict) and "prefix" in element:
            network = ipaddress.ip_network((element["prefix"]["addr"], element["prefix"]["len"]))
            return value in network
        if isinstance(element, dict) and "range" in element:
            low, high = (ipaddress.ip_address(x) for x in element["range"])
            return low.version == value.version and low <= value <= high
        if isinstance(element, str):
            other = ipaddress.ip_address(element)
            return other.version == value.version and other == value
        return False
    if isinstance(element, dict) and "range" in element:
        low, high = element["range"]
        return low <= value <= high
    if isinstance(value, str) and isinstance(element, str) and element.endswith("*"):
        return value.startswith(element[:-1])  # nft's only wildcard: a trailing *
    return value == element
