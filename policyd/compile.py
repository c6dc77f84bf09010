"""Compile a Policy into one nftables JSON document: a pure, deterministic function.

The guard table is replaced whole (add, delete, add) so a load is atomic; the
ban table is only created if missing and has its port sets and rules refreshed,
so its ban sets, and the bans in them, survive every apply.
"""
import ipaddress

from policyd import lists

FAMILY = "inet"
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


def compile_policy(committed, candidate=None, trial_seconds=None):
    """The transaction that loads `committed`, and `candidate` on trial if given.

    With a candidate, the kernel runs the candidate while the trial set holds an
    element with `trial_seconds` of timeout, and the committed chains after it
    expires, with no process involved.

    Interval sets carry their elements as lists.Elements: texts built when read,
    integers (`intervals`) for the netlink encoder.
    """
    if (candidate is None) != (trial_seconds is None):
        raise ValueError("a candidate needs trial_seconds and vice versa")
    table = committed.table
    if candidate is not None and candidate.table != table:
        raise ValueError("a trial cannot change the table name")
    active = candidate or committed
    commands = [{"metainfo": {"json_schema_version": 1}}]
    commands += _replace_guard_table(table, committed, candidate, trial_seconds)
    commands += _refresh_ban_table(active)
    return {"nftables": commands}


def _add(kind, **fields):
    return {"add": {kind: {"family": FAMILY, **fields}}}


def _replace_guard_table(table, committed, candidate, trial_seconds):
    # `add` first makes `delete` safe when the table does not exist yet.
    out = [_add("table", name=table), {"delete": {"table": {"family": FAMILY, "name": table}}},
           _add("table", name=table)]
    slots = [(COMMITTED, committed)]
    if candidate is not None:
        slots.append((CANDIDATE, candidate))
        protos = sorted({s.proto for s in candidate.services} | {s.proto for s in committed.services})
        out.append(_add("set", table=table, name=TRIAL_SET, type="inet_proto", flags=["timeout"]))
        out.append({"add": {"element": {
            "family": FAMILY, "table": table, "name": TRIAL_SET,
            "elem": [{"elem": {"val": p, "timeout": trial_seconds}} for p in protos]}}})
    for slot, policy in slots:
        out += _slot(table, slot, policy)
    for hook in ("input", "forward"):
        out.append(_add("chain", table=table, name=hook, type="filter", hook=hook,
                        prio=0, policy="accept"))
        if candidate is not None:
            out.append(_rule(table, hook, _match({"meta": {"key": "l4proto"}}, "@" + TRIAL_SET),
                             {"goto": {"target": f"{CANDIDATE}_{hook}"}}))
        out.append(_rule(table, hook, {"goto": {"target": f"{COMMITTED}_{hook}"}}))
    return out


def _slot(table, slot, policy):
    """Sets and chains for one policy, every name prefixed by its slot."""
    out = [_add("chain", table=table, name=f"{slot}_input"),
           _add("chain", table=table, name=f"{slot}_forward")]
    for service in policy.services:
        chain = f"{slot}_svc_{service.name}"
        out += _service_objects(table, slot, chain, service)
        ports = list(service.ports)
        dport = {"payload": {"protocol": service.proto, "field": "dport"}}
        out.append(_rule(table, f"{slot}_input",
                         _match(dport, ports[0] if len(ports) == 1 else {"set": ports}),
                         {"goto": {"target": chain}}))
        # Docker publishes a port by DNAT, so its traffic crosses forward with the
        # container's port in the packet; the original destination port is the one
        # the policy names. Replies (direction reply) must pass untouched.
        for port in ports:
            out.append(_rule(table, f"{slot}_forward",
                             _match({"ct": {"key": "direction"}}, "original"),
                             _match({"ct": {"key": "status"}}, "dnat", op="in"),
                             _match({"meta": {"key": "l4proto"}}, service.proto),
                             _match({"ct": {"key": "proto-dst", "dir": "original"}}, port),
                             {"goto": {"target": chain}}))
    return out


