"""policyd.pieces: bulk work cut into pieces gives exactly what one pass gives;
the daemon's list work (parse, model, diff, sort) done in pieces reads alike."""
import pytest
from hypothesis import given, settings, strategies as st

from policyd import pieces
from policyd.policy import listmodel, listparse


@pytest.fixture
def tiny_pieces(monkeypatch):
    """Pieces of a few items, so every test crosses many piece boundaries."""
    monkeypatch.setattr(pieces, "PIECE", 3)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 5)


ITEMS = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(items=ITEMS, presorted=st.booleans())
def test_sort_is_sorted(items, presorted):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pieces, "PIECE", 3)
        if presorted:
            items = sorted(items)[::-1][:5] + sorted(items)
        assert pieces.sort(items) == sorted(items)


@settings(max_examples=200, deadline=None)
@given(a=ITEMS, b=ITEMS)
def test_set_operations_match_one_pass(a, b):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pieces, "PIECE", 3)
        assert pieces.to_set(a) == set(a)
        assert pieces.without(a, set(b)) == set(a) - set(b)
        assert pieces.without(set(a), set(b)) == set(a) - set(b)
        assert pieces.equal(a, b) == (a == b)
        assert pieces.equal(a, list(a))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=80) | st.text("ab\n", max_size=80).map(str.encode),
       size=st.integers(1, 9))
def test_line_pieces_split_as_one_split(data, size):
    assert b"\n".join(pieces.line_pieces(data, size)) == data
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pieces, "PIECE_BYTES", size)
        assert pieces.split_lines(data) == data.split(b"\n")


LISTS = [
    b"192.0.2.0/24\n2001:db8::/32\n198.51.100.7\n" * 3,
    b"# header\n192.0.2.0/24 ; SBL1\n\n  203.0.113.0/25\t\r\n2001:db8:1::/48 # x\n",
    b"\n" * 9 + b"192.0.2.0/24\n" + b"\n" * 9 + b"2001:db8::/48\n",
    b"".join(b"2001:db8:%x::/48\n" % i for i in range(40)) + b"192.0.2.0/24",
    b"".join(b"2001:db8:%x::/48\n" % i for i in range(20)) + b"192.0.2.1/24\n",  # host bits
]


@pytest.mark.parametrize("data", LISTS)
def test_bulk_parse_in_pieces_reads_as_line_by_line(data, tiny_pieces):
    """Line numbers run on across pieces; a bad line in any piece steps aside
    for the line-by-line parser."""
    whole = listparse._bulk(data)
    assert listparse.bulk(data) == whole
    if whole is not None:
        assert whole == listparse._one_by_one(data, "/l")


@pytest.mark.parametrize("old, new", [(LISTS[3], LISTS[3].replace(b"2001:db8:7::", b"2001:db8:ff::")),
                                      (LISTS[0], LISTS[1]), (LISTS[3], b"")])
def test_a_list_model_in_pieces_diffs_as_in_one_pass(old, new, tiny_pieces, monkeypatch):
    fast = listmodel._Followed("/l", old)
    fast_diff = fast.diff(new)[:2]
    monkeypatch.setattr(pieces, "PIECE", 10 ** 6)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 10 ** 9)
    whole = listmodel._Followed("/l", old)
    assert (fast.raw, fast.refs, fast.entries) == (whole.raw, whole.refs, whole.entries)
    assert fast_diff == whole.diff(new)[:2]


def _sweep(bits, entries):
    """The plain sweep: in address order, skip what starts inside the last kept."""
    out, end = [], -1
    for first, prefixlen, _line in sorted(entries):
        if first > end:
            out.append((first, prefixlen))
            end = first + (1 << (bits - prefixlen)) - 1
    return out


class _List:
    def __init__(self, entries):
        self._entries = entries

    def entries(self, _version):
        return self._entries


NETWORKS = st.lists(st.tuples(st.integers(0, 1023), st.integers(22, 32)).map(
    lambda pair: ((pair[0] << 6) & ~((1 << (32 - pair[1])) - 1), pair[1], 0)), max_size=40)


@settings(max_examples=400, deadline=None)
@given(entries=NETWORKS)
def test_the_disjoint_sweep_in_pieces_keeps_what_the_plain_sweep_keeps(entries):
    from policyd.rules import elements
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pieces, "PIECE", 3)
        kept = elements.disjoint_networks(4, (), [_List(entries)])
        assert kept == _sweep(32, entries)
        assert elements.Elements(4, kept).intervals == [
            (first, first + (1 << (32 - prefixlen)) - 1) for first, prefixlen in kept]


@settings(max_examples=300, deadline=None)
@given(held=st.sets(st.integers(0, 200), max_size=80), gone=st.data(),
       new=st.sets(st.integers(201, 400), max_size=80), small=st.integers(0, 100))
def test_a_kernel_set_committed_in_pieces_holds_what_one_pass_gives(held, gone, new, small):
    """A list change's intervals out and in, one by one (a few) or as a merge of
    the kept ones with the new (many): the same sorted list either way."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pieces, "PIECE", 3)
        patch.setattr(listmodel, "FEW_CHANGES", small)
        kernel_set = listmodel._KernelSet("s", 4, [], [])
        kernel_set.ordered = sorted((n * 4, n * 4 + 1) for n in held)
        kernel_set.count = len(kernel_set.ordered)
        before = kernel_set.ordered
        remove = sorted(gone.draw(st.sets(st.sampled_from(before)) if before else st.just(set())))
        add = sorted((n * 4, n * 4 + 1) for n in new)
        kernel_set.commit_delta(remove, add)
        assert kernel_set.ordered == sorted(set(before) - set(remove) | set(add))
        assert kernel_set.count == len(kernel_set.ordered)
        assert before == sorted((n * 4, n * 4 + 1) for n in held)   # a new list, not changed in place
