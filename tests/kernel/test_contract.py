"""The kernel behaviours policyd depends on, checked on the running kernel with real packets.

Runs on the host in `make test` and on Debian 12's own 6.1 in `make test-kernel`.
Each test drives policyd's kernel adapter (policyd.kernel.nft) in-process: what is
under test is the kernel, not the CLI. Waits on the clock are scaled by
netlab.TIME_SCALE, so emulation makes them slower, never red.
"""
import ctypes
import fcntl
import ipaddress
import json
import mmap
import os
import platform
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kernel_lab import CLIENT, MARKS, SERVER, lab, pair  # noqa: F401 (fixtures)
from policyd_lab.netlab import TIME_SCALE, in_namespace, wait_for
from policyd.rules.compile import TRIAL_SET, compile_policy
from policyd.rules.model import FAMILY, Ruleset
from policyd.errors import KernelError
from policyd.banning.bankeys import BanElements
from policyd.kernel.nft import BanTable, loads_in_place
from policyd.logs.tail import LogFollower
from policyd.logs.writefence import WriteFence
from fakes import MemoryPositions

OPEN = """\
    version: 1
    services:
      proxy:
        ports: [8080]
        allow: [any]
    bans:
      ports: [8080, 11434]
"""
CLOSED = """\
    version: 1
    services:
      proxy:
        ports: [8080]
        allow: [192.0.2.0/24]
"""
pytestmark = MARKS
N = ipaddress.ip_network
HOUR = 3600
# A dropped SYN is only ever seen as a timeout: wait long enough that a slow
# guest's answer is not mistaken for a drop, but not the full scale (many checks).
SHUT = min(0.5 * TIME_SCALE, 3.0)
OPEN_WAIT = 2.0 * TIME_SCALE


def _reaches(pair, source):
    return pair.reaches(source, timeout=OPEN_WAIT)


def _shut(pair, source):
    return not pair.reaches(source, timeout=SHUT)


def _load(pair, policy, document=None):
    pair.kernel(lambda nft: nft.load(document or compile_policy(policy).document()))


def _bans(pair, policy):
    """A BanTable call, run in the server's namespace: _bans(pair, p)("add_bans", [...])."""
    def call(method, *args):
        return pair.kernel(lambda nft: getattr(
            BanTable(nft, policy.bans_table, policy.bans.ipv6_prefix), method)(*args))
    return call


def test_table_swap_is_atomic_and_a_refused_load_changes_nothing(pair):
    opened, closed = pair.policy(OPEN), pair.policy(CLOSED, "closed.yaml")
    _load(pair, opened)
    assert _reaches(pair, "v4") and _reaches(pair, "v6")
    _load(pair, closed)  # the same table, replaced in one transaction
    assert _shut(pair, "v4") and _shut(pair, "v6")
    before = pair.ruleset()
    refused = compile_policy(opened).document()
    refused["nftables"].append({"add": {"element": {
        "family": FAMILY, "table": opened.table, "name": "no_such_set", "elem": ["192.0.2.7"]}}})
    with pytest.raises(KernelError):
        _load(pair, opened, refused)
    assert pair.ruleset() == before
    assert _shut(pair, "v4")


def _listed(pair, host=None):
    """The ruleset as `nft -j` lists it (on the server, or `host`), without
    handles: objects in a stable order, each chain's rules in theirs."""
    objects, rules = [], {}
    host = host or pair.server
    for item in json.loads(host.nft("-j", "list", "ruleset").stdout)["nftables"]:
        (kind, obj), = item.items()
        obj = {key: value for key, value in obj.items() if key != "handle"}
        if kind == "rule":
            rules.setdefault((obj["table"], obj["chain"]), []).append(obj)
        elif kind != "metainfo":
            objects.append(json.dumps({kind: obj}, sort_keys=True))
    return sorted(objects), rules


def _set_handle(pair, table, name):
    listed = json.loads(pair.server.nft("-j", "list", "set", FAMILY, table, name).stdout)
    return next(item["set"]["handle"] for item in listed["nftables"] if "set" in item)


