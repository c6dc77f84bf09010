"""The allowlist in a real kernel: who connects, who does not, and atomic loads."""
from policyd_lab.packetcount import add_probe, connecting, handshake, probe_counts
from policyd_lab.world import (SERVER_V4, SERVER_V6, SERVER_WAN_V4, SERVER_WAN_V6, STRANGER_V4,
                      TRUSTED_V4)

LAN_POLICY = """\
    version: 1
    services:
      ollama:
        ports: [11434]
        allow: [127.0.0.0/8, "::1", 192.0.2.0/24, "2001:db8:1::/64"]
      dns:
        ports: [5353]
        proto: udp
        action: reject
        allow: [192.0.2.0/24]
"""


def test_allowed_sources_connect_and_others_are_dropped(world):
    world.server.listen(11434)
    world.server.listen(2222)
    # Without policyd the stranger gets through: the test below can fail.
    assert world.stranger.can_connect(SERVER_WAN_V4, 11434)
    result = world.server.policyd("apply", world.policy(LAN_POLICY))
    assert result.returncode == 0, result.stderr
    assert world.trusted.can_connect(SERVER_V4, 11434)
    assert world.trusted.can_connect(SERVER_V6, 11434)
    assert world.server.can_connect("127.0.0.1", 11434)
    assert world.server.can_connect("::1", 11434)
    assert not world.stranger.can_connect(SERVER_WAN_V4, 11434, timeout=0.5)
    assert not world.stranger.can_connect(SERVER_WAN_V6, 11434, timeout=0.5)
    # A port no service lists is untouched.
    assert world.stranger.can_connect(SERVER_WAN_V4, 2222)
    assert world.stranger.can_connect(SERVER_WAN_V6, 2222)


def test_udp_service_rejects_strangers(world):
    world.server.listen(5353, "udp")
    assert world.server.policyd("apply", world.policy(LAN_POLICY)).returncode == 0
    assert world.trusted.udp_answers(SERVER_V4, 5353)
    assert not world.stranger.udp_answers(SERVER_WAN_V4, 5353, timeout=0.5)


def test_reject_answers_at_once_instead_of_timing_out(world):
    world.server.listen(11434)
    policy = world.policy("""\
        version: 1
        services:
          ollama: {ports: [11434], allow: [192.0.2.0/24], action: reject}
    """)
    assert world.server.policyd("apply", policy).returncode == 0
    sock = world.stranger.socket(__import__("socket").AF_INET)
    sock.settimeout(3)
    try:
        sock.connect((SERVER_WAN_V4, 11434))
        refused = False
    except ConnectionRefusedError:   # a drop would time out instead
        refused = True
    finally:
        sock.close()
    assert refused


def test_interface_allow(world):
    world.server.listen(11434)
    policy = world.policy("""\
        version: 1
        services:
          ollama:
            ports: [11434]
            allow: [{iface: wan0}]
    """)
    assert world.server.policyd("apply", policy).returncode == 0
    assert world.stranger.can_connect(SERVER_WAN_V4, 11434)
    assert world.stranger.can_connect(SERVER_WAN_V6, 11434)
    assert not world.trusted.can_connect(SERVER_V4, 11434, timeout=0.5)


def test_docker_published_port_is_guarded(world, lab):
    """A port published by DNAT to a container crosses forward, not input."""
    container = lab.host("ctr")
    lab.link(world.server, container, ["203.0.113.1/24"], ["203.0.113.2/24"],
             a_ifname="docker0", b_ifname="eth0")
    container.ip("route", "add", "default", "via", "203.0.113.1")
    for client in (world.trusted, world.stranger):
        client.ip("route", "add", "203.0.113.0/24", "via",
                  SERVER_V4 if client is world.trusted else SERVER_WAN_V4)
    world.server.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    # What Docker's iptables-nft rules amount to, in a table of Docker's own.
    docker = lab.tmp / "docker.nft"
    docker.write_text(
        "table ip dockerlike {\n"
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
        "    fib daddr type local tcp dport 11434 dnat to 203.0.113.2:11434\n  }\n"
        "}\n")
    world.server.nft("-f", str(docker))
    container.listen(11434)
    assert world.stranger.can_connect(SERVER_WAN_V4, 11434)
    policy = world.policy("""\
        version: 1
        services:
          ollama: {ports: [11434], allow: [192.0.2.0/24]}
    """)
    assert world.server.policyd("apply", policy).returncode == 0
    assert world.trusted.can_connect(SERVER_V4, 11434)
    assert not world.stranger.can_connect(SERVER_WAN_V4, 11434, timeout=0.5)
    # Docker's own table is left exactly as it was.
    assert "dnat to 203.0.113.2:11434" in world.server.nft("list", "table", "ip",
                                                            "dockerlike").stdout


def test_refused_policy_leaves_ruleset_byte_identical(world):
    assert world.server.policyd("apply", world.policy(LAN_POLICY)).returncode == 0
    before = world.server.ruleset()
    bad_address = world.policy("""\
        version: 1
        services:
          ollama: {ports: [11434], allow: [192.0.2.1/24]}
    """, "bad.yaml")
    result = world.server.policyd("apply", bad_address)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bad.yaml:3" in result.stderr
    bad_yaml = world.policy("version: 1\nservices: [\n", "broken.yaml")
    assert world.server.policyd("apply", bad_yaml).returncode == 2
    assert world.server.ruleset() == before


