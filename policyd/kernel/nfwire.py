"""The nf_tables netlink message format: message and attribute numbers, set elements
packed for a batch, and attributes and elements read back from a dump. Pure bytes;
the socket that sends and receives them is policyd.kernel.nfnetlink."""
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_GETTABLE = 1
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETSET = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NFT_MSG_GETGEN = 16
NFT_MSG_DESTROYSETELEM = 30  # Linux >= 6.3: like DEL, but a missing element is fine
NFPROTO_INET = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLM_F_DUMP = 0x300
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_SET_TABLE = 1
NFTA_SET_NAME = 2
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_FLAGS = 3
NFT_SET_ELEM_INTERVAL_END = 1
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_EXPIRATION = 5
NFTA_DATA_VALUE = 1
# An attribute's length is 16 bits, so one message carries at most ~64 KiB of
# elements; larger changes become several messages in the same batch.
MAX_ELEMENTS_BYTES = 60000


def _attr(kind, payload):
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


def _element(key_bytes, timeout_ms, flags=0):
    """One NFTA_LIST_ELEM { KEY { DATA_VALUE key } [FLAGS] [TIMEOUT ms] }, packed in one go.

    Restores encode 100k of these; nested _attr calls cost a second there.
    Keys are 4 or 16 bytes, so no padding is ever needed.
    """
    size = len(key_bytes)
    extra = (12 if timeout_ms is not None else 0) + (8 if flags else 0)
    head = struct.pack("=HHHHHH", 4 + 8 + size + extra,
                       NFTA_LIST_ELEM | NLA_F_NESTED, 8 + size, NFTA_SET_ELEM_KEY | NLA_F_NESTED,
                       4 + size, NFTA_DATA_VALUE)
    out = head + key_bytes
    if flags:
        out += struct.pack("=HH", 8, NFTA_SET_ELEM_FLAGS) + flags.to_bytes(4, "big")
    if timeout_ms is not None:
        out += struct.pack("=HH", 12, NFTA_SET_ELEM_TIMEOUT) + timeout_ms.to_bytes(8, "big")
    return out


def _packed(items, timeouts=True):
    """Packed elements of (key, seconds) items, and of (start, seconds, end) intervals.

    An interval is its start element, which carries the timeout, and an end
    element flagged INTERVAL_END holding the first key after it; a range that
    reaches the last address has no end element (the kernel and nft agree on that).
    """
    out = []
    for item in items:
        seconds = item[1] if timeouts else None
        out.append(_element(item[0], None if seconds is None else seconds * 1000))
        if len(item) == 3 and item[2] is not None:
            out.append(_element(item[2], None, NFT_SET_ELEM_INTERVAL_END))
    return out


def _attrs(payload):
    """(type, value) of each attribute in `payload`, flags stripped from the type."""
    out, offset = [], 0
    while offset + 4 <= len(payload):
        length, attr = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        out.append((attr & 0x3FFF, payload[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return out


def _string_attrs(payload):
    """{type: text} for the top-level attributes that hold NUL-terminated names."""
    return {kind: value[:-1].decode("utf-8", "replace")
            for kind, value in _attrs(payload) if value.endswith(b"\0")}


def error_code(message):
    """The errno of a whole NLMSG_ERROR message (0: an acknowledgement)."""
    return -struct.unpack_from("=i", message, 16)[0]


def set_head(table, name):
    """The table and set attributes every set-element message starts with."""
    return (_attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
            + _attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))


def _elements(payload):
    """(key, ms left or None, flags) of each element in a GETSETELEM answer."""
    for kind, value in _attrs(payload):
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
            continue
        for _elem_kind, element in _attrs(value):
            key, left, flags = None, None, 0
            for attr, data in _attrs(element):
                if attr == NFTA_SET_ELEM_KEY:
                    key = next((v for k, v in _attrs(data) if k == NFTA_DATA_VALUE), None)
                elif attr == NFTA_SET_ELEM_EXPIRATION:
                    left = int.from_bytes(data, "big")
                elif attr == NFTA_SET_ELEM_FLAGS:
                    flags = int.from_bytes(data, "big")
            yield key, left, flags


def _first_element(payload):
    """(key, ms left or None, flags) of the first element in a GETSETELEM answer."""
    return next(_elements(payload), None)