def test_a_table_reloaded_in_place_is_the_table_a_fresh_load_makes(pair):
    """policyd.kernel.nft loads a table the kernel has in place (its sets kept,
    flushed and filled again) on kernels that get that, and whole on the
    others; either way what it leaves must be what a first load makes."""
    wider = pair.policy(CLOSED.replace("[192.0.2.0/24]", "[192.0.2.0/24, 198.51.100.0/24]"), "w.yaml")
    opened, closed = pair.policy(OPEN), pair.policy(CLOSED, "closed.yaml")
    _load(pair, None, compile_policy(wider, opened, HOUR).document())   # on trial: more of each
    kept = _set_handle(pair, closed.table, "committed_proxy_v4")
    before = pair.kernel(lambda nft: nft.netlink.generation())
    _load(pair, closed)   # 198.51.100.0/24, the candidate's chains and sets, the trial set go
    assert pair.kernel(lambda nft: nft.netlink.generation()) == before + 1
    assert (_set_handle(pair, closed.table, "committed_proxy_v4") == kept) == loads_in_place()
    reloaded = _listed(pair)
    pair.server.nft("flush", "ruleset")
    _load(pair, closed)
    assert reloaded == _listed(pair)
    assert _shut(pair, "v4")


def test_a_set_new_to_the_table_is_made_first_and_a_refused_reload_leaves_no_trace(pair):
    """Where tables are updated in place, an interval set the kernel's table
    lacks is made, empty, in a transaction of its own before the update names
    it; if the update is refused, it is deleted again and the ruleset is as it
    was (elsewhere the table is replaced whole, in one transaction)."""
    opened, closed = pair.policy(OPEN), pair.policy(CLOSED, "closed.yaml")
    _load(pair, opened)   # allow any: no allowlist set
    before = pair.ruleset()
    refused = compile_policy(closed).document()   # encoded, then refused by the kernel
    refused["nftables"].append({"add": {"rule": {"family": FAMILY, "table": closed.table,
                                                 "chain": "input",
                                                 "expr": [{"goto": {"target": "no_such_chain"}}]}}})
    with pytest.raises(KernelError):
        _load(pair, closed, refused)
    assert pair.ruleset() == before
    generation = pair.kernel(lambda nft: nft.netlink.generation())
    _load(pair, closed)
    assert pair.kernel(lambda nft: nft.netlink.generation()) == generation + (
        2 if loads_in_place() else 1)
    assert _shut(pair, "v4")
    reloaded = _listed(pair)
    pair.server.nft("flush", "ruleset")
    _load(pair, closed)
    assert reloaded == _listed(pair)


RICHER = """\
    version: 1
    services:
      proxy:
        ports: [8080]
        allow: [192.0.2.0/24, "2001:db8:2::/64"]
        deny: [192.0.2.9, "2001:db8:2::9"]
        rate: 20/second
      dns:
        ports: [5353]
        proto: udp
        action: reject
        allow: [198.51.100.0/24]
"""


def _fresh_listing(pair, document):
    """_listed() of `document` loaded first, in the client's namespace (which
    holds no other table: its ruleset is flushed before)."""
    from policyd.kernel.nft import Nft
    pair.client.nft("flush", "ruleset")

    def load():
        nft = Nft()
        try:
            nft.load(document)
        finally:
            nft.close()
    in_namespace(pair.client.name, load)
    return _listed(pair, pair.client)


def test_every_reload_in_place_lists_as_a_first_load(pair, caplog):
    """A sequence of policies and trials, each loaded in place over the last:
    services, lists, a deny list, a rate set and a UDP service come and go."""
    caplog.set_level("INFO", logger="policyd.kernel.nft")
    opened, closed = pair.policy(OPEN), pair.policy(CLOSED, "closed.yaml")
    richer = pair.policy(RICHER, "richer.yaml")
    steps = [compile_policy(opened), compile_policy(richer), compile_policy(closed),
             compile_policy(closed, richer, HOUR), compile_policy(richer),
             compile_policy(opened, closed, HOUR), compile_policy(opened)]
    for number, ruleset in enumerate(steps):
        document = ruleset.document()
        _load(pair, None, document)
        assert _listed(pair) == _fresh_listing(pair, ruleset.document()), number
    assert "whole" not in caplog.text   # every step was loaded in place


