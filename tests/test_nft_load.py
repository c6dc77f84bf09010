"""Nft.load: one raw netlink batch when the encoder knows the document, libnftables
otherwise, and never a half-loaded or silently dropped policy."""
import json

import pytest

from policyd.banning.bankeys import BanElements
from policyd.kernel import nfnetlink
from policyd.kernel import nft as nft_mod
from policyd.policy import reader as policy
from policyd.rules.compile import compile_policy
from policyd.errors import KernelError

POLICY = """\
version: 1
services:
  ollama: {ports: [11434], allow: [127.0.0.0/8, "::1", 192.0.2.0/24]}
"""


class FakeContext:
    def __init__(self, refuse=False):
        self.refuse = refuse
        self.dry_run = False
        self.loads = []  # (dry run?, document) as libnftables got them

    def set_dry_run(self, value):
        old, self.dry_run = self.dry_run, value
        return old

    def set_json_output(self, value):
        return False

    def cmd(self, text):
        # Nft._json sends the document as JSON text (what json_cmd() does).
        self.loads.append((self.dry_run, json.loads(text)))
        if self.refuse:
            return -1, "", "Error: Could not process rule: File exists\n"
        return 0, "", ""


class FakeNetlink(nfnetlink.Netlink):
    """Records batches instead of sending them; encodes messages as the real one."""

    def __init__(self, refuse=False):
        self.refuse = refuse
        self.batches = []

    def send_batch(self, messages):
        if self.refuse:
            if self.refuse is not True:  # a count: refuse that many batches
                self.refuse -= 1
            raise OSError(22, "Invalid argument")
        self.batches.append(messages)


def _nft(context, netlink):
    nft = object.__new__(nft_mod.Nft)
    nft._ctx, nft.netlink, nft.loads = context, netlink, 0
    return nft


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    return compile_policy(policy.load(path)).document()


def test_a_known_document_goes_as_one_netlink_batch(document):
    context, netlink = FakeContext(), FakeNetlink()
    _nft(context, netlink).load(document)
    assert len(netlink.batches) == 1 and context.loads == []


def test_an_unknown_document_goes_through_libnftables(document):
    document["nftables"].append({"add": {"rule": {"family": "inet", "table": "policyd",
                                                  "chain": "input", "expr": [{"counter": None}]}}})
    context, netlink = FakeContext(), FakeNetlink()
    _nft(context, netlink).load(document)
    assert netlink.batches == [] and [dry for dry, _ in context.loads] == [False]


def test_a_kernel_refusing_only_the_encoding_still_gets_the_policy(document, caplog):
    context, netlink = FakeContext(), FakeNetlink(refuse=True)
    _nft(context, netlink).load(document)
    assert [dry for dry, _ in context.loads] == [True, False]
    assert "refused the netlink encoding" in caplog.text


def test_a_refused_policy_is_an_error_and_nothing_is_loaded(document):
    context, netlink = FakeContext(refuse=True), FakeNetlink(refuse=True)
    nft = _nft(context, netlink)
    with pytest.raises(KernelError, match="File exists"):
        nft.load(document)
    assert [dry for dry, _ in context.loads] == [True] and nft.loads % 2 == 0


BANS = BanElements("policyd_bans", 64, [((4, 0xC6336401, 32), 600), ((6, 0x20010DB8 << 96, 64), 60)])
BAN_HEADS = tuple(nfnetlink.set_head("policyd_bans", name) for name in ("ban4", "ban6"))


def _ban_messages(batch):
    return [body for kind, _flags, body in batch
            if kind == nfnetlink.NFT_MSG_NEWSETELEM and body.startswith(BAN_HEADS)]


def test_bans_given_with_a_load_go_in_its_batch(document):
    """Tables put back after a flush come back with their bans in one transaction."""
    context, netlink = FakeContext(), FakeNetlink()
    _nft(context, netlink).load(document, bans=BANS)
    (batch,) = netlink.batches
    assert batch[:-2] == nft_mod.nlbatch.encode(document) and len(_ban_messages(batch)) == 2


def test_bans_follow_a_load_through_libnftables_in_a_second_batch(document):
    context, netlink = FakeContext(), FakeNetlink(refuse=1)  # the document's encoding only
    _nft(context, netlink).load(document, bans=BANS)
    assert [dry for dry, _ in context.loads] == [True, False]
    (batch,) = netlink.batches
    assert len(_ban_messages(batch)) == 2 == len(batch)
