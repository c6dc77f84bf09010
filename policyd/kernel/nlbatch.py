"""A compiled nftables JSON document encoded as one raw nfnetlink batch.

Owns the translation of exactly the commands and expressions compile.py emits
into netlink messages, with the dependencies nft itself adds, so a policy with
100k networks loads as one kernel transaction without libnftables (whose cache
fetch and interval processing cost seconds). Anything else raises Unsupported
and the caller loads the document with libnftables instead.
"""
import socket
import struct

from policyd.kernel import nfwire as nl
from policyd.kernel import nlrules
from policyd.kernel.nlattr import NESTED, Unsupported, attr, big_endian, nest, string, u32, u64
from policyd.kernel.nlrules import PROTOCOLS

NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 0, 2, 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM = 9, 11, 12, 14
NLM_F_CREATE, NLM_F_APPEND = 0x400, 0x800
# Set attributes and flags (linux/netfilter/nf_tables.h).
SET_TABLE, SET_NAME, SET_FLAGS, SET_KEY_TYPE, SET_KEY_LEN = 1, 2, 3, 4, 5
SET_DESC, SET_ID, SET_TIMEOUT, SET_USERDATA = 9, 10, 11, 13
F_ANONYMOUS, F_CONSTANT, F_INTERVAL, F_TIMEOUT, F_EVAL = 0x1, 0x2, 0x4, 0x10, 0x20
ELEM_KEY, ELEM_FLAGS, ELEM_TIMEOUT = 1, 3, 4
ELEM_INTERVAL_END = 0x1
LIST_SET_ID = 4
# nft's datatype numbers, its key lengths and the byte order it records (udata).
DATATYPES = {"ipv4_addr": (7, 4, 2), "ipv6_addr": (8, 16, 2), "inet_proto": (12, 1, 1),
             "inet_service": (13, 2, 2), "ifname": (41, 16, 1)}
SET_FLAG_BITS = {"interval": F_INTERVAL, "timeout": F_TIMEOUT, "constant": F_CONSTANT,
                 "dynamic": F_EVAL}
HOOKS = {"input": 1, "forward": 2}


