"""The policy loader: what it accepts, and one clear line for what it refuses."""
import ipaddress
from pathlib import Path

import pytest

from policyd.policy import reader as policy
from policyd.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SPEC_EXAMPLE = """\
version: 1
table: policyd
services:
  ollama:
    ports: [11434]
    proto: tcp
    allow:
      - 127.0.0.0/8
      - ::1
      - 192.168.1.0/24
      - 100.64.0.0/10
      - iface: tailscale0
    action: drop
    rate: 20/second
  proxy:
    ports: [8080, 8443]
    allow: [any]
bans:
  ports: [8080, 8443, 11434]
  maxretry: 5
  findtime: 10m
  bantime: 1h
  bantime_max: 1w
  ipv6_prefix: 64
  ignore: [192.168.1.50]
  logs:
    - path: /var/log/nginx/error.log
      filter: nginx-auth
    - path: /var/log/caddy/access.log
      filter: caddy-auth
"""


def test_spec_example_loads():
    p = policy.loads(SPEC_EXAMPLE, "spec.yaml")
    ollama, proxy = p.services
    assert ollama.ports == (11434,) and ollama.proto == "tcp" and ollama.action == "drop"
    assert ollama.allow4 == tuple(ipaddress.ip_network(n) for n in
                                  ("127.0.0.0/8", "192.168.1.0/24", "100.64.0.0/10"))
    assert ollama.allow6 == (ipaddress.ip_network("::1/128"),)
    assert ollama.allow_interfaces == ("tailscale0",)
    assert ollama.rate == policy.Rate(20, "second")
    assert proxy.allow_any and proxy.ports == (8080, 8443)
    assert p.bans.findtime == 600 and p.bans.bantime == 3600 and p.bans.bantime_max == 604800
    assert p.bans.ignore == (ipaddress.ip_network("192.168.1.50/32"),)
    assert [log.filter for log in p.bans.logs] == ["nginx-auth", "caddy-auth"]
    assert p.bans_table == "policyd_bans"
    assert len(p.digest) == 64


def test_defaults():
    p = policy.loads("version: 1\nservices:\n  a:\n    ports: [1, 2]\n    allow: [any]\n")
    assert p.table == "policyd"
    assert p.bans.ports == (1, 2) and p.bans.maxretry == 5 and p.bans.ipv6_prefix == 64


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "policies").glob("*.yaml")))
def test_shipped_policies_load(name):
    policy.load(REPO / "policies" / name)


@pytest.mark.parametrize("value,seconds", [
    ("30s", 30), ("10m", 600), ("1h", 3600), ("2d", 172800), ("1w", 604800), (45, 45), ("90", 90),
])
def test_durations(value, seconds):
    assert policy.parse_duration(value) == seconds


def _error(text):
    with pytest.raises(InputError) as caught:
        policy.loads(text, "p.yaml")
    message = str(caught.value)
    assert "\n" not in message
    return message


BASE = "version: 1\nservices:\n  ollama:\n    ports: [11434]\n    allow: [{allow}]\n{extra}"


@pytest.mark.parametrize("allow,extra,expected", [
    ("192.168.1.1/24", "", "p.yaml:5: services.ollama.allow: '192.168.1.1/24' is not a valid"),
    ("300.1.1.1", "", "p.yaml:5: services.ollama.allow:"),
    ("2001:db8::1/32", "", "host bits set"),
    ("{iface: 'eth0; drop'}", "", "services.ollama.allow.iface: 'eth0; drop' is not a valid"),
    ("{iface: averyveryverylongname}", "", "is not a valid interface name"),
    ("{ifname: eth0}", "", "services.ollama.allow.ifname: unknown key"),
    ("any", "    colour: red\n", "p.yaml:6: services.ollama.colour: unknown key"),
    ("any", "    action: accept\n", "p.yaml:6: services.ollama.action: 'accept' is not one of"),
    ("any", "    proto: sctp\n", "services.ollama.proto: 'sctp' is not one of"),
    ("any", "    rate: fast\n", "services.ollama.rate: 'fast' is not a rate"),
    ("any", "bans:\n  bantime: 1y\n", "p.yaml:7: bans.bantime: '1y' is not a duration"),
    ("any", "bans:\n  bantime: 0\n", "bans.bantime: a duration must be positive"),
    ("any", "bans:\n  bantime: 1h\n  bantime_max: 1m\n", "bans.bantime_max: is shorter"),
    ("any", "bans:\n  maxretry: 0\n", "bans.maxretry: 0 is out of range"),
    ("any", "bans:\n  ipv6_prefix: 129\n", "bans.ipv6_prefix: 129 is out of range"),
    ("any", "bans:\n  ignore: [10.0.0.1/8]\n", "bans.ignore:"),
    ("any", "bans:\n  logs: [{path: relative.log, filter: nginx-auth}]\n", "must be absolute"),
    ("any", "bans:\n  logs: [{path: /x.log}]\n", "bans.logs.filter: is required"),
    ("any", "bans:\n  jail: x\n", "p.yaml:7: bans.jail: unknown key"),
    ("any", "extra: 1\n", "p.yaml:6: extra: unknown key"),
])
def test_bad_policies_name_line_and_key(allow, extra, expected):
    assert expected in _error(BASE.format(allow=allow, extra=extra))


