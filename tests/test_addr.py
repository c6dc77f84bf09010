"""policyd.addr.parse_host builds address objects from inet_pton's integer: it must
accept and refuse exactly what the ipaddress-based parser before it did, and give
objects indistinguishable from ipaddress's own (type, value, hash, text)."""
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.addr import parse_host


def old_parse_host(text):
    """parse_host as it was before the integer fast path (ipaddress objects only)."""
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


def same(new, old):
    if old is None:
        return new is None
    return (type(new) is type(old) and new == old and hash(new) == hash(old) and str(new) == str(old)
            and new.packed == old.packed and getattr(new, "scope_id", None) is None
            and new.is_loopback == old.is_loopback and int(new) == int(old))


def forms(address):
    """Ways a log could spell an address, right and wrong."""
    text = [str(address), f"[{address}]", f"{address}%eth0", f" {address}", f"{address} ", f"{address}/32"]
    if address.version == 6:
        text += [address.exploded, f"::ffff:{ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)}",
                 address.exploded.replace(":0", ":00"), address.exploded + ":0"]
    else:
        text += ["0" + str(address), str(address).replace(".", ".0", 1), f"::ffff:{address}",
                 f"::{address}", f"::ffff:0{address}", str(address) + ".0", str(int(address))]
    return text


ODD = st.sampled_from(["01.2.3.4", "1.2.3.4%eth0", "::ffff:1.2.3.4", "fe80::1%eth0", "[fe80::1%1]",
                       " 1.2.3.4", "1.2.3.4 ", "١.٢.٣.٤", "1.2.3.٤", "::ffff:1.2.3.٤", "１.2.3.4",
                       "0000:0000:0000:0000:0000:0000:0000:00001", "1:2:3:4:5:6:7:8:9", "1.2.3.4.5",
                       "256.1.1.1", "1.2.3", "::ffff:01.2.3.4", "::ffff:1.2.3.4.5", "[]", "[1.2.3.4]",
                       "[::1", "::1]", "1.2.3.4\x00", "::1\x00", ":::", "1::2::3", "0x1.2.3.4", "::",
                       "::ffff:0.0.0.0", "::ffff:ffff:ffff", "::ffff:1:2", "::fffe:1.2.3.4", "127.0.0.1",
                       "::ffff:127.0.0.1", "::127.0.0.1", "1.2.3.4\n", "\t::1", "2001:db8::1 ", "::1%"])


TEXT = st.one_of(
    ODD,
    st.ip_addresses().flatmap(lambda a: st.sampled_from(forms(a))),
    st.text(alphabet="0123456789abcdefABCDEF:.[]% \x00١٤", max_size=50),
    st.text(max_size=50),
    st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 999), st.integers(0, 999999)),
)


@settings(max_examples=3000)
@given(TEXT)
def test_the_integer_parser_agrees_with_the_ipaddress_parser(text):
    assert same(parse_host(text), old_parse_host(text)), text
    data = text.encode("utf-8", "surrogatepass")
    assert same(parse_host(data), old_parse_host(data)), data


@given(st.binary(max_size=50))
def test_it_agrees_on_arbitrary_bytes(data):
    assert same(parse_host(data), old_parse_host(data)), data


def test_the_odd_forms_by_name():
    assert parse_host("01.2.3.4") is None
    assert parse_host("1.2.3.4%eth0") is None
    assert parse_host("fe80::1%eth0") is None
    assert parse_host(" 1.2.3.4") is None
    assert parse_host("١.٢.٣.٤") is None
    assert same(parse_host("::ffff:192.0.2.7"), ipaddress.IPv4Address("192.0.2.7"))
    assert same(parse_host(b"[2001:db8::1]"), ipaddress.IPv6Address("2001:db8::1"))
    assert same(parse_host("2001:DB8::1"), ipaddress.IPv6Address("2001:db8::1"))