def _service_objects(table, slot, chain, service):
    out = [_add("chain", table=table, name=chain)]
    rules = []
    saddr = {4: {"payload": {"protocol": "ip", "field": "saddr"}},
             6: {"payload": {"protocol": "ip6", "field": "saddr"}}}
    # deny is consulted first: a listed source is dropped whatever allow says.
    for version, networks in ((4, service.deny4), (6, service.deny6)):
        networks = lists.disjoint_networks(version, networks, service.deny_lists)
        if networks:
            name = f"{slot}_{service.name}_deny{version}"
            out.append(_add("set", table=table, name=name, type=f"ipv{version}_addr",
                            flags=["interval"], elem=lists.set_elements(version, networks)))
            rules.append([_match(saddr[version], "@" + name), {"drop": None}])
    if service.rate is not None:
        for version in (4, 6):
            name = f"{slot}_{service.name}_rate{version}"
            out.append(_add("set", table=table, name=name, type=f"ipv{version}_addr",
                            flags=["timeout"], timeout=RATE_SET_TIMEOUT,
                            size=RATE_SET_SIZE))
            rules.append([
                _match({"meta": {"key": "nfproto"}}, f"ipv{version}"),
                _match({"ct": {"key": "state"}}, "new", op="in"),
                {"set": {"op": "update", "elem": saddr[version], "set": "@" + name,
                         "stmt": [{"limit": {"rate": service.rate.count,
                                             "burst": 2 * service.rate.count,
                                             "per": service.rate.per, "inv": True}}]}},
                {"drop": None}])
    if service.allow_any:
        rules.append([{"accept": None}])
    else:
        for version, networks in ((4, service.allow4), (6, service.allow6)):
            networks = lists.disjoint_networks(version, networks, service.allow_lists)
            if not networks:
                continue
            name = f"{slot}_{service.name}_v{version}"
            out.append(_add("set", table=table, name=name, type=f"ipv{version}_addr",
                            flags=["interval"], elem=lists.set_elements(version, networks)))
            rules.append([_match(saddr[version], "@" + name), {"accept": None}])
        if service.allow_interfaces:
            names = list(service.allow_interfaces)
            rules.append([_match({"meta": {"key": "iifname"}},
                                 names[0] if len(names) == 1 else {"set": names}),
                          {"accept": None}])
        rules.append(_refusal(service))
    out += [_rule(table, chain, *exprs) for exprs in rules]
    return out


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


def _refresh_ban_table(policy):
    """Create the ban table if missing; refresh its ports and rules, never its bans."""
    table = policy.bans_table
    out = [_add("table", name=table)]
    for version in (4, 6):
        out.append(_add("set", table=table, name=BAN_SETS[version], type=f"ipv{version}_addr",
                        flags=["timeout"]))
    for version in (4, 6):
        out.append(_add("set", table=table, name=RANGE_BAN_SETS[version],
                        type=f"ipv{version}_addr", flags=["interval", "timeout"]))
    ports = ban_ports(policy)
    for proto in ("tcp", "udp"):
        name = f"{proto}_ports"
        out.append(_add("set", table=table, name=name, type="inet_service"))
        out.append({"flush": {"set": {"family": FAMILY, "table": table, "name": name}}})
        if ports[proto]:
            out.append({"add": {"element": {"family": FAMILY, "table": table, "name": name,
                                            "elem": ports[proto]}}})
    # Bans on IPv6 cover a whole prefix: the rule masks the source before the
    # lookup, so the set stays a plain hash of prefix addresses.
    v4_source = {"payload": {"protocol": "ip", "field": "saddr"}}
    v6_source = {"payload": {"protocol": "ip6", "field": "saddr"}}
    v6_prefix = v6_source
    if policy.bans.ipv6_prefix < 128:
        mask = ipaddress.IPv6Network(("::", policy.bans.ipv6_prefix)).netmask
        v6_prefix = {"&": [v6_source, str(mask)]}
    sources = [_match(v4_source, "@" + BAN_SETS[4]), _match(v6_prefix, "@" + BAN_SETS[6]),
               _match(v4_source, "@" + RANGE_BAN_SETS[4]),
               _match(v6_source, "@" + RANGE_BAN_SETS[6])]
    for hook in ("input", "forward"):
        # Priority below the guard table's: a banned source is dropped first.
        out.append(_add("chain", table=table, name=hook, type="filter", hook=hook,
                        prio=-10, policy="accept"))
        out.append({"flush": {"chain": {"family": FAMILY, "table": table, "name": hook}}})
        for proto in ("tcp", "udp"):
            if hook == "input":
                port = _match({"payload": {"protocol": proto, "field": "dport"}},
                              f"@{proto}_ports")
                prefix = [port]
            else:
                prefix = [_match({"ct": {"key": "direction"}}, "original"),
                          _match({"ct": {"key": "status"}}, "dnat", op="in"),
                          _match({"meta": {"key": "l4proto"}}, proto),
                          _match({"ct": {"key": "proto-dst", "dir": "original"}},
                                 f"@{proto}_ports")]
            for source in sources:
                out.append(_rule(table, hook, *prefix, source, {"drop": None}))
    return out


def _match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def _rule(table, chain, *exprs):
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain,
                             "expr": list(exprs)}}}


def skeleton(document, table):
    """What of `table` the document leaves that the kernel can report cheaply.

    Chain names with their rule counts, and set names: enough to notice a
    table someone edited, without listing 100k set elements. (Chains the
    document flushes end with exactly the rules it adds after the flush.)
    """
    chains, sets = {}, set()
    for command in document["nftables"]:
        (verb, body), = command.items()
        if verb not in ("add", "delete"):
            continue
        (kind, obj), = body.items()
        if (obj.get("name") if kind == "table" else obj.get("table")) != table:
            continue
        if verb == "delete":
            chains, sets = {}, set()  # the table is replaced from here on
        elif kind == "chain":
            chains.setdefault(obj["name"], 0)
        elif kind == "rule":
            chains[obj["chain"]] += 1
        elif kind == "set":
            sets.add(obj["name"])
    return frozenset(chains.items()), frozenset(sets)
