"""Whether the kernel may hold a ban on one address, asked without listing the bans.

Owns the one-element lookup `explain` makes first: with 100k bans, listing them
all costs far more than the 0.2 s an operator's question should take. Only a
hit (or a kernel that cannot be asked this way) leads to the full listing.
"""
import ipaddress

from policyd.compile import BAN_SETS


def may_be_banned(policy, address):
    """False only when the kernel says no ban set holds `address`."""
    if policy.bans.ports == ():
        return False
    try:
        from policyd.nfnetlink import Netlink
        netlink = Netlink()
    except OSError:
        return True
    try:
        if address.version == 4:
            key = address.packed
        else:
            key = ipaddress.IPv6Network((int(address), policy.bans.ipv6_prefix),
                                        strict=False).network_address.packed
        return netlink.has_element(policy.bans_table, BAN_SETS[address.version], key)
    except OSError:
        return True  # no such set or no permission: let the full listing decide
    finally:
        netlink.close()