def test_kernel_refusal_changes_nothing(world):
    """A table of someone else's in the way makes the kernel refuse the whole load."""
    world.server.nft("add", "table", "inet", "policyd_bans")
    world.server.nft("add", "set", "inet", "policyd_bans", "ban4", "{ type ipv6_addr; }")
    before = world.server.ruleset()
    result = world.server.policyd("apply", world.policy(LAN_POLICY))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "refused" in result.stderr
    assert world.server.ruleset() == before


def test_other_tables_are_left_alone(world):
    world.server.nft("add", "table", "inet", "filter")
    world.server.nft("add", "chain", "inet", "filter", "input",
                     "{ type filter hook input priority 0; policy accept; }")
    world.server.nft("add", "rule", "inet", "filter", "input", "tcp dport 2222 counter accept")
    foreign = world.server.nft("list", "table", "inet", "filter").stdout
    assert world.server.policyd("apply", world.policy(LAN_POLICY)).returncode == 0
    assert world.server.policyd("apply", world.policy(LAN_POLICY)).returncode == 0
    assert world.server.nft("list", "table", "inet", "filter").stdout == foreign


# A table swapped in one transaction must drop nothing the old and the new
# policy both allow. Linux 6.18 misses lookups in an interval set made in the
# transaction that makes its rules live, Debian 12's 6.1 in a set whose ranges
# are replaced in place (policyd.kernel.nft.IN_PLACE_FROM says which way each
# kernel gets); `make test-kernel` runs this test on 6.1.
def test_reapply_is_atomic_for_a_connecting_client(world):
    """While policies are swapped again and again, no packet of an allowed client is dropped."""
    world.server.listen(11434)
    first = world.policy(LAN_POLICY, "a.yaml")
    second = world.policy("""\
        version: 1
        services:
          ollama:
            ports: [11434]
            allow: [192.0.2.0/25, 192.0.2.128/25, 203.0.113.0/24]
    """, "b.yaml")
    assert world.server.policyd("apply", first).returncode == 0
    add_probe(world.server, 11434)
    with connecting(world.trusted, SERVER_V4, 11434) as client:
        for i in range(8):
            result = world.server.policyd("apply", second if i % 2 == 0 else first)
            assert result.returncode == 0, result.stderr
    before, after = probe_counts(world.server)
    assert client["attempts"] > 20 and before >= 2 * client["attempts"]   # a SYN and an ACK at least each
    assert before == after and client["failed"] == []
    # The same probe does see a drop: the stranger's SYNs go unanswered, and counted so.
    assert not handshake(world.stranger, SERVER_WAN_V4, 11434)
    before, after = probe_counts(world.server)
    assert before - after >= 2


def test_show_output_loads_into_nft_as_the_same_ruleset(world, lab):
    """`policyd show` is faithful: its text and apply's JSON make the same kernel state."""
    policy = world.policy(LAN_POLICY)
    assert world.server.policyd("apply", policy).returncode == 0
    shown = world.server.policyd("show", policy)
    assert shown.returncode == 0
    other = lab.host("mirror")
    script = lab.tmp / "shown.nft"
    script.write_text(shown.stdout)
    other.nft("-f", str(script))
    assert other.ruleset() == world.server.ruleset()


def test_explain_reports_live_ban(world):
    policy = world.policy(LAN_POLICY)
    assert world.server.policyd("apply", policy).returncode == 0
    out = world.server.policyd("explain", policy, STRANGER_V4, "11434")
    assert out.stdout.startswith("drop\t")
    world.server.nft("add", "element", "inet", "policyd_bans", "ban4",
                     f"{{ {TRUSTED_V4} timeout 1h }}")
    out = world.server.policyd("explain", policy, TRUSTED_V4, "11434")
    assert out.stdout.startswith("banned\t"), out.stdout
    assert not world.trusted.can_connect(SERVER_V4, 11434, timeout=0.5)


def test_kernel_skeleton_matches_the_compiled_one(world):
    """The daemon's cheap drift check must see no drift right after a load."""
    from policyd_lab.netlab import in_namespace, REPO
    from policyd.policy import reader as policy_mod
    from policyd.rules.compile import compile_policy
    from policyd.kernel.nft import Nft

    def check():
        nft = Nft()
        paths = sorted((REPO / "policies").glob("*.yaml"))
        rulesets = [compile_policy(policy_mod.load(p)) for p in paths]
        rulesets.append(compile_policy(policy_mod.load(paths[0]), policy_mod.load(paths[1]), 30))
        for ruleset in rulesets:
            nft.load(ruleset.document())
            for table in ("policyd", "policyd_bans"):
                assert nft.skeleton(table) == ruleset.skeleton(table)
        nft.load(rulesets[0].document())
        listing = world.server.nft("-a", "list", "chain", "inet", "policyd",
                                   "committed_svc_ollama").stdout
        last_handle = listing.split("# handle")[-1].split()[0]
        world.server.nft("delete", "rule", "inet", "policyd", "committed_svc_ollama",
                         "handle", last_handle)
        assert nft.skeleton("policyd") != rulesets[0].skeleton("policyd")

    in_namespace(world.server.name, check)
