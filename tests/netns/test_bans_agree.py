"""`ban`, `bans`, `explain` and `unban` say what the kernel does (issues 11 and 12).

One table of bans, IPv4 and IPv6, single addresses, the /64 aggregation of
automatic bans and ranges, checked against real packets from each source.
"""
import json
import os

from policyd_lab.netlab import PolicydDaemon, wait_for
from policyd_lab.nginxlog import nginx_failure

POLICY = """\
    version: 1
    services:
      proxy:
        ports: [8080]
        allow: [any]
      dns:
        ports: [5353]
        proto: udp
        allow: [any]
    bans:
      ports: [8080, 5353]
      maxretry: 2
      logs:
        - path: {log}
          filter: nginx-auth
"""
# (what `ban` is given, the network it bans, sources it must stop, sources it must not)
MANUAL = [
    ("198.51.100.20", "198.51.100.20/32", ["198.51.100.20"], ["198.51.100.21"]),
    ("203.0.113.64/28", "203.0.113.64/28", ["203.0.113.66", "203.0.113.79"],
     ["203.0.113.80", "203.0.113.63"]),
    ("2001:db8:3::5", "2001:db8:3::5/128", ["2001:db8:3::5"], ["2001:db8:3::6"]),
    ("2001:db8:4::/64", "2001:db8:4::/64", ["2001:db8:4::9", "2001:db8:4::ffff"],
     ["2001:db8:4:1::1"]),
    ("2001:db8:10::/48", "2001:db8:10::/48", ["2001:db8:10:7::9", "2001:db8:10::2"],
     ["2001:db8:11::1"]),
]
# An automatic ban of an IPv6 source covers its /64 (bans.ipv6_prefix).
AUTO = ("2001:db8:5::7", "2001:db8:5::/64", ["2001:db8:5::7", "2001:db8:5::8"],
        ["2001:db8:5:1::1"])
SERVER = {"198.51.100": "198.51.100.1", "203.0.113": "203.0.113.1", "v6": "2001:db8::1"}


def _server_address(source):
    return SERVER["v6"] if ":" in source else SERVER[source.rsplit(".", 1)[0]]


