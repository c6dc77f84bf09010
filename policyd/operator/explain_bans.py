"""The kernel's ban on one address, asked without listing the bans.

Owns the one-element lookup `explain` makes: with 100k bans, listing them all
costs far more than the 0.2 s an operator's question should take. Where the
answer is not plain (an interval element, a set that cannot be asked), the
caller lists the bans as before.
"""
import ipaddress

from policyd.rules.compile import BAN_SETS, RANGE_BAN_SETS

UNKNOWN = None


def lookup(policy, address):
    """[(network, seconds left)] of the kernel's ban holding `address` ([] if none),
    or UNKNOWN when the caller should list every ban instead."""
    if not policy.bans.ports:
        return []
    try:
        from policyd.kernel.nfnetlink import Netlink
        netlink = Netlink()
    except OSError:
        return UNKNOWN
    prefix = 32 if address.version == 4 else policy.bans.ipv6_prefix
    network = ipaddress.ip_network((int(address), prefix), strict=False)
    try:
        found = netlink.get_element(policy.bans_table, BAN_SETS[address.version],
                                    network.network_address.packed)
        if found is None:
            # Bans of other extents (a /28, a /128 or /48 with a /64 unit) live in
            # the interval set: one that holds the address is the listing's to name.
            in_range = netlink.get_element(policy.bans_table, RANGE_BAN_SETS[address.version],
                                           address.packed)
            return UNKNOWN if in_range is not None else []
    except OSError:
        return UNKNOWN  # no such set or no permission: the full listing decides
    finally:
        netlink.close()
    key, left, flags = found
    if flags or key != network.network_address.packed:
        return UNKNOWN  # an interval holds it: its extent is the listing's to say
    return [(network, round((left or 0) / 1000))]
