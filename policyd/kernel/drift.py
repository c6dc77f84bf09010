"""The daemon's watch on the elements of the guard table's interval sets: an
allowlist entry deleted by hand is noticed, at a cost that does not grow with
100k elements on the main loop.

Owns three steps, run on a thread of its own: the ruleset generation (one tiny
request) says whether any transaction happened at all; if one did, at most
every DIGEST_SECONDS (backing off to MAX_DIGEST_SECONDS while a flood of
bans keeps moving it), a digest of each set's elements (the kernel serialises
them, Python only hashes) says whether the guard sets moved; and only when a
digest moves, a full comparison with what the daemon loaded says whether they
differ. The main loop only reads `drifted`.
"""
import hashlib
import logging
import struct
import threading
import time

from policyd.kernel import nlbatch
from policyd.kernel.nlattr import big_endian
from policyd.kernel.nfnetlink import Netlink

log = logging.getLogger(__name__)

DIGEST_SECONDS = 2.0
MAX_DIGEST_SECONDS = 16.0  # while the generation keeps moving and the sets do not


def interval_keys(intervals, length):
    """The keys the kernel holds for disjoint (first, last) intervals: each start,
    each end (one past the last address) and nft's leading end element at 0."""
    top = (1 << (8 * length)) - 1
    keys = set()
    if intervals and intervals[0][0] != 0:
        keys.add(bytes(length))
    for first, last in intervals:
        keys.add(first.to_bytes(length, "big"))
        if last != top:
            keys.add((last + 1).to_bytes(length, "big"))
    return keys


def dump_form(intervals, length):
    """The bytes a set-element dump of disjoint (first, last) intervals carries, as
    the kernel writes them (checked on 6.18: highest key first, a start element
    before an end element of the same key, nft's end element at 0 last), so
    comparing a set with what it should hold is a hash, not a parse of 200k
    elements. Where a kernel writes otherwise, callers fall back to a parse.

    Built column by column (every element of a kind has the same headers), so
    100k intervals take milliseconds, not a Python loop over 200k elements.
    """
    start_head = struct.pack("=HHHHHH", 8 + 4 + length, 1, 4 + 4 + length, 1, 4 + length, 1)
    end_head = struct.pack("=HHHHHH", 8 + 4 + length + 8, 1, 4 + 4 + length, 1, 4 + length, 1)
    end_tail = struct.pack("=HH", 8, 3) + struct.pack(">I", 1)
    sentinel = end_head + bytes(length) + end_tail
    if not intervals:
        return b""
    top = (1 << (8 * length)) - 1
    ordered = intervals[::-1]
    ends = big_endian([0 if last == top else last + 1 for _first, last in ordered], length)
    starts = big_endian([first for first, _last in ordered], length)
    # One record per interval: its end element, then its start element.
    pieces = [(end_head, None), (ends, length), (end_tail, None), (start_head, None),
              (starts, length)]
    size = sum(length if width else len(piece) for piece, width in pieces)
    count = len(ordered)
    out = bytearray(size * count)
    column = 0
    for piece, width in pieces:
        if width is None:
            for offset, byte in enumerate(piece):
                out[column + offset::size] = bytes([byte]) * count
            column += len(piece)
        else:
            for offset in range(width):
                out[column + offset::size] = piece[offset::width]
            column += width
    if ordered[0][1] == top:  # an interval up to the last address has no end element
        del out[:len(end_head) + length + len(end_tail)]
    if intervals[0][0] != 0:
        out += sentinel
    return bytes(out)


def expected_intervals(ruleset, table, skip=()):
    """{set name: (key length, sorted (first, last) intervals)} of the interval sets
    without timeouts that `ruleset` (policyd.rules.model) leaves in `table`, but those
    in `skip`."""
    out = {}
    for item in ruleset.tables[table].sets.values():
        typename = item.fields.get("type")
        if (item.name in skip or "interval" not in item.flags or "timeout" in item.flags
                or typename not in ("ipv4_addr", "ipv6_addr")):
            continue
        intervals = getattr(item.elem, "intervals", None)
        if intervals is None:
            intervals = nlbatch.intervals_of(typename, item.elem)
        out[item.name] = (4 if typename == "ipv4_addr" else 16, intervals)
    return out


