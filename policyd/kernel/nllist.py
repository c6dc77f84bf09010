"""One inet table listed over netlink in the object form `nft -j list table` gives,
as far as doctor compares it: chains with their hooks, each rule's verdict, sets
with type and flags, and interval-set elements as their raw dump.

Owns only reading; libnftables would fetch and format every element of a
100k-network set first, which costs seconds (see DESIGN.md, "Cost trap").
"""
import bisect
import errno
import ipaddress

from policyd.kernel import nfwire as nl
from policyd.kernel.nfwire import _attrs

HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting",
         5: "ingress"}
POLICIES = {0: "drop", 1: "accept"}
VERDICT_CODES = {0: "drop", 1: "accept", 3: "queue", 0xFFFFFFFF: "continue",
                 0xFFFFFFFD: "jump", 0xFFFFFFFC: "goto", 0xFFFFFFFB: "return"}
DATATYPES = {7: "ipv4_addr", 8: "ipv6_addr", 12: "inet_proto", 13: "inet_service",
             41: "ifname"}
SET_FLAGS = {0x2: "constant", 0x4: "interval", 0x10: "timeout"}  # as nft -j names them
PROTOCOLS = {6: "tcp", 17: "udp"}


class KernelElements:
    """An interval set's elements as the kernel dumped them (raw bytes); doctor
    compares them with what the policy loads without parsing them."""

    def __init__(self, raw, typename):
        self.raw = raw
        self.typename = typename

    def texts(self):
        """The elements as networks, or {"range": [low, high]} where an interval is
        not one network, as nft -j lists them (slow: only to say what differs)."""
        length = 4 if self.typename == "ipv4_addr" else 16
        address = ipaddress.IPv4Address if length == 4 else ipaddress.IPv6Address
        keys = _element_keys(self.raw)
        ends = sorted(key for key, end in keys if end)
        out = []
        for first in sorted(key for key, end in keys if not end):
            # The end that belongs to a start is the smallest end above it.
            i = bisect.bisect_right(ends, first)
            last = (ends[i] if i < len(ends) else 1 << (8 * length)) - 1
            low, high = address(first), address(last)
            networks = list(ipaddress.summarize_address_range(low, high))
            out.append(str(networks[0]) if len(networks) == 1
                       else {"range": [str(low), str(high)]})
        return out


def _element_keys(raw):
    """[(key as int, is an interval end)] of a dump's element attributes."""
    out = []
    for _kind, element in _attrs(raw):
        key, end = None, False
        for attr, data in _attrs(element):
            if attr == 1:  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }
                key = next((v for k, v in _attrs(data) if k == 1), None)
            elif attr == 3:  # NFTA_SET_ELEM_FLAGS
                end = bool(int.from_bytes(data, "big") & 1)
        if key is not None:
            out.append((int.from_bytes(key, "big"), end))
    return out


def table_objects(netlink, table):
    """[{"chain": ...}, {"rule": ...}, {"set": ...}] of one inet table; [] if it is gone."""
    name = nl._attr(1, table.encode() + b"\0")
    try:
        return (_chains(netlink, table) + _rules(netlink, table, name)
                + _sets(netlink, table, name))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise


def _u32(value, signed=False):
    return int.from_bytes(value, "big", signed=signed)


def _chains(netlink, table):
    out = []
    for payload in netlink._dump_raw(nl.NFT_MSG_GETCHAIN):
        attrs = dict(_attrs(payload))
        if attrs.get(1, b"")[:-1].decode() != table:
            continue
        chain = {"family": "inet", "table": table, "name": attrs[3][:-1].decode()}
        if 4 in attrs:
            hook = dict(_attrs(attrs[4]))
            chain.update(type=attrs.get(7, b"filter\0")[:-1].decode(),
                         hook=HOOKS.get(_u32(hook[1]), str(_u32(hook[1]))),
                         prio=_u32(hook[2], signed=True),
                         policy=POLICIES.get(_u32(attrs.get(5, b"\0\0\0\1")), "accept"))
        out.append({"chain": chain})
    return out


def _rules(netlink, table, name):
    out = []
    for payload in netlink._dump_raw(nl.NFT_MSG_GETRULE, name):
        attrs = dict(_attrs(payload))
        if attrs.get(1, b"")[:-1].decode() != table:
            continue
        exprs = []
        for _elem, expr in _attrs(attrs.get(4, b"")):
            parts = dict(_attrs(expr))
            kind = parts.get(1, b"")[:-1].decode()
            data = dict(_attrs(parts.get(2, b"")))
            if kind == "immediate" and 2 in data:
                verdict = dict(_attrs(dict(_attrs(data[2])).get(2, b"")))
                if 1 in verdict:
                    word = VERDICT_CODES.get(_u32(verdict[1]), "continue")
                    target = verdict.get(2, b"")[:-1].decode()
                    exprs.append({word: {"target": target} if target else None})
            elif kind == "reject":
                exprs.append({"reject": None})
            else:
                exprs.append({kind: None})
        out.append({"rule": {"family": "inet", "table": table,
                             "chain": attrs[2][:-1].decode(), "expr": exprs}})
    return out


def _sets(netlink, table, name):
    out = []
    for payload in netlink._dump_raw(nl.NFT_MSG_GETSET, name):
        attrs = dict(_attrs(payload))
        set_name = attrs.get(2, b"")[:-1].decode()
        if attrs.get(1, b"")[:-1].decode() != table or set_name.startswith("__set"):
            continue
        bits = _u32(attrs.get(3, bytes(4)))
        typename = DATATYPES.get(_u32(attrs.get(4, bytes(4))), "unknown")
        flags = [word for bit, word in SET_FLAGS.items() if bits & bit]
        body = {"family": "inet", "table": table, "name": set_name, "type": typename,
                "flags": flags}
        if "timeout" not in flags:
            raw = b"".join(netlink.set_element_payloads(table, set_name))
            if "interval" in flags and typename in ("ipv4_addr", "ipv6_addr"):
                body["elem"] = KernelElements(raw, typename)
            else:
                body["elem"] = [_plain(typename, key) for key, _end in _element_keys(raw)]
        out.append({"set": body})
    return out


def _plain(typename, key):
    if typename == "inet_service":
        return key
    if typename == "inet_proto":
        return PROTOCOLS.get(key, str(key))
    if typename == "ipv4_addr":
        return str(ipaddress.IPv4Address(key))
    if typename == "ipv6_addr":
        return str(ipaddress.IPv6Address(key))
    return str(key)