def test_trial_expiry_falls_back_to_committed_and_a_late_confirm_fails_whole(pair):
    opened, closed = pair.policy(OPEN), pair.policy(CLOSED, "closed.yaml")
    seconds = max(3, round(TIME_SCALE))
    _load(pair, None, compile_policy(closed, opened, seconds).document())
    left = pair.kernel(lambda nft: nft.set_elements(closed.table, TRIAL_SET))
    assert [(value, 0 < remaining <= seconds) for value, _t, remaining in left] == [("tcp", True)]
    assert _reaches(pair, "v4"), "the candidate runs while the trial element lives"
    assert wait_for(lambda: not pair.kernel(
        lambda nft: nft.set_elements(closed.table, TRIAL_SET)), timeout=seconds + 5)
    assert _shut(pair, "v4"), "the kernel is back on the committed chain by itself"
    before = pair.ruleset()
    alive = Ruleset().delete_elements(opened.table, TRIAL_SET, ["tcp"])
    confirm = compile_policy(opened, into=alive).document()
    with pytest.raises(KernelError):
        _load(pair, None, confirm)
    assert pair.ruleset() == before


def test_timeout_elements_readded_longer_and_shorter_deleted_and_listed(pair):
    policy = pair.policy(OPEN)
    _load(pair, policy)
    bans = _bans(pair, policy)
    single = N(f"{CLIENT['v4']}/32")
    bans("add_bans", [(single, 5)])
    assert 0 < bans("list_bans")[single] <= 5
    assert _shut(pair, "v4") and _reaches(pair, "v6")
    # Linux < 6.3 has no DESTROYSETELEM, and re-adding an element keeps its old
    # timeout there: a longer re-ban must still reach the kernel.
    bans("add_bans", [(single, HOUR)])
    assert bans("list_bans")[single] > HOUR - 60
    bans("add_bans", [(single, 100)])
    assert 90 < bans("list_bans")[single] <= 100
    assert "timeout 1m40s" in pair.server.nft("list", "set", "inet", policy.bans_table,
                                              "ban4").stdout
    bans("remove_bans", [single, N("198.51.100.99/32")])  # one present, one missing
    assert bans("list_bans") == {}
    bans("remove_bans", [single])  # missing only
    assert _reaches(pair, "v4")


def test_a_reban_outlives_the_first_timeout(pair):
    """What the ban manager decides is what the kernel enforces, past the old expiry."""
    policy = pair.policy(OPEN)
    _load(pair, policy)
    bans = _bans(pair, policy)
    targets = {"v4": N(f"{CLIENT['v4']}/32"), "v6": N("2001:db8:2::/64"),
               "in28": N("203.0.113.64/28")}
    bans("add_bans", [(network, 2) for network in targets.values()])
    bans("add_bans", [(network, HOUR) for network in targets.values()])
    time.sleep(3)  # the kernel's clock: past the first timeout in any guest
    listed = bans("list_bans")
    for source, network in targets.items():
        assert listed.get(network, 0) > HOUR - 60 * TIME_SCALE, (network, listed)
        assert _shut(pair, source), source


def test_range_sets_with_timeouts(pair):
    policy = pair.policy(OPEN)
    _load(pair, policy)
    bans = _bans(pair, policy)
    ranges = [N("203.0.113.64/28"), N("2001:db8:10::/48"), N(f"{CLIENT['v6']}/128")]
    bans("add_bans", [(network, HOUR) for network in ranges])
    listed = bans("list_bans")
    assert {network: HOUR - 60 < listed[network] <= HOUR for network in ranges} == {
        network: True for network in ranges}
    assert _shut(pair, "in28") and _shut(pair, "in48") and _shut(pair, "in48b")
    assert _reaches(pair, "out28"), "outside the /28"
    assert _shut(pair, "v6") and _reaches(pair, "v6b"), "a /128 is that address, not its /64"
    bans("add_bans", [(ranges[0], 100)])
    assert 90 < bans("list_bans")[ranges[0]] <= 100
    bans("remove_bans", ranges + [N("203.0.113.128/28")])  # the last one is missing
    assert bans("list_bans") == {}
    assert _reaches(pair, "in28") and _reaches(pair, "in48") and _reaches(pair, "v6")
    # A range that expired in the kernel is gone for packets and for a new,
    # overlapping range alike.
    bans("add_bans", [(ranges[0], 2)])
    assert _shut(pair, "in28")
    assert wait_for(lambda: _reaches(pair, "in28"), timeout=5)
    bans("add_bans", [(N("203.0.113.64/27"), HOUR)])
    assert _shut(pair, "in28") and _reaches(pair, "out28")


