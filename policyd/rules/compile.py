"""Compile a Policy into the ruleset model (policyd.rules.model): a pure, deterministic
function. Its transaction is what the kernel loads; every other reader of the
ruleset (show, drift, doctor, explain, the tests' fake kernel) reads the model.

The guard table is replaced whole (add, delete, add) so a load is atomic; the
ban table is only created if missing and has its port sets and rules refreshed,
so its ban sets, and the bans in them, survive every apply. Each rule carries
`why`: which part of the policy it stands for, for explain (policyd.operator.explain).
"""
import ipaddress

from policyd.policy import lists
from policyd.rules.model import Ruleset

COMMITTED = "committed"
CANDIDATE = "candidate"
TRIAL_SET = "trial"
# Ban sets: hash sets for single IPv4 addresses and IPv6 /ipv6_prefix networks
# (what automatic bans make: the fast path), interval sets for every other range.
BAN_SETS = {4: "ban4", 6: "ban6"}
RANGE_BAN_SETS = {4: "ban4_range", 6: "ban6_range"}
# Dynamic sets behind `rate:` forget a quiet source after this long.
RATE_SET_TIMEOUT = 60
RATE_SET_SIZE = 65535
SADDR = {4: {"payload": {"protocol": "ip", "field": "saddr"}},
         6: {"payload": {"protocol": "ip6", "field": "saddr"}}}


def compile_policy(committed, candidate=None, trial_seconds=None, into=None):
    """The Ruleset that loads `committed`, and `candidate` on trial if given.

    With a candidate, the kernel runs the candidate while the trial set holds an
    element with `trial_seconds` of timeout, and the committed chains after it
    expires, with no process involved. `into`: a Ruleset whose commands come
    first in the same transaction (confirm's delete of the trial element).

    Interval sets carry their elements as lists.Elements: texts built when read,
    integers (`intervals`) for the netlink encoder.
    """
    if (candidate is None) != (trial_seconds is None):
        raise ValueError("a candidate needs trial_seconds and vice versa")
    table = committed.table
    if candidate is not None and candidate.table != table:
        raise ValueError("a trial cannot change the table name")
    ruleset = into if into is not None else Ruleset()
    _replace_guard_table(ruleset, table, committed, candidate, trial_seconds)
    _refresh_ban_table(ruleset, candidate or committed)
    return ruleset


def _replace_guard_table(ruleset, table, committed, candidate, trial_seconds):
    # `add` first makes `delete` safe when the table does not exist yet.
    ruleset.add_table(table).delete_table(table).add_table(table)
    slots = [(COMMITTED, committed)]
    if candidate is not None:
        slots.append((CANDIDATE, candidate))
        protos = sorted({s.proto for s in candidate.services} | {s.proto for s in committed.services})
        ruleset.add_set(table, TRIAL_SET, type="inet_proto", flags=["timeout"])
        ruleset.add_elements(table, TRIAL_SET,
                             [{"elem": {"val": p, "timeout": trial_seconds}} for p in protos])
    for slot, policy in slots:
        _slot(ruleset, table, slot, policy)
    for hook in ("input", "forward"):
        ruleset.add_chain(table, hook, type="filter", hook=hook, prio=0, policy="accept")
        if candidate is not None:
            ruleset.add_rule(table, hook, _match({"meta": {"key": "l4proto"}}, "@" + TRIAL_SET),
                             {"goto": {"target": f"{CANDIDATE}_{hook}"}})
        ruleset.add_rule(table, hook, {"goto": {"target": f"{COMMITTED}_{hook}"}})


def _slot(ruleset, table, slot, policy):
    """Sets and chains for one policy, every name prefixed by its slot."""
    ruleset.add_chain(table, f"{slot}_input", why=("unguarded", None))
    ruleset.add_chain(table, f"{slot}_forward")
    for service in policy.services:
        chain = f"{slot}_svc_{service.name}"
        _service_objects(ruleset, table, slot, chain, service)
        ports = list(service.ports)
        dport = {"payload": {"protocol": service.proto, "field": "dport"}}
        ruleset.add_rule(table, f"{slot}_input",
                         _match(dport, ports[0] if len(ports) == 1 else {"set": ports}),
                         {"goto": {"target": chain}})
        # Docker publishes a port by DNAT, so its traffic crosses forward with the
        # container's port in the packet; the original destination port is the one
        # the policy names. Replies (direction reply) must pass untouched.
        for port in ports:
            ruleset.add_rule(table, f"{slot}_forward",
                             _match({"ct": {"key": "direction"}}, "original"),
                             _match({"ct": {"key": "status"}}, "dnat", op="in"),
                             _match({"meta": {"key": "l4proto"}}, service.proto),
                             _match({"ct": {"key": "proto-dst", "dir": "original"}}, port),
                             {"goto": {"target": chain}})


