"""The daemon's list following: diffs of list files become element changes."""
import socket
import textwrap

import pytest

from policyd.kernel import listsync, nlbatch
from policyd.policy import reader as policy


class FakeNetlink:
    def __init__(self, fail=False):
        self.batches = []
        self.fail = fail

    def send_batch(self, messages):
        if self.fail:
            raise OSError(2, "No such file or directory")
        self.batches.append(messages)


class FakeNft:
    def __init__(self, fail=False):
        self.netlink = FakeNetlink(fail)


def _keys(message):
    """(message type, [(key bytes, is end)]) of one element message."""
    kind, _flags, body = message
    keys = []
    for attr, value in nlbatch_attrs(body):
        if attr == 3:
            for _, element in nlbatch_attrs(value):
                key, end = None, False
                for sub, data in nlbatch_attrs(element):
                    if sub == 1:
                        key = nlbatch_attrs(data)[0][1]
                    elif sub == 3:
                        end = data == b"\0\0\0\1"
                keys.append((key, end))
    return kind, keys


def nlbatch_attrs(payload):
    from policyd.kernel.nfwire import _attrs
    return _attrs(payload)


@pytest.fixture
def setup(tmp_path):
    listing = tmp_path / "allow.txt"
    listing.write_text("# office\n192.0.2.0/28\n192.0.2.32/28 ; note\n2001:db8:1::/64\n")
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        services:
          ollama: {{ports: [11434], allow: [127.0.0.0/8, {{file: {listing}}}]}}
    """))
    reloads = []
    nft = FakeNft()
    sync = listsync.ListSync(nft, policy.load(path), lambda: None, lambda: reloads.append(1))
    sync.stop()
    return sync, nft, listing, reloads


def test_a_change_sends_only_the_changed_intervals_in_one_batch(setup):
    sync, nft, listing, reloads = setup
    listing.write_text("# office\n192.0.2.0/28\n198.51.100.0/24 ; new\n2001:db8:1::/64\n")
    sync.changed.add(str(listing))
    assert sync.sync() == 1 and not reloads
    (batch,) = nft.netlink.batches
    decoded = [_keys(m) for m in batch]
    assert decoded == [
        (nlbatch.DELSETELEM, [(socket.inet_aton("192.0.2.32"), False),
                              (socket.inet_aton("192.0.2.48"), True)]),
        (nlbatch.NEWSETELEM, [(socket.inet_aton("198.51.100.0"), False),
                              (socket.inet_aton("198.51.101.0"), True)])]
    assert all(b"committed_ollama_v4\0" in m[2] for m in batch)
    # Nothing changed: nothing sent.
    sync.changed.add(str(listing))
    assert sync.sync() == 0 and len(nft.netlink.batches) == 1


def test_a_bad_line_keeps_what_is_loaded(setup, caplog):
    sync, nft, listing, reloads = setup
    listing.write_text("# office\n192.0.2.0/28\n192.0.2.33/28\n")
    sync.changed.add(str(listing))
    assert sync.sync() == 0 and not nft.netlink.batches and not reloads
    assert f"{listing}:3: '192.0.2.33/28' has host bits set" in caplog.text
    (stats,) = sync.stats()
    assert stats["entries"] == 3 and stats["error"].endswith("has host bits set")
    caplog.clear()
    sync.changed.add(str(listing))  # the 5 s poll: the same bad version is said once
    assert sync.sync() == 0 and "list refused" not in caplog.text
    # The next good version is diffed against what is loaded, not the bad one.
    listing.write_text("# office\n192.0.2.0/28\n192.0.2.32/28\n2001:db8:2::/64\n")
    sync.changed.add(str(listing))
    assert sync.sync() == 1 and not reloads
    assert sync.stats()[0]["error"] is None
    v6 = [(socket.inet_pton(socket.AF_INET6, a), end) for a, end in (
        ("2001:db8:1::", False), ("2001:db8:1:1::", True),
        ("2001:db8:2::", False), ("2001:db8:2:1::", True))]
    assert [_keys(m) for m in nft.netlink.batches[0]] == [
        (nlbatch.DELSETELEM, v6[:2]), (nlbatch.NEWSETELEM, v6[2:])]


def test_a_set_left_empty_reloads_the_policy_whole(setup):
    sync, nft, listing, reloads = setup
    listing.write_text("192.0.2.0/28\n192.0.2.32/28\n")
    sync.changed.add(str(listing))
    sync.sync()
    assert reloads == [1] and not nft.netlink.batches


def test_nesting_is_recomputed_and_a_kernel_refusal_reloads_whole(setup):
    sync, nft, listing, reloads = setup
    # 192.0.2.0/24 swallows both /28s: they leave the kernel, the /24 comes in.
    listing.write_text("192.0.2.0/28\n192.0.2.32/28\n192.0.2.0/24\n2001:db8:1::/64\n")
    sync.changed.add(str(listing))
    assert sync.sync() == 1
    delete, add = [_keys(m) for m in nft.netlink.batches[0]]
    assert len(delete[1]) == 4 and add[1] == [(socket.inet_aton("192.0.2.0"), False),
                                              (socket.inet_aton("192.0.3.0"), True)]
    nft.netlink.fail = True
    listing.write_text("192.0.2.0/24\n")
    sync.changed.add(str(listing))
    sync.sync()
    assert reloads == [1]


def test_a_deleted_list_keeps_what_is_loaded_and_is_said_once(setup, caplog):
    sync, nft, listing, reloads = setup
    listing.unlink()
    for _ in range(3):  # the 5 s poll
        sync.changed.add(str(listing))
        assert sync.sync() == 0
    assert caplog.text.count("list refused") == 1 and not nft.netlink.batches
    assert sync.stats()[0]["error"] == "No such file or directory"
    listing.write_text("# office\n192.0.2.0/28\n192.0.2.32/28 ; note\n2001:db8:1::/64\n")
    sync.changed.add(str(listing))
    assert sync.sync() == 0 and sync.stats()[0]["error"] is None  # back as it was


def test_an_entry_on_two_lines_stays_until_both_are_gone(setup):
    sync, nft, listing, reloads = setup
    listing.write_text("192.0.2.0/28 ; a\n192.0.2.0/28 ; b\n192.0.2.32/28\n2001:db8:1::/64\n")
    sync.changed.add(str(listing))
    sync.sync()
    assert nft.netlink.batches == []  # the same entries, written differently
    listing.write_text("192.0.2.0/28 ; b\n192.0.2.32/28\n2001:db8:1::/64\n")
    sync.changed.add(str(listing))
    sync.sync()
    assert nft.netlink.batches == []  # still listed once
    listing.write_text("192.0.2.32/28\n2001:db8:1::/64\n")
    sync.changed.add(str(listing))
    assert sync.sync() == 1
    (batch,) = nft.netlink.batches
    assert [_keys(m) for m in batch] == [(nlbatch.DELSETELEM, [
        (socket.inet_aton("192.0.2.0"), False), (socket.inet_aton("192.0.2.16"), True)])]


@pytest.mark.parametrize("data", [
    b"192.0.2.0/24\n2001:db8::/32\n198.51.100.7\n",
    b"# header\n192.0.2.0/24 ; SBL1\n\n  203.0.113.0/25\t\r\n2001:db8:1::/48 # x\n",
    b"192.0.2.0/24\n192.0.2.0/24\n192.0.2.0/24 # again\n",
    b"192.0.2.1/\n::ffff:192.0.2.1\n",
    b"",
])
def test_a_list_read_in_bulk_is_known_as_read_line_by_line(data, monkeypatch):
    """_Followed's C-speed reading leaves exactly what the line-by-line one does."""
    from policyd.policy import listmodel, listparse
    fast = listmodel._Followed("/l", data)
    monkeypatch.setattr(listparse, "bulk", lambda _data: None)
    slow = listmodel._Followed("/l", data)
    assert (fast.raw, fast.refs, fast.entries) == (slow.raw, slow.refs, slow.entries)