def test_a_flushed_ruleset_is_put_back_with_bans_and_their_time(pair):
    policy = pair.policy(OPEN)
    _load(pair, policy)
    bans = _bans(pair, policy)
    keys = [((4, int(ipaddress.ip_address(CLIENT["v4"])), 32), HOUR),
            ((4, int(ipaddress.ip_address("203.0.113.64")), 28), 2 * HOUR)]
    bans("add_ban_keys", keys)
    pair.server.nft("flush", "ruleset")
    assert _reaches(pair, "v4") and _reaches(pair, "in28")
    # The tables and their bans come back in one transaction (one generation),
    # so there is no moment with the ban table and without the bans.
    restore = BanElements(policy.bans_table, policy.bans.ipv6_prefix,
                          [(key, seconds - 60) for key, seconds in keys])
    generation = pair.kernel(lambda nft: nft.netlink.generation())
    pair.kernel(lambda nft: nft.load(compile_policy(policy).document(), bans=restore))
    assert pair.kernel(lambda nft: nft.netlink.generation()) == generation + 1
    listed = bans("list_bans")
    assert HOUR - 120 < listed[N(f"{CLIENT['v4']}/32")] <= HOUR - 60
    assert 2 * HOUR - 120 < listed[N("203.0.113.64/28")] <= 2 * HOUR - 60
    assert _shut(pair, "v4") and _shut(pair, "in28") and _reaches(pair, "out28")


def test_dnat_forwarded_traffic_is_guarded_and_banned(pair, lab):
    """A port published by DNAT (Docker) crosses forward, not input."""
    container = lab.host("ctr")
    lab.link(pair.server, container, ["192.0.2.1/24"], ["192.0.2.2/24"],
             a_ifname="docker0", b_ifname="eth0")
    container.ip("route", "add", "default", "via", "192.0.2.1")
    pair.server.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    dockerlike = lab.tmp / "docker.nft"
    dockerlike.write_text(
        "table ip dockerlike {\n"
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
        "    fib daddr type local tcp dport 11434 dnat to 192.0.2.2:11434\n  }\n}\n")
    pair.server.nft("-f", str(dockerlike))
    container.listen(11434)

    def reaches(source, timeout):
        return pair.client.can_connect(SERVER["range4"], 11434, timeout=timeout,
                                       source=CLIENT[source])

    assert reaches("v4", OPEN_WAIT), "published before policyd"
    policy = pair.policy("""\
        version: 1
        services:
          ollama: {ports: [11434], allow: [203.0.113.0/24]}
    """)
    _load(pair, policy)
    assert not reaches("v4", SHUT)
    assert reaches("in28", OPEN_WAIT)
    _bans(pair, policy)("add_bans", [(N("203.0.113.64/28"), HOUR)])
    assert not reaches("in28", SHUT)
    assert reaches("out28", OPEN_WAIT)


def test_a_ban_cuts_an_established_connection(pair):
    policy = pair.policy(OPEN)
    _load(pair, policy)
    kept_open = pair.client.connect(SERVER["v4"], 8080, timeout=OPEN_WAIT, source=CLIENT["v4"])
    assert kept_open is not None
    try:
        _bans(pair, policy)("add_bans", [(N(f"{CLIENT['v4']}/32"), HOUR)])
        kept_open.settimeout(SHUT)
        kept_open.sendall(b"still there?\n")
        try:
            echoed = kept_open.recv(64)
        except OSError:
            echoed = b""
        assert echoed == b""
    finally:
        kept_open.close()


