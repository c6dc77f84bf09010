"""The netfilter netlink socket: set-element changes in one batch, cheap dumps and
the DESTROYSETELEM probe. The ban hot path: one batch (one kernel transaction) adds or
removes any number of timed elements without libnftables, whose cache rebuild would
make every ban pay for the size of the allowlist. Message encoding: policyd.kernel.nfwire.
"""
import errno
import os
import socket
import struct

from policyd.kernel.nfwire import (
    MAX_ELEMENTS_BYTES, NETLINK_NETFILTER, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NFT_MSG_DELSETELEM, NFT_MSG_DESTROYSETELEM,
    NFT_MSG_GETCHAIN, NFT_MSG_GETGEN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM,
    NFT_MSG_GETTABLE, NFT_MSG_NEWSETELEM, NFT_SET_ELEM_INTERVAL_END, NFTA_CHAIN_NAME,
    NFTA_CHAIN_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_TABLE, NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_NAME, NFTA_SET_TABLE, NFTA_TABLE_NAME, NLA_F_NESTED, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, _attr, _attrs, _element, _elements,
    _first_element, _packed, _string_attrs, error_code, set_head)

# What other modules read from here (policyd.kernel.nft: the interval-end flag).
__all__ = ["Netlink", "NFT_SET_ELEM_INTERVAL_END"]


