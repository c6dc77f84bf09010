"""explain.decide: the verdict and the deciding rule, in the compiled rules' order."""
import ipaddress

from policyd.policy import reader as policy
from policyd.operator.explain import decide

POLICY_TEXT = """\
version: 1
services:
  ollama:
    ports: [11434]
    allow: [127.0.0.0/8, "::1", 192.168.1.0/24, {iface: "wg*"}]
  proxy:
    ports: [8080]
    allow: [any]
  dns:
    ports: [53]
    proto: udp
    action: reject
    allow: ["2001:db8::/32"]
bans:
  ports: [8080]
"""
POLICY = policy.loads(POLICY_TEXT)
ip = ipaddress.ip_address


def test_allowed_network_names_the_entry():
    d = decide(POLICY, ip("192.168.1.9"), 11434)
    assert (d.verdict, d.rule) == ("allow", "services.ollama.allow: 192.168.1.0/24")


def test_other_sources_get_the_action_and_learn_about_interfaces():
    d = decide(POLICY, ip("203.0.113.5"), 11434)
    assert d.verdict == "drop" and "unless it arrives on wg*" in d.rule
    assert decide(POLICY, ip("203.0.113.5"), 11434, iface="wg0").verdict == "allow"
    assert decide(POLICY, ip("203.0.113.5"), 11434, iface="eth0").verdict == "drop"


def test_proto_matters_and_unguarded_ports_are_untouched():
    assert decide(POLICY, ip("203.0.113.5"), 53, "udp").verdict == "reject"
    assert decide(POLICY, ip("2001:db8::5"), 53, "udp").verdict == "allow"
    d = decide(POLICY, ip("203.0.113.5"), 53, "tcp")
    assert (d.verdict, d.rule) == ("allow", "tcp port 53 is not guarded by any service")


def test_a_ban_wins_only_on_ban_ports():
    bans = [(ipaddress.ip_network("203.0.113.0/28"), 120)]
    d = decide(POLICY, ip("203.0.113.5"), 8080, bans=bans)
    assert d.verdict == "banned" and "203.0.113.0/28 (120s left)" in d.rule
    assert decide(POLICY, ip("203.0.113.5"), 11434, bans=bans).verdict == "drop"
    assert decide(POLICY, ip("203.0.113.99"), 8080, bans=bans).verdict == "allow"


def test_a_ban_drops_udp_only_on_ports_a_udp_service_guards():
    """The ban rules match udp only on udp service ports (issue 11): a banned
    source's datagram to a tcp-only port is not dropped, so explain must not say so."""
    bans = [(ipaddress.ip_network("203.0.113.0/28"), 120)]
    d = decide(POLICY, ip("203.0.113.5"), 8080, "udp", bans=bans)
    assert (d.verdict, d.rule) == ("allow", "udp port 8080 is not guarded by any service")
    with_udp_ban = policy.loads(POLICY_TEXT.replace("ports: [8080]\n", "ports: [8080, 53]\n"))
    d = decide(with_udp_ban, ip("203.0.113.5"), 53, "udp", bans=bans)
    assert d.verdict == "banned" and "(udp)" in d.rule
