"""Looks at an nftables set over netlink: how many elements, and which keys are missing.

A full count of 100k elements takes the kernel most of a second (it walks the
hash table again for every dump message), too slow to watch a restore; asking
for a few sample keys by value takes microseconds, so a restore is sampled
that way and the full count confirms the end state. The sockets are made
inside a namespace and then used from the calling thread.
"""
import errno
import socket
import struct


from policyd_lab.netlab import in_namespace  # noqa: E402

from policyd.kernel import nfnetlink, nfwire as nl  # noqa: E402

HEADER = struct.Struct("=IHHII")


class SetCounter:
    """counter.count(table, set) -> elements now in that inet set, 0 if it does not exist."""

    def __init__(self, namespace):
        self.netlink = in_namespace(namespace, nfnetlink.Netlink)
        self.sock = in_namespace(namespace, socket.socket, socket.AF_NETLINK, socket.SOCK_RAW,
                                 nl.NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(10)
        self.seq = 0

    def close(self):
        self.netlink.close()
        self.sock.close()

    def count(self, table, set_name):
        try:
            return len(self.netlink.set_keys(table, set_name))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return 0  # no such table or set: nothing is enforced
            raise

    def missing(self, table, set_name, keys):
        """How many of `keys` (packed addresses) the set lacks; all of them if it does not exist."""
        return len(self.absent(table, set_name, keys))

    def absent(self, table, set_name, keys):
        """Those of `keys` (packed addresses) the set lacks, in order; all of them if it
        does not exist."""
        head = (struct.pack("=BBH", nl.NFPROTO_INET, 0, 0)
                + nl._attr(nl.NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                + nl._attr(nl.NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
        kind = (nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_GETSETELEM
        requests, waiting = [], {}
        for key in keys:
            self.seq += 1
            body = head + nl._attr(nl.NFTA_SET_ELEM_LIST_ELEMENTS | nl.NLA_F_NESTED,
                                   nl._element(key, None))
            requests.append(HEADER.pack(16 + len(body), kind, nl.NLM_F_REQUEST, self.seq, 0) + body)
            waiting[self.seq] = key
        self.sock.send(b"".join(requests))
        absent = set()
        while waiting:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, msg_kind, _flags, seq, _pid = HEADER.unpack_from(data, offset)
                if length < 16:
                    break
                if seq in waiting:
                    key = waiting.pop(seq)
                    if msg_kind == nl.NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + 16)
                        if code and -code != errno.ENOENT:
                            raise OSError(-code, f"looking up an element of {table}/{set_name}")
                        if code:
                            absent.add(key)
                offset += (length + 3) & ~3
        return [key for key in keys if key in absent]
