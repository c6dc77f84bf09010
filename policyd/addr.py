"""Address parsing shared by filters, bans and the CLI.

One strict notion of "a client address": IPv4-mapped IPv6 becomes IPv4, and
anything that is not exactly one address is refused rather than guessed at.
"""
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_host(text):
    """Return the address in `text`, or None if it is not exactly one address.

    Accepts `[2001:db8::1]` (bracketed IPv6, as some proxies log it); refuses
    zone ids, surrounding junk and anything with a prefix length.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or len(text) > 45 or "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def ban_network(address, ipv6_prefix=128):
    """The network a ban on `address` covers: the address itself, or its IPv6 /prefix."""
    if address.version == 4:
        return ipaddress.ip_network(address)
    return ipaddress.ip_network((address, ipv6_prefix), strict=False)


def parse_network(text):
    """Parse `text` as an address or network, strictly (host bits set is an error)."""
    address = parse_host(text)
    if address is not None:
        return ipaddress.ip_network(address)
    network = ipaddress.ip_network(text, strict=True)
    if network.version == 6 and network.network_address.ipv4_mapped is not None:
        raise ValueError(f"{text} is an IPv4-mapped network; write it as IPv4")
    return network