@pytest.mark.parametrize("text,expected", [
    ("version: 2\nservices: {}\n", "p.yaml:1: version: unsupported version"),
    ("services: {}\n", "version: is required"),
    ("version: 1\nservices: {}\n", "services: needs at least one service"),
    ("version: 1\ntable: 'x y'\nservices: {}\n", "p.yaml:2: table: 'x y' is not a valid table"),
    ("version: 1\ntable: 'policyd; flush ruleset'\nservices: {}\n", "is not a valid table name"),
    ("version: 1\nservices:\n  Bad-Name:\n    ports: [1]\n    allow: [any]\n",
     "p.yaml:3: services.Bad-Name: service names"),
    ("version: 1\nservices:\n  a:\n    ports: [0]\n    allow: [any]\n", "services.a.ports: 0 is out"),
    ("version: 1\nservices:\n  a:\n    ports: [70000]\n    allow: [any]\n", "out of range"),
    ("version: 1\nservices:\n  a:\n    ports: ['80']\n    allow: [any]\n", "is not an integer"),
    ("version: 1\nservices:\n  a:\n    ports: [80, 80]\n    allow: [any]\n", "listed twice"),
    ("version: 1\nservices:\n  a:\n    ports: []\n    allow: [any]\n", "needs at least one port"),
    ("version: 1\nservices:\n  a:\n    ports: [80]\n", "services.a.allow: is required"),
    ("version: 1\nservices:\n  a:\n    ports: [80]\n    allow: [any]\n"
     "  b:\n    ports: [80]\n    allow: [any]\n", "tcp port 80 is also in service 'a'"),
    ("version: 1\nservices: [\n", "p.yaml:3: malformed YAML"),
    ("version: 1\nversion: 1\nservices: {}\n", "version: appears twice"),
    ("", "empty policy"),
])
def test_bad_top_level(text, expected):
    assert expected in _error(text)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(InputError) as caught:
        policy.load(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(caught.value)


def test_not_utf8():
    assert "not UTF-8" in _error(b"version: 1\nservices: \xff\n")


def test_a_port_in_two_services_is_reported_at_the_later_listing():
    text = ("version: 1\nservices:\n  a:\n    ports: [80]\n    allow: [any]\n"
            "  b:\n    allow: [any]\n    ports:\n      - 443\n      - 80\n")
    with pytest.raises(InputError) as caught:
        policy.loads(text, "p.yaml")
    assert str(caught.value) == ("p.yaml:10: services.b.ports: tcp port 80 is also in "
                                 "service 'a'")


def test_log_entries_know_their_lines_without_changing_equality():
    text = ("version: 1\nservices:\n  a:\n    ports: [80]\n    allow: [any]\nbans:\n  logs:\n"
            "    - path: /var/log/a.log\n      filter: nginx-auth\n")
    source, = policy.loads(text, "p.yaml").bans.logs
    assert (source.path_line, source.filter_line) == (8, 9)
    assert source == type(source)("/var/log/a.log", "nginx-auth")


INLINE_ALLOWLISTS = [
    '["192.0.2.0/24", "2001:db8::/32", "198.51.100.7", "2001:db8:1::1"]',
    '["2001:DB8::/48", "192.0.2.0/024", "0.0.0.0/0", "::/0"]',
    '["192.0.2.0/24", "192.0.2.0/24"]',           # twice: refused, naming the line
    '["192.0.2.1/24"]',                           # host bits
    '["::ffff:192.0.2.7", "192.0.2.8"]',          # IPv4-mapped reads as IPv4
    '["::ffff:192.0.2.7", "192.0.2.7"]',          # ... and then repeats
    '[" 192.0.2.0/24"]', '["192.0.2.0/24 ; x"]', '["192.0.2.0/24#x"]', '[""]',
    '["any", "192.0.2.0/24"]', '[any]', '[]', '["fe80::1%eth0"]', '["caf\\u00e9"]',
    '["192.0.2.0/24\\n198.51.100.0/24"]',
]


@pytest.mark.parametrize("allow", INLINE_ALLOWLISTS)
def test_an_inline_allowlist_reads_alike_in_bulk_and_one_by_one(allow, monkeypatch):
    from policyd.policy import listparse
    text = f"version: 1\nservices:\n  s:\n    ports: [80]\n    allow: {allow}\n"

    def outcome():
        try:
            service = policy.loads(text, "/p.yaml").services[0]
        except InputError as exc:
            return str(exc)
        return (service.allow_any, list(service.allow4.pairs), list(service.allow6.pairs))
    bulk = outcome()
    monkeypatch.setattr(listparse, "texts", lambda values: None)
    assert bulk == outcome()


def test_plain_network_texts_go_through_the_bulk_pass():
    from policyd.policy import listparse
    assert listparse.texts(["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]) == {
        (4, int(ipaddress.ip_address("192.0.2.0")), 24): None,
        (4, int(ipaddress.ip_address("198.51.100.7")), 32): None,
        (6, int(ipaddress.ip_address("2001:db8::")), 32): None}
    assert listparse.texts(["192.0.2.0/24", "192.0.2.0/24"]) is None  # one by one names it
