"""List files (allow/deny `- file:`), their policy keys, compile and explain."""
import ipaddress
import textwrap

import pytest

from policyd.kernel import nlbatch
from policyd.operator import explain
from policyd.policy import lists, reader as policy
from policyd.rules import elements as elements_mod, render
from policyd.rules.compile import compile_policy
from policyd.errors import InputError

SAMPLES = "tests/samples/lists"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_spamhaus_drop_and_firehol_netset_read_as_they_are():
    drop = lists.read(f"{SAMPLES}/spamhaus-drop.txt")
    assert [lists.network_text(4, f, p) for f, p, _ in drop.v4] == [
        "198.51.100.0/25", "203.0.113.128/26"]
    assert [line for _, _, line in drop.v4] == [5, 6]
    level1 = lists.read(f"{SAMPLES}/firehol_level1.netset")
    assert [lists.network_text(4, f, p) for f, p, _ in level1.v4] == [
        "0.0.0.0/8", "192.0.2.128/25", "198.51.100.200"]
    assert [lists.network_text(6, f, p) for f, p, _ in level1.v6] == ["2001:db8:dead::/48"]


@pytest.mark.parametrize("line, problem", [
    ("192.0.2.1/24", "host bits"),
    ("192.0.2.0/33", "prefix"),
    ("192.0.2", "not an address"),
    ("01.2.3.4", "not an address"),
    ("2001:db8::/64 x", "prefix"),
    ("::ffff:192.0.2.0/120", "IPv4-mapped"),
    ("caf\u00e9", "not an address"),
])
def test_a_bad_line_refuses_the_whole_list_with_file_and_line(tmp_path, line, problem):
    path = tmp_path / "l.txt"
    path.write_text(f"# ok\n192.0.2.0/24\n{line}\n198.51.100.0/24\n")
    with pytest.raises(InputError) as caught:
        lists.read(str(path))
    assert str(caught.value).startswith(f"{path}:3: ") and problem in str(caught.value)


def test_mapped_address_reads_as_ipv4_and_comments_anywhere(tmp_path):
    path = write(tmp_path, "l.txt", "::ffff:192.0.2.7 ; mapped\n  198.51.100.0/24# tight\n\n")
    netlist = lists.read(path)
    assert [lists.network_text(4, f, p) for f, p, _ in netlist.v4] == ["192.0.2.7",
                                                                      "198.51.100.0/24"]


POLICY = """\
    version: 1
    services:
      proxy:
        ports: [8080]
        allow: [any]
        deny:
          - file: {deny}
          - 203.0.113.7
      ollama:
        ports: [11434]
        allow:
          - 127.0.0.0/8
          - file: {allow}
"""


@pytest.fixture
def listed(tmp_path):
    deny = write(tmp_path, "deny.txt", "198.51.100.0/24\n2001:db8:bad::/48\n")
    allow = write(tmp_path, "allow.txt", "# office\n192.0.2.0/24\n192.0.2.64/26\n2001:db8:1::/64\n")
    return write(tmp_path, "p.yaml", POLICY.format(deny=deny, allow=allow)), deny, allow


def test_policy_reads_lists_and_deny(listed):
    path, deny, allow = listed
    loaded = policy.load(path)
    proxy, ollama = loaded.services
    assert proxy.allow_any and proxy.deny4 == (ipaddress.ip_network("203.0.113.7/32"),)
    assert [n.path for n in proxy.deny_lists] == [deny]
    assert [n.path for n in ollama.allow_lists] == [allow]
    assert len(ollama.allow_lists[0]) == 3


@pytest.mark.parametrize("entry, problem", [
    ("- file: relative.txt", "must be absolute"),
    ("- file: /nonexistent/list.txt", "No such file"),
    ("- {file: /a, iface: eth0}", "unknown key"),
])
def test_bad_list_references_name_the_policy_line(tmp_path, entry, problem):
    path = write(tmp_path, "p.yaml", f"""\
        version: 1
        services:
          ollama:
            ports: [11434]
            allow:
              {entry}
    """)
    with pytest.raises(InputError) as caught:
        policy.load(path)
    assert f"{path}:6" in str(caught.value) and problem in str(caught.value)


def test_deny_any_is_refused(tmp_path):
    path = write(tmp_path, "p.yaml", """\
        version: 1
        services:
          proxy: {ports: [8080], allow: [any], deny: [any]}
    """)
    with pytest.raises(InputError, match="services.proxy.deny"):
        policy.load(path)