class ElementWatch:
    """Follows one table's interval sets; `drifted` turns true when they differ
    from `expected()` ({name: (key length, intervals)}, called on this thread:
    it must return data the main thread no longer mutates)."""

    def __init__(self, table, expected, wake, interval=0.5, epoch=lambda: 0):
        self.table = table
        self.expected = expected
        self.epoch = epoch  # moves while the main thread changes the kernel itself
        self.wake = wake
        self.interval = interval
        self.drifted = False
        self.differences = []
        self._digests = None  # {name: digest} of a state verified equal to expected()
        self._wanted = {}  # name -> (intervals object, digest of its dump form)
        self._generation = None
        self._last_digest = float("-inf")
        self._pause = DIGEST_SECONDS
        self._seen = None  # the generation at the last round
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="policyd-drift", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def reset(self):
        """The main thread loaded the table itself: verify again from scratch."""
        self._digests = self._generation = None
        self.drifted = False
        self.differences = []

    def _run(self):
        netlink = Netlink()
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.check(netlink)
                except OSError as exc:
                    # A table that is gone is the skeleton check's to notice.
                    log.debug("element check skipped: %s", exc)
                except Exception:  # a bug here must not end the check for good
                    log.exception("element check failed")
        finally:
            netlink.close()

    def check(self, netlink, now=time.monotonic):
        """One round; returns True when it found the sets different."""
        if self.drifted:
            return True  # until the main thread has restored and reset us
        generation = netlink.generation()
        moving, self._seen = generation != self._seen, generation
        if not moving:
            self._pause = DIGEST_SECONDS  # calm: what changed is looked at soon
        if generation == self._generation or now() < self._last_digest + self._pause:
            return False
        epoch = self.epoch()
        if epoch % 2:
            return False  # the main thread is changing the kernel: not now
        self._last_digest = now()
        expected = self.expected()
        digests = {name: self._digest(netlink, name) for name in expected}
        if digests == self._digests:
            # Other transactions (a flood of bans) keep moving the generation:
            # look less often while they do, the sets being as they were.
            self._generation = generation
            if moving:
                self._pause = min(2 * self._pause, MAX_DIGEST_SECONDS)
            return False
        if self.epoch() != epoch:
            return False  # the main thread changed it meanwhile: look again next round
        if digests == {name: self._expected_digest(name, *want) for name, want in expected.items()}:
            differences = []
        else:  # a difference, or a kernel that writes its dump otherwise: parse to know
            differences = self._compare(netlink, expected)
        if netlink.generation() != generation or self.epoch() != epoch or epoch % 2:
            return False  # something changed meanwhile: look again next round
        if differences:
            self.differences = differences
            self.drifted = True
            self.wake()
            return True
        self._digests, self._generation = digests, generation
        return False

    def _expected_digest(self, name, length, intervals):
        cached = self._wanted.get(name)
        if cached is None or cached[0] is not intervals:
            cached = self._wanted[name] = (intervals, hashlib.sha256(
                dump_form(intervals, length)).hexdigest())
        return cached[1]

    def _digest(self, netlink, name):
        digest = hashlib.sha256()
        for payload in netlink.set_element_payloads(self.table, name):
            digest.update(payload)
        return digest.hexdigest()

    def _compare(self, netlink, expected):
        """["SET: N elements missing, M not in the policy", ...]; [] if equal."""
        out = []
        for name, (length, intervals) in expected.items():
            have = set(netlink.set_keys(self.table, name))
            want = interval_keys(intervals, length)
            if have != want:
                out.append(f"{name}: {len(want - have)} element(s) missing, "
                           f"{len(have - want)} not in the policy")
        return out