def test_ban_bans_explain_and_unban_agree_with_the_kernel(lab):
    server, client = lab.host("srv"), lab.host("cli")
    rows = MANUAL + [AUTO]
    sources = sorted({s for row in rows for s in row[2] + row[3]})
    lab.link(server, client, ["198.51.100.1/24", "203.0.113.1/24", "2001:db8::1/32"],
             [f"{s}/32" if ":" in s else f"{s}/24" for s in sources],
             a_ifname="wan0", b_ifname="eth0")
    server.listen(8080)
    server.listen(5353, "udp")
    server.listen(8080, "udp")
    log = lab.tmp / "error.log"
    log.write_text("")
    policy = lab.tmp / "policy.yaml"
    policy.write_text(__import__("textwrap").dedent(POLICY.format(log=log)))
    assert server.policyd("apply", str(policy)).returncode == 0

    def reaches(source):
        return client.can_connect(_server_address(source), 8080, timeout=2, source=source)

    def shut(source):
        return not client.can_connect(_server_address(source), 8080, timeout=0.5, source=source)

    def explain(source, proto="tcp", port="8080"):
        out = server.policyd("explain", str(policy), source, port, "--proto", proto, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["verdict"]

    assert all(reaches(source) for source in sources), "reachable before any ban"
    daemon = PolicydDaemon(server, str(policy)).start()
    try:
        said = {}
        for given, _network, _stopped, _open in MANUAL:
            out = server.policyd("ban", given)
            assert out.returncode == 0, out.stderr
            said[given] = out.stdout.split()[1]
        with log.open("a") as out:
            out.write(nginx_failure(AUTO[0]) * 2)
        assert wait_for(lambda: shut(AUTO[0]), timeout=5)
        listed = {b["network"] for b in json.loads(server.policyd("bans", "--json").stdout)}

        wrong = []
        for given, network, stopped, still_open in rows:
            if given in said and said[given] != network:
                wrong.append(f"ban {given} said {said[given]}, kernel must ban {network}")
            if network not in listed:
                wrong.append(f"bans lacks {network}: {sorted(listed)}")
            for source in stopped:
                if not shut(source):
                    wrong.append(f"{source} got through the ban on {network}")
                if explain(source) != "banned":
                    wrong.append(f"explain {source} 8080 is not `banned` ({network})")
            for source in still_open:
                if not reaches(source):
                    wrong.append(f"{source} is stopped, outside {network}")
                if explain(source) != "allow":
                    wrong.append(f"explain {source} 8080 is not `allow` (outside {network})")
        assert not wrong, "\n".join(wrong)
        # The kernel feature probe is in status (and doctor).
        kernel = json.loads(server.policyd("status", "--json").stdout)["kernel"]
        assert kernel["kernel"] == os.uname().release and kernel["destroy_set_element"] in (
            True, False)
        assert "DESTROYSETELEM" in server.policyd("doctor", str(policy)).stdout
        assert listed == {row[1] for row in rows}

        # Bans drop udp only on ports a udp service guards (issue 11).
        banned = MANUAL[0][2][0]
        assert client.udp_answers(SERVER["198.51.100"], 8080, timeout=2, source=banned)
        assert explain(banned, "udp") == "allow"
        assert not client.udp_answers(SERVER["198.51.100"], 5353, timeout=0.5, source=banned)
        assert explain(banned, "udp", "5353") == "banned"

        # Unban by an address inside each ban: it says which network it lifts.
        for _given, network, stopped, _open in rows:
            out = server.policyd("unban", stopped[-1])
            assert out.returncode == 0, out.stderr
            assert out.stdout.split()[1] == network, out.stdout
        assert json.loads(server.policyd("bans", "--json").stdout) == []
        for source in sources:
            assert reaches(source), source
            assert explain(source) == "allow", source
    finally:
        daemon.stop_and_read()


def test_changing_ipv6_prefix_keeps_each_ban_exactly_as_wide(lab):
    """The IPv6 hash set's elements mean networks under the rule's mask: after
    bans.ipv6_prefix changes, a /64 ban must not become a /56 one (or vanish)."""
    server, client = lab.host("srv"), lab.host("cli")
    sources = ["2001:db8:5::7", "2001:db8:5::8", "2001:db8:5:1::1"]
    lab.link(server, client, ["2001:db8::1/32"], [f"{s}/32" for s in sources],
             a_ifname="wan0", b_ifname="eth0")
    server.listen(8080)
    log = lab.tmp / "error.log"
    log.write_text("")
    policy = lab.tmp / "policy.yaml"
    text = __import__("textwrap").dedent(POLICY.format(log=log))
    policy.write_text(text)
    assert server.policyd("apply", str(policy)).returncode == 0

    def shut(source):
        return not client.can_connect("2001:db8::1", 8080, timeout=0.5, source=source)

    daemon = PolicydDaemon(server, str(policy)).start()
    try:
        with log.open("a") as out:
            out.write(nginx_failure(sources[0]) * 2)
        assert wait_for(lambda: shut(sources[1]), timeout=5), "the /64 is banned"
        assert not shut(sources[2])
        policy.write_text(text.replace("maxretry: 2", "maxretry: 2\n  ipv6_prefix: 56"))
        applied = server.policyd("apply", str(policy))
        assert applied.returncode == 0, applied.stderr
        listed = lambda: [b["network"] for b in json.loads(  # noqa: E731
            server.policyd("bans", "--json").stdout)]
        assert listed() == ["2001:db8:5::/64"]
        assert wait_for(lambda: shut(sources[0]) and not shut(sources[2]), timeout=5), \
            "the /64 ban neither widened to the /56 nor vanished"
        assert shut(sources[1])
        with log.open("a") as out:  # a new offender in the same /56 is banned as the /56
            out.write(nginx_failure(sources[2]) * 2)
        assert wait_for(lambda: shut(sources[2]), timeout=5)
        assert sorted(listed()) == ["2001:db8:5::/56"] or sorted(listed()) == [
            "2001:db8:5::/56", "2001:db8:5::/64"]
    finally:
        daemon.stop_and_read()
