"""Rule expressions of a compiled document as nf_tables netlink expressions, with
the protocol dependencies nft itself adds (`meta l4proto tcp` before `tcp dport`,
`meta nfproto ipv4` before `ip saddr`), so a rule loads and lists exactly as if
libnftables had loaded it. Owns only rules; policyd.kernel.nlbatch calls it per rule.
"""
import socket
import struct

from policyd.kernel.nlattr import NESTED, Unsupported, attr, data_value, expr, nest, string, u32, u64

VERDICTS = {"accept": 1, "drop": 0, "goto": -4, "jump": -3}
PROTOCOLS = {"tcp": 6, "udp": 17}
NFPROTO = {"ipv4": 2, "ipv6": 10}
PAYLOADS = {("ip", "saddr"): (1, 12, 4, "ipv4"), ("ip6", "saddr"): (1, 8, 16, "ipv6"),
            ("tcp", "dport"): (2, 2, 2, "tcp"), ("udp", "dport"): (2, 2, 2, "udp")}
META_KEYS = {"iifname": (6, 16), "nfproto": (15, 1), "l4proto": (16, 1)}
CT_KEYS = {"state": (0, 4), "direction": (1, 1), "status": (2, 4), "proto-dst": (12, 2)}
CT_BITS = {"status": {"dnat": 0x20}, "state": {"new": 0x8}}
LIMIT_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
REG = 1  # nft's 128-bit register 1, as libnftables uses it