def test_the_feature_probe_matches_the_kernel(pair):
    """DESTROYSETELEM came with Linux 6.3; the probe must say so without changing anything."""
    release = os.uname().release
    major, minor = (int(part) for part in release.split(".")[:2])
    before = pair.ruleset()
    found = pair.kernel(lambda nft: nft.features())
    assert found["destroy_set_element"] == ((major, minor) >= (6, 3)), found
    assert found["kernel"] == release
    assert pair.ruleset() == before


PAGE = mmap.PAGESIZE
_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFDIO_API, _UFFDIO_REGISTER, _UFFDIO_COPY = 0xC018AA3F, 0xC020AA00, 0xC028AA03


class StalledWrite:
    """A write(2) of `first` then `second` that the kernel copies up to the end of
    `first` and then waits for: its second half comes from a page that a
    userfaultfd leaves missing until finish() supplies it."""

    def __init__(self, fd, first, second):
        assert len(first) <= PAGE and len(second) <= PAGE
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        self.uffd = libc.syscall(_USERFAULTFD[platform.machine()], os.O_CLOEXEC)
        assert self.uffd >= 0, os.strerror(ctypes.get_errno())
        fcntl.ioctl(self.uffd, _UFFDIO_API, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))
        self.memory = mmap.mmap(-1, 2 * PAGE)
        self.memory[PAGE - len(first):PAGE] = first  # the first page is there
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.missing = base + PAGE
        fcntl.ioctl(self.uffd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", self.missing, PAGE, 1, 0)))
        self.page = ctypes.create_string_buffer(second.ljust(PAGE, b"\0"), PAGE)
        self.view = memoryview(self.memory)[PAGE - len(first):PAGE + len(second)]
        self.writer = threading.Thread(target=os.write, args=(fd, self.view), daemon=True)
        self.writer.start()

    def finish(self):
        fcntl.ioctl(self.uffd, _UFFDIO_COPY, bytearray(struct.pack(
            "QQQQq", self.missing, ctypes.addressof(self.page), PAGE, 0, 0)))
        self.writer.join(5)
        os.close(self.uffd)


@pytest.mark.parametrize("where", ["tmp", "/dev/shm"])
def test_a_write_cut_at_a_page_boundary_is_fenced_until_its_last_byte(where, tmp_path):
    """What policyd.logs.writefence relies on. A reader sees a write(2) half copied,
    cut at a page boundary right after a complete line (a forging write shaped
    so); lseek(SEEK_DATA) waits until the writer copied its last byte, on ext4
    (the host's /tmp) and tmpfs (/dev/shm, and the lane's /tmp)."""
    directory = tmp_path if where == "tmp" else Path(tempfile.mkdtemp(dir=where))
    log = directory / "error.log"
    log.write_bytes(b"a" * (PAGE - 101) + b"\n")
    follower = LogFollower(str(log), MemoryPositions())
    writing = os.open(log, os.O_WRONLY | os.O_APPEND)
    reading = os.open(log, os.O_RDONLY)
    stalled = None
    try:
        assert follower.read_lines() == [b"a" * (PAGE - 101)]
        stalled = StalledWrite(writing, b"b" * 99 + b"\n", b"c" * 99 + b"\n")
        assert wait_for(lambda: log.stat().st_size == PAGE, timeout=5), "the write's first half"
        assert follower.read_lines() == [b"b" * 99] and follower.mid_write, \
            "a complete line, but its write is still being copied"
        fence = WriteFence(seconds=0.2)
        assert not fence.ends_between_writes(reading, PAGE)
        assert not fence.ends_between_writes(reading, PAGE), "still waiting, no second thread"
        stalled.finish()
        assert not stalled.writer.is_alive() and log.stat().st_size == PAGE + 100
        assert wait_for(lambda: fence.ends_between_writes(reading, PAGE + 100), timeout=5)
        assert follower.read_lines() == [b"c" * 99] and not follower.mid_write
    finally:
        if stalled is not None and stalled.writer.is_alive():
            stalled.finish()
        follower.close()
        os.close(writing)
        os.close(reading)
        if where != "tmp":
            shutil.rmtree(directory)