class Encoder:
    """Turns one document into [(message type, flags, body)] for nfnetlink.Netlink."""

    def __init__(self):
        self.messages = []
        self.set_ids = {}  # (table, set name) -> id of a set added in this batch
        self.set_types = {}  # (table, set name) -> (datatype name, flags)
        self.next_id = 1

    def encode(self, document):
        # nft marks a set that rules update (`update @set {...}`) dynamic.
        self.dynamic = {(body["rule"]["table"], stmt["set"]["set"].lstrip("@"))
                        for command in document["nftables"]
                        for body in [command.get("add", {})] if "rule" in body
                        for stmt in body["rule"]["expr"] if "set" in stmt}
        for command in document["nftables"]:
            (verb, body), = command.items()
            if verb == "metainfo":
                continue
            (kind, obj), = body.items()
            if obj.get("family") != "inet":
                raise Unsupported(f"family {obj.get('family')!r}")
            handler = getattr(self, f"_{verb}_{kind}", None)
            if handler is None:
                raise Unsupported(f"{verb} {kind}")
            handler(obj)
        return self.messages

    def _emit(self, kind, body, flags=0):
        self.messages.append((kind, flags, body))

    # ------------------------------------------------------------ tables, chains

    def _add_table(self, obj):
        self._emit(NEWTABLE, string(1, obj["name"]), NLM_F_CREATE)

    def _delete_table(self, obj):
        self._emit(DELTABLE, string(1, obj["name"]))

    def _add_chain(self, obj):
        parts = [string(1, obj["table"]), string(3, obj["name"])]
        if "hook" in obj:
            if obj.get("type") != "filter" or obj["hook"] not in HOOKS:
                raise Unsupported(f"chain {obj['name']} hook")
            parts.append(nest(4, u32(1, HOOKS[obj["hook"]]), u32(2, int(obj["prio"]))))
            parts.append(u32(5, 1 if obj.get("policy", "accept") == "accept" else 0))
            parts.append(string(7, "filter"))
        self._emit(NEWCHAIN, b"".join(parts), NLM_F_CREATE)

    def _flush_chain(self, obj):
        self._emit(DELRULE, string(1, obj["table"]) + string(2, obj["name"]))

    def _delete_chain(self, obj):
        self._emit(DELCHAIN, string(1, obj["table"]) + string(3, obj["name"]))

    # ------------------------------------------------------------ sets, elements

    def _add_set(self, obj):
        typename = obj["type"]
        if typename not in DATATYPES:
            raise Unsupported(f"set type {typename}")
        flags = 0
        for flag in ([obj["flags"]] if isinstance(obj.get("flags"), str) else obj.get("flags", [])):
            if flag not in SET_FLAG_BITS:
                raise Unsupported(f"set flag {flag}")
            flags |= SET_FLAG_BITS[flag]
        if obj.get("stmt") or obj.get("policy") or obj.get("gc-interval"):
            raise Unsupported("set options")
        table, name = obj["table"], obj["name"]
        if (table, name) in self.dynamic:
            flags |= F_EVAL
        self._declare_set(table, name, typename, flags, timeout=obj.get("timeout"),
                          size=obj.get("size"))
        if obj.get("elem"):
            self._elements(table, name, obj["elem"])

    def _declare_set(self, table, name, typename, flags, timeout=None, size=None):
        number, length, byteorder = DATATYPES[typename]
        set_id = self.next_id
        self.next_id += 1
        if timeout is not None:
            flags |= F_TIMEOUT
        parts = [string(SET_TABLE, table), string(SET_NAME, name), u32(SET_FLAGS, flags),
                 u32(SET_KEY_TYPE, number), u32(SET_KEY_LEN, length)]
        if timeout is not None:
            parts.append(u64(SET_TIMEOUT, int(timeout) * 1000))
        parts.append(attr(SET_DESC | NESTED, u32(1, size) if size else b""))
        parts.append(u32(SET_ID, set_id))
        # nft records the key's byte order so that it lists the elements right.
        parts.append(attr(SET_USERDATA, struct.pack("=BB", 0, 4) + struct.pack("=I", byteorder)))
        self._emit(NEWSET, b"".join(parts), NLM_F_CREATE)
        self.set_ids[(table, name)] = set_id
        self.set_types[(table, name)] = (typename, flags)
        return set_id

    def anonymous_set(self, table, typename, values):
        """Declare a rule's constant anonymous set (`{ 8080, 8443 }`) with its
        elements; returns the id the rule's lookup names it by."""
        set_id = self._declare_set(table, "__set%d", typename, F_ANONYMOUS | F_CONSTANT,
                                   size=len(values))
        items = [(self._key(typename, v), None) for v in values]
        self._element_messages(NEWSETELEM, table, "__set%d", items, NLM_F_CREATE)
        del self.set_ids[(table, "__set%d")]
        return set_id

    def _add_element(self, obj):
        self._elements(obj["table"], obj["name"], obj["elem"])

    def _delete_element(self, obj):
        typename, flags = self._set_type(obj["table"], obj["name"])
        if flags & F_INTERVAL:
            raise Unsupported("deleting interval elements")
        items = [(self._key(typename, e), None) for e in obj["elem"]]
        self._element_messages(DELSETELEM, obj["table"], obj["name"], items, 0)

    def _flush_set(self, obj):
        self._emit(DELSETELEM, string(1, obj["table"]) + string(2, obj["name"]))

    def _delete_set(self, obj):
        self._emit(DELSET, string(SET_TABLE, obj["table"]) + string(SET_NAME, obj["name"]))

    def _set_type(self, table, name):
        if (table, name) not in self.set_types:
            raise Unsupported(f"set {name} not declared in the document")
        return self.set_types[(table, name)]

    def _elements(self, table, name, elements):
        typename, flags = self._set_type(table, name)
        if flags & F_INTERVAL:
            intervals = getattr(elements, "intervals", None)  # lists.Elements: ints at hand
            if intervals is None:
                intervals = intervals_of(typename, elements)
            head = self._list_head(table, name)
            for chunk in interval_chunks(intervals, DATATYPES[typename][1]):
                self._emit(NEWSETELEM, head + attr(3 | NESTED, chunk), NLM_F_CREATE)
            return
        else:
            items = []
            for element in elements:
                timeout = None
                if isinstance(element, dict) and "elem" in element:
                    timeout = element["elem"].get("timeout")
                    if set(element["elem"]) - {"val", "timeout"}:
                        raise Unsupported("element options")
                    element = element["elem"]["val"]
                items.append((self._key(typename, element),
                              None if timeout is None else int(timeout) * 1000))
        self._element_messages(NEWSETELEM, table, name, items, NLM_F_CREATE)

    def _key(self, typename, value):
        if typename == "inet_service" and isinstance(value, int):
            return struct.pack(">H", value)
        if typename == "inet_proto" and value in PROTOCOLS:
            return bytes([PROTOCOLS[value]])
        if typename == "ifname" and isinstance(value, str) and not value.endswith("*"):
            return value.encode().ljust(16, b"\0")
        if typename in ("ipv4_addr", "ipv6_addr") and isinstance(value, str):
            return socket.inet_pton(socket.AF_INET if typename == "ipv4_addr"
                                    else socket.AF_INET6, value)
        raise Unsupported(f"{typename} element {value!r}")

    def _element_messages(self, kind, table, name, items, flags):
        """items: [(key bytes, timeout ms or None[, element flags])]."""
        self._chunked(kind, table, name, [encode_element(*item) for item in items], flags)

    def _list_head(self, table, name):
        head = string(1, table) + string(2, name)
        set_id = self.set_ids.get((table, name))
        if set_id is not None:
            head += u32(LIST_SET_ID, set_id)
        return head

    def _chunked(self, kind, table, name, elements, flags):
        """Encoded elements in messages of at most MAX_ELEMENTS_BYTES each."""
        head = self._list_head(table, name)
        chunk, size = [], 0
        for element in elements:
            if size + len(element) > nl.MAX_ELEMENTS_BYTES:
                self._emit(kind, head + attr(3 | NESTED, b"".join(chunk)), flags)
                chunk, size = [], 0
            chunk.append(element)
            size += len(element)
        if chunk:
            self._emit(kind, head + attr(3 | NESTED, b"".join(chunk)), flags)

    # ------------------------------------------------------------ rules

    def _add_rule(self, obj):
        rule = nlrules.Rule(self, obj["table"])
        for statement in obj["expr"]:
            rule.statement(statement)
        body = (string(1, obj["table"]) + string(2, obj["chain"])
                + nest(4, *rule.exprs))
        self._emit(NEWRULE, body, NLM_F_CREATE | NLM_F_APPEND)