class Rule:
    """One rule's expressions, with the protocol matches nft adds as dependencies."""

    def __init__(self, encoder, table):
        self.encoder = encoder
        self.table = table
        self.exprs = []
        self.nfproto = None
        self.l4proto = None

    def statement(self, statement):
        (kind, body), = statement.items()
        if kind == "match":
            self.match(body)
        elif kind in ("accept", "drop"):
            self.verdict(kind)
        elif kind in ("goto", "jump"):
            self.verdict(kind, body["target"])
        elif kind == "reject":
            self.reject(body)
        elif kind == "set":
            self.dynset(body)
        else:
            raise Unsupported(f"statement {kind}")

    def verdict(self, kind, chain=None):
        parts = [u32(1, VERDICTS[kind])]
        if chain is not None:
            parts.append(string(2, chain))
        self.exprs.append(expr("immediate", u32(1, 0), nest(2, nest(2, *parts))))

    def reject(self, body):
        if body == {"type": "tcp reset"}:
            self.need_l4proto("tcp")
            self.exprs.append(expr("reject", u32(1, 1), attr(2, b"\0")))
        elif body == {"type": "icmpx", "expr": "port-unreachable"}:
            self.exprs.append(expr("reject", u32(1, 2), attr(2, b"\1")))
        else:
            raise Unsupported(f"reject {body}")

    def need_nfproto(self, name):
        if self.nfproto != name:
            self.meta_cmp("nfproto", bytes([NFPROTO[name]]))
            self.nfproto = name

    def need_l4proto(self, name):
        if self.l4proto != name:
            self.meta_cmp("l4proto", bytes([PROTOCOLS[name]]))
            self.l4proto = name

    def meta_cmp(self, key, value):
        self.exprs.append(expr("meta", u32(1, REG), u32(2, META_KEYS[key][0])))
        self.cmp(value)

    def cmp(self, value, op=0):
        self.exprs.append(expr("cmp", u32(1, REG), u32(2, op), data_value(3, value)))

    def load(self, left):
        """Load `left` into the register; return (datatype name, length)."""
        if "payload" in left:
            key = (left["payload"].get("protocol"), left["payload"].get("field"))
            if key not in PAYLOADS:
                raise Unsupported(f"payload {key}")
            base, offset, length, proto = PAYLOADS[key]
            if proto in NFPROTO:
                self.need_nfproto(proto)
            else:
                self.need_l4proto(proto)
            self.exprs.append(expr("payload", u32(1, REG), u32(2, base), u32(3, offset),
                                   u32(4, length)))
            return {4: "ipv4_addr", 16: "ipv6_addr", 2: "inet_service"}[length], length
        if "meta" in left:
            key = left["meta"]["key"]
            if key not in META_KEYS:
                raise Unsupported(f"meta {key}")
            self.exprs.append(expr("meta", u32(1, REG), u32(2, META_KEYS[key][0])))
            return {"iifname": "ifname", "nfproto": "nfproto", "l4proto": "inet_proto"}[key], \
                META_KEYS[key][1]
        if "ct" in left:
            ct = left["ct"]
            if ct["key"] not in CT_KEYS:
                raise Unsupported(f"ct {ct['key']}")
            parts = [u32(1, REG), u32(2, CT_KEYS[ct["key"]][0])]
            if "dir" in ct:
                if ct["dir"] != "original":
                    raise Unsupported(f"ct direction {ct['dir']}")
                parts.append(attr(3, b"\0"))
            self.exprs.append(expr("ct", *parts))
            return "ct_" + ct["key"], CT_KEYS[ct["key"]][1]
        if "&" in left:
            inner, mask = left["&"]
            typename, length = self.load(inner)
            if typename != "ipv6_addr" or not isinstance(mask, str):
                raise Unsupported("bitwise")
            self.exprs.append(expr("bitwise", u32(1, REG), u32(2, REG), u32(3, length),
                                   data_value(4, socket.inet_pton(socket.AF_INET6, mask)),
                                   data_value(5, bytes(length))))
            return typename, length
        raise Unsupported(f"expression {left!r}")

    def match(self, body):
        left, right, op = body["left"], body["right"], body["op"]
        meta_key = left.get("meta", {}).get("key") if isinstance(left, dict) else None
        # A literal protocol match establishes the dependency nft would add later.
        if (meta_key in ("nfproto", "l4proto") and isinstance(right, str) and op == "=="
                and not right.startswith("@")):
            table = NFPROTO if meta_key == "nfproto" else PROTOCOLS
            if right not in table:
                raise Unsupported(f"meta {meta_key} {right}")
            self.meta_cmp(meta_key, bytes([table[right]]))
            setattr(self, meta_key, right)
            return
        typename, length = self.load(left)
        if op == "in" and typename in ("ct_status", "ct_state"):
            bit = CT_BITS[typename[3:]].get(right)
            if bit is None:
                raise Unsupported(f"{typename} {right}")
            self.exprs.append(expr("bitwise", u32(1, REG), u32(2, REG), u32(3, 4),
                                   data_value(4, struct.pack("=I", bit)),
                                   data_value(5, bytes(4))))
            self.cmp(bytes(4), op=1)
            return
        if op != "==":
            raise Unsupported(f"match op {op}")
        if isinstance(right, str) and right.startswith("@"):
            self.lookup(right[1:])
        elif isinstance(right, dict) and "set" in right:
            self.anonymous_lookup(typename, right["set"])
        elif typename == "ifname" and isinstance(right, str):
            text = right.encode()
            self.cmp(text[:-1] if text.endswith(b"*") else text.ljust(16, b"\0"))
        elif typename == "ct_direction" and right == "original":
            self.cmp(b"\0")
        elif typename in ("inet_service", "ct_proto-dst") and isinstance(right, int):
            self.cmp(struct.pack(">H", right))
        else:
            raise Unsupported(f"match {typename} {right!r}")

    def lookup(self, name):
        parts = [string(1, name), u32(2, REG)]
        set_id = self.encoder.set_ids.get((self.table, name))
        if set_id is not None:
            parts.append(u32(4, set_id))
        self.exprs.append(expr("lookup", *parts))

    def anonymous_lookup(self, typename, values):
        typename = {"ct_proto-dst": "inet_service"}.get(typename, typename)
        if typename not in ("inet_service", "ifname"):
            raise Unsupported(f"anonymous set of {typename}")
        set_id = self.encoder.anonymous_set(self.table, typename, values)
        self.exprs.append(expr("lookup", string(1, "__set%d"), u32(2, REG), u32(4, set_id)))

    def dynset(self, body):
        stmts = body.get("stmt", [])
        if body.get("op") != "update" or len(stmts) != 1 or "limit" not in stmts[0]:
            raise Unsupported("set statement")
        limit = stmts[0]["limit"]
        if limit["per"] not in LIMIT_UNITS or set(limit) - {"rate", "burst", "per", "inv"}:
            raise Unsupported("limit")
        self.load(body["elem"])
        name = body["set"].lstrip("@")
        parts = [string(1, name)]
        set_id = self.encoder.set_ids.get((self.table, name))
        if set_id is not None:
            parts.append(u32(2, set_id))
        limit_expr = expr("limit", u64(1, int(limit["rate"])), u64(2, LIMIT_UNITS[limit["per"]]),
                          u32(3, int(limit.get("burst", 0))), u32(4, 0),
                          u32(5, 1 if limit.get("inv") else 0))
        # expr() wraps in LIST_ELEM; a dynset's single EXPR is the inner NFTA_EXPR nest.
        inner = limit_expr[4:]
        parts += [u32(3, 1), u32(4, REG), attr(7 | NESTED, inner)]
        self.exprs.append(expr("dynset", *parts))
