"""Nft.load: one raw netlink batch when the encoder knows the document, libnftables
otherwise, and never a half-loaded or silently dropped policy."""
import json
import os

import pytest

from policyd.banning.bankeys import BanElements
from policyd.kernel import nfnetlink, nlattr
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
    """Records batches instead of sending them; encodes messages as the real one.
    tables: {table: (chain names, set names)} the kernel has (none by default)."""

    def __init__(self, refuse=False, tables=None):
        self.refuse = refuse
        self.batches = []
        self.tables = tables or {}

    def skeleton(self, table):
        chains, sets = self.tables.get(table, ((), ()))
        return frozenset((name, 1) for name in chains), frozenset(sets)

    def send_batch(self, messages):
        if self.refuse:
            if self.refuse is not True:  # a count: refuse that many batches
                self.refuse -= 1
            raise OSError(22, "Invalid argument")
        self.batches.append(messages)


@pytest.fixture(autouse=True)
def in_place_kernel(monkeypatch):
    """A kernel that gets tables updated in place (6.18 and later)."""
    monkeypatch.setattr(nft_mod.os, "uname", lambda: os.uname_result(
        ("Linux", "host", "6.18.44-1-amd64", "#1", "x86_64")))


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


# What the kernel has of the guard table after POLICY was applied, plus a chain
# and a set an earlier policy had.
KERNEL_TABLE = {"policyd": ({"input", "forward", "committed_input", "committed_forward",
                             "committed_svc_ollama", "committed_svc_old"},
                            {"committed_ollama_v4", "committed_ollama_v6", "committed_old_v4"})}


def _verbs(batch, table="policyd"):
    """The deleting and flushing messages of `batch` for `table`, in order."""
    names = {nft_mod.nlbatch.DELTABLE: "delete table", nft_mod.nlbatch.DELCHAIN: "delete chain",
             nft_mod.nlbatch.DELSET: "delete set", nft_mod.nlbatch.DELRULE: "flush chain",
             nft_mod.nlbatch.DELSETELEM: "flush set"}
    head = nlattr.string(1, table)
    return [names[kind] for kind, _flags, body in batch if kind in names and body.startswith(head)]


def test_a_table_the_kernel_has_is_updated_in_place(document):
    """Its sets and chains stay (a set made in the transaction that makes its rules
    live may miss lookups: policyd.kernel.inplace); what the policy dropped goes."""
    context, netlink = FakeContext(), FakeNetlink(tables=KERNEL_TABLE)
    _nft(context, netlink).load(document, bans=BANS)
    (batch,) = netlink.batches
    verbs = _verbs(batch)
    assert "delete table" not in verbs and verbs.count("flush chain") == 6
    assert verbs.count("delete chain") == 1 and verbs.count("delete set") == 1
    assert verbs.count("flush set") >= 2 and len(_ban_messages(batch)) == 2
    # Every rule goes before anything is deleted: the kernel refuses to delete
    # a set or chain a rule still names.
    assert verbs.index("delete set") > max(i for i, v in enumerate(verbs) if v == "flush chain")


def test_a_kernel_refusing_the_update_in_place_gets_the_table_replaced(document, caplog):
    context, netlink = FakeContext(), FakeNetlink(refuse=1, tables=KERNEL_TABLE)
    caplog.set_level("INFO")
    _nft(context, netlink).load(document)
    (batch,) = netlink.batches
    assert batch == nft_mod.nlbatch.encode(document) and "delete table" in _verbs(batch)
    assert "replacing it whole" in caplog.text and context.loads == []


def test_a_table_the_kernel_lacks_is_loaded_as_written(document):
    context, netlink = FakeContext(), FakeNetlink(tables={"other": ({"input"}, set())})
    _nft(context, netlink).load(document)
    assert netlink.batches == [nft_mod.nlbatch.encode(document)]


def test_a_table_only_deleted_stays_deleted():
    from policyd.rules.compile import delete_table
    from policyd.rules.model import Ruleset
    document = delete_table(Ruleset(), "policyd").document()
    context, netlink = FakeContext(), FakeNetlink(tables=KERNEL_TABLE)
    _nft(context, netlink).load(document)
    assert _verbs(netlink.batches[0]) == ["delete table"]


class RefusingNth(FakeNetlink):
    """Refuses only the batches of the given numbers (0: the first sent)."""

    def __init__(self, refused, tables):
        super().__init__(tables=tables)
        self.refused, self.sent = refused, 0

    def send_batch(self, messages):
        self.sent += 1
        if self.sent - 1 in self.refused:
            raise OSError(17, "File exists")
        self.batches.append(messages)


WITHOUT_V6 = {"policyd": (KERNEL_TABLE["policyd"][0], {"committed_ollama_v4"})}


def test_an_interval_set_the_kernel_lacks_is_made_empty_in_a_transaction_before(document):
    """By the update that makes rules name it, the set exists (and is searchable)."""
    context, netlink = FakeContext(), FakeNetlink(tables=WITHOUT_V6)
    _nft(context, netlink).load(document)
    made, update = netlink.batches
    assert [kind for kind, _f, _b in made] == [nft_mod.nlbatch.NEWSET]
    assert b"committed_ollama_v6" in made[0][2]
    assert "delete table" not in _verbs(update) and nft_mod.nlbatch.NEWSETELEM in [k for k, _f, _b in update]


def test_sets_made_for_a_refused_update_are_deleted_before_the_table_is_replaced(document):
    context, netlink = FakeContext(), RefusingNth({1}, WITHOUT_V6)
    _nft(context, netlink).load(document)
    made, unmade, whole = netlink.batches
    assert [kind for kind, _f, _b in made] == [nft_mod.nlbatch.NEWSET]
    assert [kind for kind, _f, _b in unmade] == [nft_mod.nlbatch.DELSET]
    assert b"committed_ollama_v6" in unmade[0][2]
    assert whole == nft_mod.nlbatch.encode(document)


def test_a_kernel_before_6_18_gets_the_table_replaced_whole(document, monkeypatch):
    """Debian 12's 6.1 misses lookups while a set's ranges are replaced in place,
    not in a new set: there the table is swapped whole, as policyd always did."""
    monkeypatch.setattr(nft_mod.os, "uname", lambda: os.uname_result(
        ("Linux", "host", "6.1.0-57-amd64", "#1", "x86_64")))
    context, netlink = FakeContext(), FakeNetlink(tables=KERNEL_TABLE)
    _nft(context, netlink).load(document)
    assert netlink.batches == [nft_mod.nlbatch.encode(document)]


@pytest.mark.parametrize("release, in_place", [
    ("6.18.44-fc-v1045", True), ("6.19.0", True), ("7.0.1-1-amd64", True),
    ("6.1.0-57-amd64", False), ("6.12.48+deb13-amd64", False), ("5.10.0-32-amd64", False),
    ("garbage", False), ("", False)])
def test_which_kernels_load_in_place(release, in_place):
    assert nft_mod.loads_in_place(release) is in_place
