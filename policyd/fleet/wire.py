"""What one fleet stream entry holds, and the strict reading of one from another node.

Pure: no Redis, no clock. An entry's time is its Redis id (the server's clock at
XADD); a ban carries the milliseconds it has left at that moment, never an
absolute time from the sender's clock. Every field from Redis is hostile input.
"""
import re
from dataclasses import dataclass

from policyd.addr import IPNetwork, parse_network

FORMAT = "1"
OPS = ("ban", "unban", "hello")
REASONS = ("auto", "manual")
MAX_FIELDS = 8
MAX_FIELD_BYTES = 128
MAX_TTL_MS = 10 * 365 * 86400 * 1000
ENTRY_ID = re.compile(rb"(\d{1,20})-(\d{1,20})\Z")
DIGITS = re.compile(r"[0-9]{1,15}\Z")


class Malformed(ValueError):
    """An entry this node cannot read; skipped and counted, never fatal."""


@dataclass(frozen=True, slots=True)
class Entry:
    node: str                  # from the stream key, which the ACL ties to one node
    id: tuple[int, int]        # (ms, seq) as Redis assigned it
    op: str                    # ban | unban | hello
    network: IPNetwork | None  # None for hello
    ttl_ms: int | None         # ban only: time left when it was added
    reason: str | None         # ban only: auto | manual


def encode_ban(network, ttl_ms, reason):
    return {"v": FORMAT, "op": "ban", "net": str(network), "ttl": str(int(ttl_ms)), "reason": reason}


def encode_unban(network):
    return {"v": FORMAT, "op": "unban", "net": str(network)}


def encode_hello():
    return {"v": FORMAT, "op": "hello"}


def parse_id(raw):
    """b'1700000000000-3' (or str) -> (1700000000000, 3); Malformed otherwise."""
    if isinstance(raw, str):
        raw = raw.encode()
    match = ENTRY_ID.match(raw or b"")
    if not match:
        raise Malformed(f"entry id {raw[:40]!r} is not ms-seq")
    return int(match.group(1)), int(match.group(2))


def format_id(entry_id):
    return f"{entry_id[0]}-{entry_id[1]}"


def decode(node, raw_id, fields):
    """One XREAD/XRANGE entry from `node`'s stream -> Entry, or Malformed saying why."""
    entry_id = parse_id(raw_id)
    if not isinstance(fields, dict) or len(fields) > MAX_FIELDS:
        raise Malformed("too many fields")
    text = {}
    for key, value in fields.items():
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise Malformed("a field is not a string")
        if len(key) > MAX_FIELD_BYTES or len(value) > MAX_FIELD_BYTES:
            raise Malformed("a field is too long")
        try:
            text[key.decode("ascii")] = value.decode("ascii")
        except UnicodeDecodeError:
            raise Malformed("a field is not ASCII") from None
    if text.get("v") != FORMAT:
        raise Malformed(f"unknown format {text.get('v')!r}")
    op = text.get("op")
    if op not in OPS:
        raise Malformed(f"unknown op {op!r}")
    allowed = {"hello": {"v", "op"}, "unban": {"v", "op", "net"},
               "ban": {"v", "op", "net", "ttl", "reason"}}[op]
    if set(text) != allowed:
        raise Malformed(f"{op} needs exactly the fields {sorted(allowed)}")
    if op == "hello":
        return Entry(node, entry_id, op, None, None, None)
    try:
        network = parse_network(text["net"])
    except ValueError as exc:
        raise Malformed(f"net {text['net']!r}: {exc}") from None
    if op == "unban":
        return Entry(node, entry_id, op, network, None, None)
    if not DIGITS.match(text["ttl"]) or not 0 < int(text["ttl"]) <= MAX_TTL_MS:
        raise Malformed(f"ttl {text['ttl']!r} is not 1..{MAX_TTL_MS} ms")
    if text["reason"] not in REASONS:
        raise Malformed(f"reason {text['reason']!r}")
    return Entry(node, entry_id, op, network, int(text["ttl"]), text["reason"])
