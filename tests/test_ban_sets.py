"""BanTable and nfnetlink without a kernel: which set each ban goes to, how
intervals are encoded, and how listed intervals become networks again.

tests/kernel/test_contract.py checks the same against a real kernel.
"""
import ipaddress
import struct
from types import SimpleNamespace

import pytest

from policyd.kernel import nfwire
from policyd.kernel.nft import BanTable, _ranges

N = ipaddress.ip_network


class RecordingNetlink:
    def __init__(self, elements=None):
        self.calls = []
        self.elements = elements or {}

    def replace(self, table, changes):
        self.calls.append(("replace", changes))

    def add(self, table, changes, flush=()):
        self.calls.append(("add", changes, tuple(flush)))

    def delete(self, table, changes):
        self.calls.append(("delete", changes))

    def set_keys(self, table, name):
        return {key: left for key, left, _flags in self.elements.get(name, [])}

    def set_elements(self, table, name):
        return self.elements.get(name, [])


def _table(netlink, ipv6_prefix=64):
    return BanTable(SimpleNamespace(netlink=netlink), "policyd_bans", ipv6_prefix)


def _b(network):
    network = N(network)
    return network.network_address.packed


@pytest.mark.parametrize("network, ipv6_prefix, set_name", [
    ("198.51.100.7/32", 64, "ban4"),
    ("203.0.113.64/28", 64, "ban4_range"),
    ("2001:db8:2::/64", 64, "ban6"),
    ("2001:db8:3::5/128", 64, "ban6_range"),   # one address is one address, not its /64
    ("2001:db8:10::/48", 64, "ban6_range"),    # a /48 is a /48, not a /64
    ("2001:db8:10::/48", 48, "ban6"),
    ("2001:db8:3::5/128", 128, "ban6"),
])
def test_each_ban_goes_to_the_set_that_enforces_exactly_it(network, ipv6_prefix, set_name):
    netlink = RecordingNetlink()
    _table(netlink, ipv6_prefix).add_bans([(N(network), 60)])
    (_verb, changes), = netlink.calls
    assert list(changes) == [set_name]


def test_interval_items_carry_the_first_address_after_the_network():
    netlink = RecordingNetlink()
    _table(netlink).add_bans([(N("203.0.113.64/28"), 60), (N("255.255.255.0/24"), 9),
                              (N("2001:db8:3::5/128"), 30)])
    (_verb, changes), = netlink.calls
    assert changes["ban4_range"] == [(_b("203.0.113.64/32"), 60, _b("203.0.113.80/32")),
                                     (_b("255.255.255.0/32"), 9, None)]  # reaches the end
    assert changes["ban6_range"] == [(_b("2001:db8:3::5/128"), 30, _b("2001:db8:3::6/128"))]


def _attrs_of(element):
    """{attribute type: payload} of one packed NFTA_LIST_ELEM."""
    inner = element[4:]
    return {kind: value for kind, value in nfwire._attrs(inner)}


def test_packed_interval_is_a_timed_start_and_a_flagged_end():
    start, end = nfwire._packed([(b"\xcb\x00\x71\x40", 60, b"\xcb\x00\x71\x50")])
    start_attrs, end_attrs = _attrs_of(start), _attrs_of(end)
    assert struct.unpack(">Q", start_attrs[nfwire.NFTA_SET_ELEM_TIMEOUT]) == (60000,)
    assert nfwire.NFTA_SET_ELEM_FLAGS not in start_attrs
    assert end_attrs[nfwire.NFTA_SET_ELEM_FLAGS] == (1).to_bytes(4, "big")
    assert nfwire.NFTA_SET_ELEM_TIMEOUT not in end_attrs
    # Keys only (deletes): no timeout anywhere.
    assert all(nfwire.NFTA_SET_ELEM_TIMEOUT not in _attrs_of(e) for e in
               nfwire._packed([(b"\x01\x02\x03\x04", 60, b"\x01\x02\x03\x05")],
                                 timeouts=False))


def test_listed_intervals_become_the_networks_that_were_banned():
    end = nfwire.NFT_SET_ELEM_INTERVAL_END
    elements = [  # as the kernel dumps them: newest first, nft's leading end at 0
        (_b("203.0.113.80/32"), None, end), (_b("203.0.113.64/32"), 59000, 0),
        (_b("0.0.0.0/32"), None, end),
        (_b("203.0.113.96/32"), 1000, 0), (_b("203.0.113.100/32"), None, end),  # not a CIDR
        (_b("255.255.255.0/32"), 5000, 0)]                                      # open end
    assert dict(_ranges(4, elements)) == {
        (4, int(ipaddress.ip_address("203.0.113.64")), 28): 59000,
        (4, int(ipaddress.ip_address("203.0.113.96")), 30): 1000,
        (4, int(ipaddress.ip_address("255.255.255.0")), 24): 5000}


def test_listing_merges_hash_and_interval_sets():
    netlink = RecordingNetlink({
        "ban4": [(_b("198.51.100.7/32"), 30000, 0)],
        "ban6": [(_b("2001:db8:2::/64"), 40000, 0)],
        "ban6_range": [(_b("2001:db8:10::/128"), 50000, 0),
                       (_b("2001:db8:11::/128"), None, nfwire.NFT_SET_ELEM_INTERVAL_END)]})
    assert _table(netlink).list_bans() == {N("198.51.100.7/32"): 30, N("2001:db8:2::/64"): 40,
                                           N("2001:db8:10::/48"): 50}


def test_restore_with_flush_ipv6_empties_both_ipv6_sets_in_the_same_call():
    netlink = RecordingNetlink()
    _table(netlink).add_ban_keys([((6, 1 << 100, 64), 60)], flush_ipv6=True)
    (_verb, changes, flush), = netlink.calls
    assert flush == ("ban6", "ban6_range") and list(changes) == ["ban6"]


def test_single_bans_go_first_and_apart_from_ranges():
    """A refused range (overlapping one in its last second) must not hold back
    the single-address bans of the same flush."""
    netlink = RecordingNetlink()
    _table(netlink).add_bans([(N("203.0.113.64/28"), 60), (N("198.51.100.7/32"), 60),
                              (N("2001:db8:2::/64"), 60)])
    assert [sorted(changes) for _verb, changes in netlink.calls] == [["ban4", "ban6"],
                                                                    ["ban4_range"]]
