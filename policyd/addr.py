"""Address parsing shared by filters, bans and the CLI.

One strict notion of "a client address": IPv4-mapped IPv6 becomes IPv4, and
anything that is not exactly one address is refused rather than guessed at.
"""
import ipaddress
import re
import _socket as socket  # the C module: socket.py builds enums at import, a cost to every command

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Dotted quad without leading zeros, as ipaddress accepts it; checked by hand
# because allowlists run to 100k entries and ipaddress parses slowly.
_DOTTED_QUAD = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                          r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\Z")
_IPv4, _IPv6, _from_bytes = ipaddress.IPv4Address, ipaddress.IPv6Address, int.from_bytes
_pton, _AF_INET, _AF_INET6, _new = socket.inet_pton, socket.AF_INET, socket.AF_INET6, object.__new__


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
    # inet_pton is strict in the same way as ipaddress (no leading zeros, no
    # zone) and ten times faster; a flood parses one address per line. The
    # address object is then made from the integer directly (what ipaddress's
    # own constructor does for an int, less its checks and calls).
    # What inet_pton refuses still goes to ipaddress, which has the last word.
    try:
        if ":" in text:
            number = _from_bytes(_pton(_AF_INET6, text), "big")
            if number >> 32 == 0xFFFF:   # IPv4-mapped: the IPv4 address
                address = _new(_IPv4)
                address._ip = number & 0xFFFFFFFF
            else:
                address = _new(_IPv6)
                address._ip, address._scope_id = number, None
            return address
        address = _new(_IPv4)
        address._ip = _from_bytes(_pton(_AF_INET, text), "big")
        return address
    except (OSError, ValueError):  # ValueError: a NUL or non-ASCII text
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text):
    """Parse `text` as an address or network, strictly (host bits set is an error)."""
    address_text, slash, prefix_text = text.partition("/")
    if _DOTTED_QUAD.match(address_text):
        if not slash:
            return ipaddress.IPv4Network(address_text)
        if prefix_text.isdigit() and len(prefix_text) <= 2 and int(prefix_text) <= 32:
            value = int.from_bytes(socket.inet_aton(address_text), "big")
            prefix = int(prefix_text)
            if value & ((1 << (32 - prefix)) - 1):
                raise ValueError(f"{text} has host bits set")
            return ipaddress.IPv4Network((value, prefix))
    if ":" in address_text and "%" not in address_text and (
            not slash or (prefix_text.isdigit() and len(prefix_text) <= 3
                          and int(prefix_text) <= 128)):
        try:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address_text), "big")
        except OSError:
            value = None  # let ipaddress below say what is wrong with it
        if value is not None and value >> 32 != 0xFFFF:
            prefix = int(prefix_text) if slash else 128
            if value & ((1 << (128 - prefix)) - 1):
                raise ValueError(f"{text} has host bits set")
            return ipaddress.IPv6Network((value, prefix))
    address = parse_host(text)
    if address is not None:
        return ipaddress.ip_network(address)
    network = ipaddress.ip_network(text, strict=True)
    if network.version == 6 and network.network_address.ipv4_mapped is not None:
        raise ValueError(f"{text} is an IPv4-mapped network; write it as IPv4")
    return network