def test_deny_is_consulted_before_allow_in_compile_and_explain(listed):
    path, deny, allow = listed
    loaded = policy.load(path)
    text = render.to_text(compile_policy(loaded))
    proxy_chain = text.split("chain committed_svc_proxy {")[1].split("}")[0].split("\n")
    assert [line.strip() for line in proxy_chain if line.strip()] == [
        "ip saddr @committed_proxy_deny4 drop", "ip6 saddr @committed_proxy_deny6 drop",
        "accept"]
    # Nested networks are dropped (the kernel refuses overlaps); the rest is sorted.
    assert "elements = { 127.0.0.0/8, 192.0.2.0/24 }" in text
    assert "elements = { 198.51.100.0/24, 203.0.113.7 }" in text

    def decide(address, port):
        return explain.decide(loaded, ipaddress.ip_address(address), port)
    assert decide("198.51.100.9", 8080) == explain.Decision(
        "drop", f"services.proxy.deny: {deny}:1 (198.51.100.0/24)")
    assert decide("203.0.113.7", 8080).rule == "services.proxy.deny: 203.0.113.7/32"
    assert decide("192.0.2.70", 8080).verdict == "allow"
    assert decide("192.0.2.70", 11434) == explain.Decision(
        "allow", f"services.ollama.allow: {allow}:2 (192.0.2.0/24)")
    assert decide("2001:db8:1::9", 11434).rule.endswith(f"{allow}:4 (2001:db8:1::/64)")
    assert decide("2001:db8:2::9", 11434).verdict == "drop"


def test_netlink_encoding_of_intervals_uses_the_compiled_integers(listed):
    document = compile_policy(policy.load(listed[0])).document()
    sets = {cmd["add"]["set"]["name"]: cmd["add"]["set"] for cmd in document["nftables"]
            if "set" in cmd.get("add", {})}
    elements = sets["committed_proxy_deny4"]["elem"]
    assert elements.intervals == [(0xC6336400, 0xC63364FF), (0xCB007107, 0xCB007107)]
    assert nlbatch.intervals_of("ipv4_addr", list(elements)) == elements.intervals
    # start element at 198.51.100.0, end element (flag INTERVAL_END) one past each
    # interval, and nft's leading end element at 0.0.0.0.
    encoded = nlbatch.interval_elements(elements.intervals, 4)
    assert len(encoded) == 5
    assert encoded[0] == nlbatch.encode_element(bytes(4), flags=nlbatch.ELEM_INTERVAL_END)
    assert encoded[1] == nlbatch.encode_element(bytes([198, 51, 100, 0]))
    assert encoded[2] == nlbatch.encode_element(bytes([198, 51, 101, 0]),
                                                flags=nlbatch.ELEM_INTERVAL_END)


def test_unknown_document_parts_fall_back_to_libnftables():
    document = {"nftables": [{"add": {"table": {"family": "ip", "name": "x"}}}]}
    with pytest.raises(nlbatch.Unsupported):
        nlbatch.encode(document)
    rule = {"add": {"rule": {"family": "inet", "table": "t", "chain": "c",
                             "expr": [{"counter": None}]}}}
    with pytest.raises(nlbatch.Unsupported):
        nlbatch.encode({"nftables": [rule]})


def test_elements_build_their_texts_only_when_read(listed):
    import json
    document = compile_policy(policy.load(listed[0])).document()
    sets = [cmd["add"]["set"] for cmd in document["nftables"] if "set" in cmd.get("add", {})]
    elements = next(s["elem"] for s in sets if s["name"] == "committed_ollama_v4")
    assert elements.intervals == [(0x7F000000, 0x7FFFFFFF), (0xC0000200, 0xC00002FF)]
    assert list.__len__(elements) == 0 and len(elements) == 2  # nothing built yet
    # json.dumps (the C encoder too) reads a list subclass through its iterator.
    assert '{"prefix": {"addr": "192.0.2.0", "len": 24}}' in json.dumps(document)
    assert list(elements) == [{"prefix": {"addr": "127.0.0.0", "len": 8}},
                              {"prefix": {"addr": "192.0.2.0", "len": 24}}]
    elements.append("198.51.100.7")  # texts added by hand: the integers no longer hold
    assert elements.intervals is None and len(elements) == 3


