"""Looks at an nftables set over netlink: how many elements, and which keys are missing.

A full count of 100k elements takes the kernel most of a second (it walks the
hash table again for every dump message), too slow to watch a restore; asking
for a few sample keys by value takes microseconds, so a restore is sampled
that way and the full count confirms the end state. The socket is made inside
a namespace and then used from the calling thread.
"""
import errno
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "netns"))

from netlab import in_namespace  # noqa: E402

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETSETELEM = 13
NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 0x2, 0x3
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_DATA_VALUE = 1
NLA_F_NESTED = 0x8000
HEADER = struct.Struct("=IHHII")


def _attr(kind, payload):
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _attrs(data, start, end):
    """(kind without flag bits, payload start, payload end) of each attribute in data[start:end]."""
    offset = start
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, offset + 4, offset + length
        offset += (length + 3) & ~3


class SetCounter:
    """counter.count(table, set) -> elements now in that inet set, 0 if it does not exist."""

    def __init__(self, namespace):
        self.sock = in_namespace(namespace, socket.socket, socket.AF_NETLINK, socket.SOCK_RAW,
                                 NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(10)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        except OSError:
            pass
        self.seq = 0

    def close(self):
        self.sock.close()

    @staticmethod
    def _list_head(table, set_name):
        return (struct.pack("=BBH", NFPROTO_INET, 0, 0)
                + _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))

    def _request(self, body, flags):
        self.seq += 1
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
        return HEADER.pack(16 + len(body), kind, NLM_F_REQUEST | flags, self.seq, 0) + body

    def missing(self, table, set_name, keys):
        """How many of `keys` (packed addresses) the set lacks; all of them if it does not exist."""
        head = self._list_head(table, set_name)
        requests, waiting = [], set()
        for key in keys:
            element = _attr(NFTA_LIST_ELEM | NLA_F_NESTED,
                            _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key)))
            requests.append(self._request(head + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, element), 0))
            waiting.add(self.seq)
        self.sock.send(b"".join(requests))
        absent = 0
        while waiting:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, msg_kind, _flags, seq, _pid = HEADER.unpack_from(data, offset)
                if length < 16:
                    break
                if seq in waiting:
                    waiting.discard(seq)
                    if msg_kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + 16)
                        if code and -code != errno.ENOENT:
                            raise OSError(-code, f"looking up an element of {table}/{set_name}")
                        absent += code != 0
                offset += (length + 3) & ~3
        return absent

    def count(self, table, set_name):
        self.sock.send(self._request(self._list_head(table, set_name), NLM_F_DUMP))
        total = 0
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, msg_kind, _flags, seq, _pid = HEADER.unpack_from(data, offset)
                if length < 16:
                    break
                if seq == self.seq:
                    if msg_kind == NLMSG_DONE:
                        return total
                    if msg_kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + 16)
                        if -code == errno.ENOENT:
                            return 0  # no such table or set: nothing is enforced
                        if code:
                            raise OSError(-code, f"counting {table}/{set_name}")
                        return total
                    total += self._elements(data, offset + 20, offset + length)
                offset += (length + 3) & ~3

    @staticmethod
    def _elements(data, start, end):
        for kind, inner_start, inner_end in _attrs(data, start, end):
            if kind == NFTA_SET_ELEM_LIST_ELEMENTS:
                return sum(1 for k, _s, _e in _attrs(data, inner_start, inner_end) if k == NFTA_LIST_ELEM)
        return 0