def _service_objects(ruleset, table, slot, chain, service):
    ruleset.add_chain(table, chain)
    rules = []  # (exprs, why): added after the sets they name
    # deny is consulted first: a listed source is dropped whatever allow says.
    for version, networks in ((4, service.deny4), (6, service.deny6)):
        elements = lists.lazy_elements(version, networks, service.deny_lists)
        if elements:
            name = f"{slot}_{service.name}_deny{version}"
            ruleset.add_set(table, name, type=f"ipv{version}_addr", flags=["interval"],
                            elem=elements)
            rules.append(([_match(SADDR[version], "@" + name), {"drop": None}],
                          ("deny", service)))
    if service.rate is not None:
        for version in (4, 6):
            name = f"{slot}_{service.name}_rate{version}"
            ruleset.add_set(table, name, type=f"ipv{version}_addr", flags=["timeout"],
                            timeout=RATE_SET_TIMEOUT, size=RATE_SET_SIZE)
            rules.append(([
                _match({"meta": {"key": "nfproto"}}, f"ipv{version}"),
                _match({"ct": {"key": "state"}}, "new", op="in"),
                {"set": {"op": "update", "elem": SADDR[version], "set": "@" + name,
                         "stmt": [{"limit": {"rate": service.rate.count,
                                             "burst": 2 * service.rate.count,
                                             "per": service.rate.per, "inv": True}}]}},
                {"drop": None}], ("rate", service)))
    if service.allow_any:
        rules.append(([{"accept": None}], ("allow any", service)))
    else:
        for version, networks in ((4, service.allow4), (6, service.allow6)):
            elements = lists.lazy_elements(version, networks, service.allow_lists)
            if not elements:
                continue
            name = f"{slot}_{service.name}_v{version}"
            ruleset.add_set(table, name, type=f"ipv{version}_addr", flags=["interval"],
                            elem=elements)
            rules.append(([_match(SADDR[version], "@" + name), {"accept": None}],
                          ("allow", service)))
        if service.allow_interfaces:
            names = list(service.allow_interfaces)
            rules.append(([_match({"meta": {"key": "iifname"}},
                                  names[0] if len(names) == 1 else {"set": names}),
                           {"accept": None}], ("allow iface", service)))
        rules.append((_refusal(service), ("action", service)))
    for exprs, why in rules:
        ruleset.add_rule(table, chain, *exprs, why=why)


def _refusal(service):
    if service.action == "drop":
        return [{"drop": None}]
    if service.proto == "tcp":
        return [{"reject": {"type": "tcp reset"}}]
    return [{"reject": {"type": "icmpx", "expr": "port-unreachable"}}]


def ban_ports(policy):
    """{"tcp": ports, "udp": ports} a banned source loses: every bans.ports port over
    TCP, over UDP only those a UDP service guards (the ban rules' port sets)."""
    udp = set()
    for service in policy.services:
        if service.proto == "udp":
            udp |= set(service.ports) & set(policy.bans.ports)
    return {"tcp": sorted(policy.bans.ports), "udp": sorted(udp)}


def _refresh_ban_table(ruleset, policy):
    """Create the ban table if missing; refresh its ports and rules, never its bans."""
    table = policy.bans_table
    ruleset.add_table(table)
    for version in (4, 6):
        ruleset.add_set(table, BAN_SETS[version], type=f"ipv{version}_addr", flags=["timeout"])
    for version in (4, 6):
        ruleset.add_set(table, RANGE_BAN_SETS[version], type=f"ipv{version}_addr",
                        flags=["interval", "timeout"])
    ports = ban_ports(policy)
    for proto in ("tcp", "udp"):
        name = f"{proto}_ports"
        ruleset.add_set(table, name, type="inet_service").flush_set(table, name)
        if ports[proto]:
            ruleset.add_elements(table, name, ports[proto])
    # Bans on IPv6 cover a whole prefix: the rule masks the source before the
    # lookup, so the set stays a plain hash of prefix addresses.
    v6_prefix = SADDR[6]
    if policy.bans.ipv6_prefix < 128:
        mask = ipaddress.IPv6Network(("::", policy.bans.ipv6_prefix)).netmask
        v6_prefix = {"&": [SADDR[6], str(mask)]}
    sources = [_match(SADDR[4], "@" + BAN_SETS[4]), _match(v6_prefix, "@" + BAN_SETS[6]),
               _match(SADDR[4], "@" + RANGE_BAN_SETS[4]),
               _match(SADDR[6], "@" + RANGE_BAN_SETS[6])]
    for hook in ("input", "forward"):
        # Priority below the guard table's: a banned source is dropped first.
        ruleset.add_chain(table, hook, type="filter", hook=hook, prio=-10, policy="accept")
        ruleset.flush_chain(table, hook)
        for proto in ("tcp", "udp"):
            if hook == "input":
                prefix = [_match({"payload": {"protocol": proto, "field": "dport"}},
                                 f"@{proto}_ports")]
            else:
                prefix = [_match({"ct": {"key": "direction"}}, "original"),
                          _match({"ct": {"key": "status"}}, "dnat", op="in"),
                          _match({"meta": {"key": "l4proto"}}, proto),
                          _match({"ct": {"key": "proto-dst", "dir": "original"}},
                                 f"@{proto}_ports")]
            for source in sources:
                ruleset.add_rule(table, hook, *prefix, source, {"drop": None}, why=("ban", None))


def _match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def delete_table(ruleset, name):
    """Delete one of policyd's tables in `ruleset`'s transaction (`add` first makes
    `delete` safe when the table is gone already)."""
    return ruleset.add_table(name).delete_table(name)
