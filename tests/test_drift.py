"""The element watch: generation gate, digests, and a full comparison only when needed."""
from policyd.kernel import drift


class FakeNetlink:
    def __init__(self, sets):
        self.sets = sets  # name -> set of keys
        self.gen = 1
        self.dumps = 0
        self.compares = 0

    def generation(self):
        return self.gen

    def set_element_payloads(self, table, name):
        self.dumps += 1
        yield b"".join(sorted(self.sets[name]))

    def set_keys(self, table, name):
        self.compares += 1
        return {key: None for key in self.sets[name]}


def _watch(expected):
    wakes = []
    watch = drift.ElementWatch("t", lambda: expected, lambda: wakes.append(1))
    return watch, wakes


def test_interval_keys_match_the_kernel_encoding():
    assert drift.interval_keys([(0x0A000000, 0x0A0000FF)], 4) == {
        bytes(4), bytes([10, 0, 0, 0]), bytes([10, 0, 1, 0])}
    # An interval up to the top address has no end element; one from 0 no leading end.
    assert drift.interval_keys([(0, 0xFFFFFFFF)], 4) == {bytes(4)}


def test_unchanged_generation_costs_one_request_and_a_change_is_found():
    intervals = [(0x0A000000, 0x0A0000FF), (0x0B000000, 0x0B0000FF)]
    expected = {"allow4": (4, intervals)}
    netlink = FakeNetlink({"allow4": drift.interval_keys(intervals, 4)})
    clock = [0.0]
    watch, wakes = _watch(expected)
    assert watch.check(netlink, now=lambda: clock[0]) is False
    assert (netlink.dumps, netlink.compares) == (1, 1)  # first look: verified in full
    for _ in range(5):
        clock[0] += 10
        assert watch.check(netlink, now=lambda: clock[0]) is False
    assert (netlink.dumps, netlink.compares) == (1, 1)  # same generation: nothing dumped
    # Another table's transaction (a ban): a digest, no full comparison.
    netlink.gen += 1
    clock[0] += 10
    assert watch.check(netlink, now=lambda: clock[0]) is False
    assert (netlink.dumps, netlink.compares) == (2, 1)
    # An element deleted by hand: the digest moves, the comparison names it.
    netlink.gen += 1
    netlink.sets["allow4"].discard(bytes([11, 0, 0, 0]))
    clock[0] += 10
    assert watch.check(netlink, now=lambda: clock[0]) is True
    assert watch.drifted and wakes == [1]
    assert watch.differences == ["allow4: 1 element(s) missing, 0 not in the policy"]


def test_digests_are_rate_limited_while_the_generation_keeps_moving():
    intervals = [(0x0A000000, 0x0A0000FF)]
    netlink = FakeNetlink({"allow4": drift.interval_keys(intervals, 4)})
    clock = [0.0]
    watch, _wakes = _watch({"allow4": (4, intervals)})
    watch.check(netlink, now=lambda: clock[0])
    for _ in range(120):  # a minute of a flood of bans: a transaction every round
        netlink.gen += 1
        clock[0] += 0.5
        watch.check(netlink, now=lambda: clock[0])
    # 2, 4, 8, 16, 16, 16 s apart: not every 2 s.
    assert netlink.dumps <= 1 + 6 and netlink.compares == 1
    # Calm again: the next change is looked at within DIGEST_SECONDS.
    clock[0] += 0.5
    watch.check(netlink, now=lambda: clock[0])
    netlink.gen += 1
    netlink.sets["allow4"] = set()
    clock[0] += drift.DIGEST_SECONDS
    assert watch.check(netlink, now=lambda: clock[0]) is True


def test_a_change_by_the_main_thread_meanwhile_is_not_a_drift():
    intervals = [(0x0A000000, 0x0A0000FF)]
    netlink = FakeNetlink({"allow4": set()})  # kernel mid-change
    epochs = iter([1, 1])  # odd: the main thread is between kernel and its books
    watch = drift.ElementWatch("t", lambda: {"allow4": (4, intervals)}, lambda: None,
                               epoch=lambda: next(epochs))
    assert watch.check(netlink, now=lambda: 0.0) is False and not watch.drifted


def test_a_kernel_dump_in_the_known_form_needs_no_parse():
    intervals = [(0x0A000000, 0x0A0000FF), (0x0B000000, 0x0B0000FF)]

    class DumpingNetlink(FakeNetlink):
        def set_element_payloads(self, table, name):
            self.dumps += 1
            yield drift.dump_form(self.intervals, 4)

        def set_keys(self, table, name):
            self.compares += 1
            return dict.fromkeys(drift.interval_keys(self.intervals, 4))

    netlink = DumpingNetlink({})
    netlink.intervals = list(intervals)
    watch, _wakes = _watch({"allow4": (4, intervals)})
    assert watch.check(netlink, now=lambda: 0.0) is False
    assert (netlink.dumps, netlink.compares) == (1, 0)
    netlink.gen += 1
    netlink.intervals.pop()
    assert watch.check(netlink, now=lambda: 10.0) is True
    assert netlink.compares == 1  # a parse only to say what differs
    assert watch.differences == ["allow4: 2 element(s) missing, 0 not in the policy"]


def test_dump_form_is_what_the_kernel_writes():
    """Bytes of a dump of { 10.0.0.0/25, 10.0.0.128/25, 10.0.2.0/24 } as 6.18 wrote them."""
    intervals = [(0x0A000000, 0x0A00007F), (0x0A000080, 0x0A0000FF), (0x0A000200, 0x0A0002FF)]
    assert drift.dump_form(intervals, 4).hex() == (
        "180001000c000100080001000a0003000800030000000001"
        "100001000c000100080001000a000200"
        "180001000c000100080001000a0001000800030000000001"
        "100001000c000100080001000a000080"
        "180001000c000100080001000a0000800800030000000001"
        "100001000c000100080001000a000000"
        "180001000c00010008000100000000000800030000000001")