class Netlink:
    """A netfilter netlink socket: set elements changed in batches, cheap dumps."""

    def __init__(self):
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(10)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, 32, 16 << 20)  # SO_SNDBUFFORCE
            self._sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        except OSError:
            pass  # without CAP_NET_ADMIN the kernel refuses the batch anyway
        self._seq = 0
        self._has_destroy = None  # unknown until probed

    def close(self):
        self._sock.close()

    def has_destroy(self):
        """Whether the kernel knows NFT_MSG_DESTROYSETELEM (Linux >= 6.3); probed once,
        None while unknown (no CAP_NET_ADMIN); without it, the DEL path is used.

        The probe destroys an element of a table that does not exist: a kernel
        that knows the message answers ENOENT, an older one EINVAL for an
        unknown message type. Nothing is changed either way.
        """
        if self._has_destroy is None:
            try:
                self._send(self._messages(NFT_MSG_DESTROYSETELEM, "policyd-probe-absent",
                                          "absent", [_element(b"\0" * 4, None)]))
                self._has_destroy = True  # cannot happen: the table does not exist
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EACCES):
                    return None  # unprivileged: unknown, ask again when it matters
                self._has_destroy = exc.errno != errno.EINVAL
        return self._has_destroy

    def replace(self, table, changes):
        """Put every item in its set with the item's timeout, replacing existing ones.

        `changes` maps set name -> [(key bytes, seconds)] or, for interval sets,
        [(start key, seconds, end key or None)]; all in one transaction. Without
        DESTROY (Linux < 6.3) re-adding an element keeps its old timeout, so each
        element is first added without one (a no-op if present), deleted, and
        added again: the delete then never misses, and the whole batch is still
        one transaction, so the source is never unbanned in between.
        """
        messages = []
        if self.has_destroy():
            for name, items in changes.items():
                messages += self._messages(NFT_MSG_DESTROYSETELEM, table, name,
                                           _packed(items, timeouts=False))
        else:
            for name, items in changes.items():
                keys = _packed(items, timeouts=False)
                messages += self._messages(NFT_MSG_NEWSETELEM, table, name, keys, NLM_F_CREATE)
                messages += self._messages(NFT_MSG_DELSETELEM, table, name, keys)
        for name, items in changes.items():
            messages += self._messages(NFT_MSG_NEWSETELEM, table, name, _packed(items),
                                       NLM_F_CREATE)
        self._send(messages)

    def add(self, table, changes, flush=()):
        """Add every item (as in replace); an existing element keeps its own timeout.

        For restores: the kernel either lacks the element or already counts
        down the same ban, so there is nothing to replace. The sets named in
        `flush` are emptied first, in the same transaction.
        """
        self._send(self.add_messages(table, changes, flush))

    def add_messages(self, table, changes, flush=()):
        """add()'s messages, for a caller that sends them within a larger batch."""
        # DELSETELEM without an element list flushes the set (Linux >= 4.10).
        messages = [(NFT_MSG_DELSETELEM, 0, set_head(table, name)) for name in flush]
        for name, items in changes.items():
            messages += self._messages(NFT_MSG_NEWSETELEM, table, name, _packed(items),
                                       NLM_F_CREATE)
        return messages

    def set_elements(self, table, name):
        """[(key bytes, milliseconds left or None, flags)] of one set's elements, by a
        netlink dump (no libnftables cache, so no allowlist cost). An interval set
        lists start and end (flags & NFT_SET_ELEM_INTERVAL_END) elements."""
        body = set_head(table, name)
        return [element for payload in self._dump_raw(NFT_MSG_GETSETELEM, body)
                for element in _elements(payload) if element[0] is not None]

    def set_keys(self, table, name):
        """{key bytes: milliseconds left, or None without a timeout} of a plain set."""
        return {key: left for key, left, _flags in self.set_elements(table, name)}

    def delete(self, table, changes):
        """Remove every item in `changes` (as in replace, timeouts unused); missing is fine."""
        if self.has_destroy():
            messages = []
            for name, items in changes.items():
                messages += self._messages(NFT_MSG_DESTROYSETELEM, table, name,
                                           _packed(items, timeouts=False))
            self._send(messages)
            return
        # Without DESTROY one missing element fails a DEL batch: add each first
        # (a no-op where present), then delete, in one transaction.
        messages = []
        for name, items in changes.items():
            keys = _packed(items, timeouts=False)
            messages += self._messages(NFT_MSG_NEWSETELEM, table, name, keys, NLM_F_CREATE)
            messages += self._messages(NFT_MSG_DELSETELEM, table, name, keys)
        try:
            self._send(messages)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # An add overlapped another interval: the kernel holds something the
            # ban book does not. Delete one by one; what is missing stays missing.
            for name, items in changes.items():
                for item in items:
                    try:
                        self._send(self._messages(NFT_MSG_DELSETELEM, table, name,
                                                  _packed([item], timeouts=False)))
                    except OSError as one:
                        if one.errno != errno.ENOENT:
                            raise

    def table_names(self):
        """Names of the inet tables that exist: a cheap dump, no rules or sets read.

        The daemon asks this every half second to notice `nft flush ruleset`.
        """
        return [attrs[NFTA_TABLE_NAME] for attrs in self._dump(NFT_MSG_GETTABLE)]

    def skeleton(self, table):
        """(frozenset of (chain, rule count), frozenset of set names) of one inet table.

        Three dumps that carry no set elements, so the cost does not grow with
        the allowlist; Ruleset.skeleton() (policyd.rules.model) says what they should be.
        """
        name = _attr(1, table.encode() + b"\0")  # NFTA_{RULE,SET}_TABLE filter the dump
        try:
            return self._skeleton(table, name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # a dump filtered by a table that is gone
                return frozenset(), frozenset()
            raise

    def _skeleton(self, table, name):
        chains = {attrs[NFTA_CHAIN_NAME]: 0 for attrs in self._dump(NFT_MSG_GETCHAIN)
                  if attrs.get(NFTA_CHAIN_TABLE) == table}
        for attrs in self._dump(NFT_MSG_GETRULE, name):
            if attrs.get(NFTA_RULE_TABLE) == table and attrs.get(NFTA_RULE_CHAIN) in chains:
                chains[attrs[NFTA_RULE_CHAIN]] += 1
        # Anonymous sets (`__set0`, from `{ 8080, 8443 }` in a rule) belong to their rule.
        sets = {attrs[NFTA_SET_NAME] for attrs in self._dump(NFT_MSG_GETSET, name)
                if attrs.get(NFTA_SET_TABLE) == table
                and not attrs[NFTA_SET_NAME].startswith("__set")}
        return frozenset(chains.items()), frozenset(sets)

    def _dump(self, kind, body=b""):
        """Every object of one kind in inet tables, as {attribute type: string}."""
        return [_string_attrs(payload) for payload in self._dump_raw(kind, body)]

    def _dump_raw(self, kind, body=b""):
        """The attribute payload of every message a dump request answers with."""
        seq = self._request(kind, NLM_F_DUMP, body)
        objects = []
        for msg_kind, message in self._answers(seq, 1 << 20):
            if msg_kind == NLMSG_DONE:
                return objects
            if msg_kind == NLMSG_ERROR:
                raise _refusal(message)
            objects.append(message[20:])

    def _request(self, kind, flags, body, family=NFPROTO_INET):
        """Send one nf_tables request outside a batch; returns its sequence number."""
        seq = self._next_seq()
        self._sock.send(self._header((NFNL_SUBSYS_NFTABLES << 8) | kind,
                                     NLM_F_REQUEST | flags, family, 0, body, seq))
        return seq

    def _messages(self, kind, table, name, elements, flags=0):
        """Messages of `kind` carrying packed `elements`, split below the 64 KiB limit."""
        head = set_head(table, name)
        out, chunk = [], []
        size = 0
        for element in elements:
            if size + len(element) > MAX_ELEMENTS_BYTES:
                out.append((kind, flags, head + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                                                      b"".join(chunk))))
                chunk, size = [], 0
            chunk.append(element)
            size += len(element)
        if chunk:
            out.append((kind, flags, head + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                                                  b"".join(chunk))))
        return out

    def _next_seq(self):
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _header(self, kind, flags, family, res_id, body, seq):
        nfgen = struct.pack("=BBH", family, 0, socket.htons(res_id))
        return struct.pack("=IHHII", 16 + len(nfgen) + len(body), kind, flags, seq, 0) + nfgen + body

    def _send(self, messages):
        """One batch: begin, the messages (each acked), end; raise OSError on refusal."""
        if not messages:
            return
        batch = [self._header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES,
                              b"", self._next_seq())]
        waiting = set()
        for kind, flags, body in messages:
            seq = self._next_seq()
            waiting.add(seq)
            batch.append(self._header((NFNL_SUBSYS_NFTABLES << 8) | kind,
                                      NLM_F_REQUEST | NLM_F_ACK | flags, NFPROTO_INET, 0,
                                      body, seq))
        batch.append(self._header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES,
                                  b"", self._next_seq()))
        self._sock.send(b"".join(batch))
        failure = 0
        for kind, seq, message in self._received(1 << 20) if waiting else ():
            if kind == NLMSG_ERROR:
                waiting.discard(seq)
                if not failure:
                    failure = error_code(message)
            if not waiting:
                break
        if failure:
            raise OSError(failure, f"nftables set element change refused: {os.strerror(failure)}")

    def send_batch(self, messages):
        """Send [(message type, flags, body)] as one transaction (policyd.kernel.nlbatch encodes
        whole policies); OSError if the kernel refuses any part, and then nothing changed."""
        self._send(messages)

    def generation(self):
        """The ruleset's generation id: it moves with every committed transaction."""
        seq = self._request(NFT_MSG_GETGEN, 0, b"", family=0)
        for kind, message in self._answers(seq):
            if kind == NLMSG_ERROR:
                raise _refusal(message)
            for attr, value in _attrs(message[20:]):
                if attr == 1:  # NFTA_GEN_ID
                    return int.from_bytes(value, "big")

    def _answers(self, seq, size=65536):
        """(message type, whole message) of each netlink message answering `seq`."""
        for kind, msg_seq, message in self._received(size):
            if msg_seq == seq:
                yield kind, message

    def _received(self, size=65536):
        """(message type, sequence number, whole message) of every message received."""
        while True:
            data = self._sock.recv(size)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    break
                yield kind, seq, data[offset:offset + length]
                offset += (length + 3) & ~3

    def set_element_payloads(self, table, name):
        """The raw NFTA_SET_ELEM_LIST_ELEMENTS contents of one set's dump, in the
        kernel's order: hashing them costs no parsing (policyd.kernel.drift digests them)."""
        body = set_head(table, name)
        for payload in self._dump_raw(NFT_MSG_GETSETELEM, body):
            for kind, value in _attrs(payload):
                if kind == NFTA_SET_ELEM_LIST_ELEMENTS:
                    yield value

    def get_element(self, table, name, key):
        """(key bytes, ms left or None, element flags) of the element holding `key`,
        or None; one NFT_MSG_GETSETELEM. OSError if the set is gone."""
        body = set_head(table, name) + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                                             _element(key, None))
        seq = self._request(NFT_MSG_GETSETELEM, NLM_F_ACK, body)
        found = None
        for kind, message in self._answers(seq):
            if kind != NLMSG_ERROR:
                found = _first_element(message[20:])
                continue
            if error_code(message) == errno.ENOENT:
                return None
            if error_code(message):
                raise _refusal(message)
            return found


def _refusal(message):
    """The OSError an NLMSG_ERROR message carries."""
    code = error_code(message)
    return OSError(code, os.strerror(code))
