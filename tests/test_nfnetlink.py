"""The Netlink socket's side of a dump and of an element lookup, against a scripted
socket: which answers belong to the request, where a dump ends, and how a refusal
becomes an OSError. tests/kernel/test_contract.py runs the same on a real kernel."""
import errno
import struct

import pytest

from policyd.kernel import nfnetlink, nfwire


class ScriptedSocket:
    """A netlink socket whose answers `respond(seq)` makes from each request's seq."""

    def __init__(self, respond):
        self.respond = respond
        self.sent = []
        self.pending = []

    def bind(self, address):
        pass

    def settimeout(self, seconds):
        pass

    def setsockopt(self, *args):
        pass

    def send(self, data):
        self.sent.append(data)
        seq = struct.unpack_from("=IHHII", data)[3]
        self.pending += self.respond(seq)
        return len(data)

    def recv(self, size):
        return self.pending.pop(0)


def message(kind, seq, payload=b""):
    body = b"\2\0\0\0" + payload  # nfgenmsg, then the attributes
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def error(seq, code):
    return struct.pack("=IHHII", 36, nfwire.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + bytes(16)


def element_answer(key):
    return nfwire._attr(nfwire.NFTA_SET_ELEM_LIST_ELEMENTS | nfwire.NLA_F_NESTED,
                        nfwire._element(key, 30))


@pytest.fixture
def netlink(monkeypatch):
    made = {}

    def open_socket(respond):
        monkeypatch.setattr(nfnetlink.socket, "socket",
                            lambda *args: made.setdefault("socket", ScriptedSocket(respond)))
        return nfnetlink.Netlink(), made["socket"]
    return open_socket


def test_a_dump_reads_its_own_answers_across_receives_until_done(netlink):
    first, second = element_answer(b"\xc6\x33\x64\x07"), element_answer(b"\xc6\x33\x64\x08")
    link, sock = netlink(lambda seq: [
        message(0x0A0D, seq, first) + message(0x0A0D, seq + 7, element_answer(b"\0\0\0\1")),
        message(0x0A0D, seq, second) + message(nfwire.NLMSG_DONE, seq)])
    assert [key for key, _left, _flags in link.set_elements("policyd_bans", "ban4")] == [
        b"\xc6\x33\x64\x07", b"\xc6\x33\x64\x08"]
    request = sock.sent[0]
    assert nfwire.set_head("policyd_bans", "ban4") in request


def test_a_refused_dump_raises_the_kernels_errno(netlink):
    link, _sock = netlink(lambda seq: [error(seq, errno.EPERM)])
    with pytest.raises(OSError) as caught:
        link.table_names()
    assert caught.value.errno == errno.EPERM


def test_an_element_lookup_is_the_element_or_none(netlink):
    key = b"\xcb\x00\x71\x05"
    answers = iter([
        lambda seq: [message(0x0A0D, seq, element_answer(key)) + error(seq, 0)],
        lambda seq: [error(seq, errno.ENOENT)],
        lambda seq: [error(seq, errno.EINVAL)]])
    link, sock = netlink(lambda seq: next(answers)(seq))
    assert link.get_element("policyd_bans", "ban4", key) == (key, None, 0)
    assert nfwire._element(key, None) in sock.sent[0]
    assert link.get_element("policyd_bans", "ban4", key) is None
    with pytest.raises(OSError) as caught:
        link.get_element("policyd_bans", "ban4", key)
    assert caught.value.errno == errno.EINVAL
