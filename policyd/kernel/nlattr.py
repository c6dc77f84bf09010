"""Attribute encoding shared by policyd.kernel.nlbatch and policyd.kernel.nlrules: netlink
attributes as nf_tables wants them, and the one exception both raise for what
they do not encode. Nothing here knows tables, sets or rules."""
import array
import struct
import sys

from policyd.kernel.nfwire import NLA_F_NESTED as NESTED


class Unsupported(Exception):
    """The document holds something this encoder does not know; use libnftables."""


def attr(kind, payload):
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def string(kind, text):
    return attr(kind, text.encode() + b"\0")


def u32(kind, value):
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def u64(kind, value):
    return attr(kind, struct.pack(">Q", value))


def nest(kind, *parts):
    return attr(kind | NESTED, b"".join(parts))


def data_value(kind, value):
    return nest(kind, attr(1, value))  # NFTA_DATA_VALUE


def expr(name, *parts):
    return nest(1, string(1, name), nest(2, *parts))  # LIST_ELEM { EXPR_NAME, EXPR_DATA }


def big_endian(numbers, length):
    """The numbers as consecutive big-endian `length`-byte keys, at C speed."""
    if length == 4:
        keys = array.array("I", numbers)
        if sys.byteorder == "little":
            keys.byteswap()
        return keys.tobytes()
    high = array.array("Q", [n >> 64 for n in numbers])
    low = array.array("Q", [n & 0xFFFFFFFFFFFFFFFF for n in numbers])
    if sys.byteorder == "little":
        high.byteswap()
        low.byteswap()
    out = bytearray(16 * len(numbers))
    high, low = high.tobytes(), low.tobytes()
    for offset in range(8):
        out[offset::16] = high[offset::8]
        out[8 + offset::16] = low[offset::8]
    return bytes(out)
