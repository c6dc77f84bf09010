"""The ruleset model (policyd.rules.model) and the kernel-order walk over it (policyd.rules.walk):
the model of a compiled transaction says what the other readers said, and the
walk agrees with explain wherever explain agrees with nftables."""
import ipaddress
import itertools
from pathlib import Path

import pytest

from policyd.operator import tableshape
from policyd.policy import reader as policy
from policyd.rules import render
from policyd.rules.compile import compile_policy
from policyd.operator.explain import decide
from policyd.rules.model import Ruleset
from policyd.rules.walk import Packet, walk

POLICIES = sorted(Path(__file__).resolve().parent.parent.glob("policies/*.yaml"))
ip = ipaddress.ip_address
net = ipaddress.ip_network

POLICY = policy.loads("""\
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
  limited:
    ports: [9000, 9001]
    rate: 10/minute
    allow: [198.51.100.0/24]
bans:
  ports: [8080, 11434, 2222]
""")
CANDIDATE = policy.loads("""\
version: 1
services:
  other:
    ports: [22]
    allow: [192.0.2.0/24]
""")


def compiled():
    for path in POLICIES:
        loaded = policy.load(path)
        yield path.name, loaded, compile_policy(loaded)
    yield "trial", POLICY, compile_policy(POLICY, CANDIDATE, 30)


@pytest.mark.parametrize("name, loaded, built", list(compiled()), ids=lambda v: str(v)[:20])
def test_what_the_compiler_built_is_what_its_transaction_leaves(name, loaded, built):
    """The model the compiler builds and the replay of the document it sends the
    kernel are one ruleset: every reader gets the same answer from either."""
    replayed = Ruleset.replay(built.document())
    assert replayed.document() == built.document()
    assert render.to_text(replayed) == render.to_text(built)
    for table in (loaded.table, loaded.bans_table):
        assert replayed.skeleton(table) == built.skeleton(table)
        assert (tableshape.table_shape(replayed.listed_objects(table))
                == tableshape.table_shape(built.listed_objects(table)))


def test_building_and_replaying_give_the_same_model():
    built = Ruleset()
    built.add_table("t").delete_table("t").add_table("t")
    built.add_set("t", "s", type="ipv4_addr", flags=["interval"], elem=["192.0.2.1"])
    built.add_chain("t", "input", type="filter", hook="input", prio=0, policy="accept")
    built.add_rule("t", "input", {"accept": None}, why=lambda packet, element: "because")
    built.add_elements("t", "s", [{"prefix": {"addr": "198.51.100.0", "len": 24}}])
    replayed = Ruleset.replay(built.document())
    assert replayed.skeleton("t") == built.skeleton("t") == (
        frozenset({("input", 1)}), frozenset({"s"}))
    assert replayed.tables["t"].sets["s"].elem == built.tables["t"].sets["s"].elem
    assert built.tables["t"].chains["input"].rules[0].why(None, None) == "because"


def test_the_kernels_meaning_of_add_flush_and_delete():
    model = Ruleset()
    model.add_table("t").add_set("t", "s", type="inet_service")
    model.add_elements("t", "s", [22, 80]).add_set("t", "s", type="inet_service")
    assert model.tables["t"].sets["s"].elem == [22, 80], "adding an existing set keeps it"
    model.delete_elements("t", "s", [22])
    assert model.tables["t"].sets["s"].elem == [80]
    model.flush_set("t", "s")
    assert model.tables["t"].sets["s"].elem == []
    model.add_chain("t", "c").add_rule("t", "c", {"drop": None}).add_chain("t", "c")
    assert len(model.tables["t"].chains["c"].rules) == 1
    model.flush_chain("t", "c")
    assert model.tables["t"].chains["c"].rules == []
    model.delete_elements("gone", "s", [1])  # a table the kernel has: nothing to model
    model.delete_table("t")
    assert model.tables == {}
    with pytest.raises(LookupError):
        model.add_rule("t", "c", {"accept": None})
    strict = Ruleset.replay(Ruleset().document(), onto=model, strict=True)
    with pytest.raises(LookupError):
        strict.delete_table("t")


BANS = [(net("203.0.113.0/28"), 120), (net("2001:db8:bad::/64"), 60)]
SOURCES = {
    "allowed": [ip("192.168.1.9"), ip("::1"), ip("198.51.100.7"), ip("2001:db8::5")],
    "denied": [ip("203.0.113.99"), ip("2001:db8:beef::1")],
    "banned": [ip("203.0.113.5"), ip("2001:db8:bad::1")],
}
PORTS = {"guarded": [11434, 53, 9000, 9001], "banned-only": [2222], "both": [8080],
         "unguarded": [5, 65535]}
KERNEL_WORDS = {"allow": "accept", "banned": "drop", "drop": "drop", "reject": "reject"}


def ban_contents(table, name):
    """The kernel's ban sets hold the bans; every other set is the model's."""
    if table == POLICY.bans_table and name.startswith("ban"):
        return [network for network, _left in BANS]
    return None


@pytest.mark.parametrize("source, port, proto, iface", [
    (source, port, proto, iface)
    for source in itertools.chain(*SOURCES.values())
    for port in itertools.chain(*PORTS.values())
    for proto in ("tcp", "udp")
    for iface in (None, "wg0", "eth0")])
def test_the_walk_agrees_with_explain(source, port, proto, iface):
    """explain's verdict is the kernel's: the walk goes through the compiled rules."""
    model = compile_policy(POLICY)
    walked = walk(model, Packet(source, port, proto, iface), ban_contents)
    decision = decide(POLICY, source, port, proto, iface, BANS)
    assert walked.verdict == KERNEL_WORDS[decision.verdict], decision


def test_the_walk_names_what_decided():
    model = compile_policy(POLICY)
    banned = walk(model, Packet(ip("2001:db8:bad::1"), 8080), ban_contents)
    assert (banned.verdict, banned.table, banned.element) == ("drop", "policyd_bans",
                                                            net("2001:db8:bad::/64"))
    allowed = walk(model, Packet(ip("192.168.1.9"), 11434))
    assert allowed.chain.name == "committed_svc_ollama"
    assert allowed.element == net("192.168.1.0/24")
    unguarded = walk(model, Packet(ip("192.0.2.1"), 5))
    assert (unguarded.verdict, unguarded.rule, unguarded.chain.name) == (
        "accept", None, "committed_input")


def test_a_trial_runs_the_candidate_while_its_element_lives():
    model = compile_policy(POLICY, CANDIDATE, 30)
    on_trial = walk(model, Packet(ip("203.0.113.99"), 22))
    assert (on_trial.verdict, on_trial.chain.name) == ("drop", "candidate_svc_other")
    model.tables["policyd"].sets["trial"].elem = []   # the kernel's timeout fired
    assert walk(model, Packet(ip("203.0.113.99"), 22)).verdict == "accept"


def test_an_expression_the_walk_does_not_know_is_an_error_not_a_guess():
    model = Ruleset()
    model.add_table("t").add_chain("t", "input", type="filter", hook="input", prio=0,
                                    policy="accept")
    model.add_rule("t", "input", {"match": {"op": "==", "left": {"meta": {"key": "mark"}},
                                            "right": 1}}, {"drop": None})
    with pytest.raises(ValueError, match="cannot walk"):
        walk(model, Packet(ip("192.0.2.1"), 80))