def intervals_of(typename, elements):
    """JSON interval elements -> sorted [(first, last)] as ints, nested ones dropped."""
    family = socket.AF_INET if typename == "ipv4_addr" else socket.AF_INET6
    bits = 32 if typename == "ipv4_addr" else 128
    pton, from_bytes = socket.inet_pton, int.from_bytes
    out = []
    for element in elements:
        if isinstance(element, str):
            first = from_bytes(pton(family, element), "big")
            out.append((first, first))
        elif "prefix" in element:
            prefix = element["prefix"]
            first = from_bytes(pton(family, prefix["addr"]), "big")
            out.append((first, first + (1 << (bits - prefix["len"])) - 1))
        elif "range" in element:
            low, high = element["range"]
            out.append((from_bytes(pton(family, low), "big"), from_bytes(pton(family, high), "big")))
        else:
            raise Unsupported(f"interval element {element!r}")
    return disjoint(out)


def disjoint(intervals):
    """Sorted, with every interval that lies inside an earlier one dropped; overlapping
    ones (only possible for ranges, never for networks) are merged."""
    out = []
    end = -1
    for first, last in sorted(intervals):
        if first <= end:
            if last > end:
                out[-1] = (out[-1][0], last)
                end = last
            continue
        out.append((first, last))
        end = last
    return out


def interval_elements(intervals, length, lead=True):
    """The kernel's encoding of disjoint intervals, as encoded elements: a start
    element, then an end element (flag INTERVAL_END) one past the last address;
    nft leads with an end element at 0 when the first interval does not start there.

    Every element of one key length has the same attribute headers, so each is
    a constant prefix and the key: 100k intervals encode in a tenth of a second.
    """
    start = encode_element(bytes(length))[:-length]
    end_element = encode_element(bytes(length), flags=ELEM_INTERVAL_END)
    end_head, end_tail = end_element[:len(start)], end_element[len(start) + length:]
    top = (1 << (8 * length)) - 1
    out = []
    if lead and intervals and intervals[0][0] != 0:
        out.append(end_element)
    for first, last in intervals:
        out.append(start + first.to_bytes(length, "big"))
        if last != top:
            out.append(end_head + (last + 1).to_bytes(length, "big") + end_tail)
    return out


def interval_chunks(intervals, length, limit=nl.MAX_ELEMENTS_BYTES):
    """interval_elements() joined into message-sized chunks, built at C speed: every
    interval is a start and an end element with fixed headers, so the encoding is
    one template repeated with the keys written in column by column."""
    if not intervals:
        return []
    top = (1 << (8 * length)) - 1
    start = encode_element(bytes(length))
    end = encode_element(bytes(length), flags=ELEM_INTERVAL_END)
    key_at = len(start) - length  # both templates carry the key after the same headers
    size = len(start) + len(end)
    count = len(intervals)
    out = bytearray((start + end) * count)
    starts = big_endian([first for first, _last in intervals], length)
    ends = big_endian([0 if last == top else last + 1 for _first, last in intervals], length)
    for offset in range(length):
        out[key_at + offset::size] = starts[offset::length]
        out[len(start) + key_at + offset::size] = ends[offset::length]
    if intervals[-1][1] == top:  # an interval up to the last address has no end element
        del out[-len(end):]
    per_chunk = max(1, limit // size) * size
    chunks = [bytes(out[i:i + per_chunk]) for i in range(0, len(out), per_chunk)]
    if intervals[0][0] != 0:  # nft's leading end element at address 0
        chunks.insert(0, end)
    return chunks


def encode_element(key, timeout_ms=None, flags=0):
    """One NFTA_LIST_ELEM { KEY { DATA_VALUE key } [FLAGS] [TIMEOUT] }."""
    size = len(key)
    pad = -size % 4
    body = struct.pack("=HHHH", 8 + size + pad, ELEM_KEY | NESTED, 4 + size, 1) + key + bytes(pad)
    if flags:
        body += struct.pack("=HH", 8, ELEM_FLAGS) + struct.pack(">I", flags)
    if timeout_ms is not None:
        body += struct.pack("=HH", 12, ELEM_TIMEOUT) + timeout_ms.to_bytes(8, "big")
    return struct.pack("=HH", 4 + len(body), 1 | NESTED) + body


def encode(document):
    """[(message type, flags, body)] for the document; Unsupported if it cannot."""
    return Encoder().encode(document)