def test_explain_asks_list_fed_sets_without_building_them(listed, monkeypatch):
    """A compiled set fed by a list stays a promise until something reads it whole:
    explain (and the lockout lint) ask it about one address through the list's
    sorted records, so a 100k-line list costs them no sweep of 100k networks."""
    path, _deny, _allow = listed
    loaded = policy.load(path)
    swept = []
    real = lists.disjoint_networks
    monkeypatch.setattr(elements_mod, "disjoint_networks", lambda *a: swept.append(a) or real(*a))
    decision = explain.decide(loaded, ipaddress.ip_address("192.0.2.70"), 11434)
    assert decision.verdict == "allow" and "allow.txt:" in decision.rule
    denied = explain.decide(loaded, ipaddress.ip_address("198.51.100.9"), 8080)
    assert denied.verdict == "drop" and "deny.txt:" in denied.rule
    assert swept == []
    ruleset = compile_policy(loaded)
    elements = ruleset.tables[loaded.table].sets["committed_ollama_v4"].elem
    assert elements.find(ipaddress.ip_address("192.0.2.70")) == ipaddress.ip_network("192.0.2.0/24")
    assert elements.intervals[-1] == (int(ipaddress.ip_address("192.0.2.0")),
                                      int(ipaddress.ip_address("192.0.2.255")))  # /26 inside
    assert swept, "reading the set whole sweeps it"
    assert elements.find(ipaddress.ip_address("192.0.3.1")) is None


BULK_CASES = [
    b"192.0.2.0/24\n2001:db8::/32\n198.51.100.7\n",
    b"# header\n; spamhaus\n192.0.2.0/24 ; SBL1\n\n  203.0.113.0/25\t\r\n2001:db8:1::/48 # x\n",
    b"192.0.2.0/24\n192.0.2.0/24\n192.0.2.0/26\n",
    b"192.0.2.1/\n",                # a bare slash: the line-by-line reading decides
    b"::ffff:192.0.2.1\n",          # IPv4-mapped
    b"::ffff:192.0.2.0/120\n",      # refused
    b"192.0.2.1/24\n",              # host bits
    b"192.0.2.0/33\n",
    b"192.0.2.0/+8\n",
    b"192.0.2.0/0024\n",
    b"\x1c192.0.2.0/24\n",          # str.strip() would take it, bytes.strip() does not
    b"192.0.2.0 /24\n",
    b"caf\xc3\xa9\n",
    b"0.0.0.0/0\n::/0\n",
    b"",
    b"\n\n# only comments\n",
    b"192.0.2.0/24 ; a # b\n198.51.100.0/25 # c ; d\n;x\n#y",  # both marks, either first
    b"192.0.2.0/24;x\n198.51.100.0/24;y\n203.0.113.0/24;z\n",  # a comment on every line
    b"192.0.2.7\n198.51.100.0/24\n2001:db8::1\n2001:db8::/48\n",  # lengths given and not
    b"::ffff:c000:201\n::1\n",       # mapped written in hex; an address below it
    b"\n192.0.2.0/24\n\n198.51.100.0/24\n\n\n2001:db8::/48",  # a few empty lines, no end
    b"\n" * 9 + b"192.0.2.0/24\n" + b"\n" * 9 + b"2001:db8::/48\n",  # many empty lines
    b"192.0.2.0/24\x0b\n198.51.100.0/24\x0c\n",  # whitespace str.strip() takes
]


@pytest.mark.parametrize("data", BULK_CASES)
def test_bulk_parse_reads_exactly_as_line_by_line(data):
    """The C-speed bulk pass either gives what the line-by-line parser gives (same
    entries, same lines) or steps aside for it: never a different answer."""
    from policyd.policy import listparse

    def outcome(parse):
        try:
            return parse()
        except InputError as exc:
            return str(exc)
    slow = outcome(lambda: listparse._one_by_one(data, "/l"))
    bulk = listparse._bulk(data)
    assert bulk is None or bulk == slow
    assert outcome(lambda: listparse.parse_lines(data, "/l")) == slow


def test_a_cached_list_gives_back_every_entry_with_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(lists, "cache_dir", str(tmp_path / "cache"))
    path = write(tmp_path, "l.txt", "# head\n198.51.100.0/24\n192.0.2.7\n0.0.0.0/0\n"
                 "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120\n::/0\n2001:db8::/48\n"
                 "255.255.255.255\n2001:db8:0:0:8000::/65\n")
    parsed = lists.read(str(path))
    cached = lists.read(str(path))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the second read came from it
    for version in (4, 6):
        assert cached.entries(version) == tuple(sorted(parsed.entries(version)))
