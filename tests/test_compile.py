"""The compiler: golden documents for the shipped policies, and its edge cases.

Regenerate the golden files after an intended change with
`UPDATE_GOLDEN=1 make unit` and review the diff like code.
"""
import json
import os
from pathlib import Path

import pytest

from policyd.policy import reader as policy
from policyd.rules import render
from policyd.rules.compile import compile_policy

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden")
POLICIES = sorted((REPO / "policies").glob("*.yaml"))


def _golden(name, text):
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.stem)
def test_golden_documents(path):
    ruleset = compile_policy(policy.load(path))
    _golden(path.stem + ".json", json.dumps(ruleset.document(), indent=1, sort_keys=True) + "\n")
    _golden(path.stem + ".nft", render.to_text(ruleset))


def test_golden_trial_document():
    committed = policy.load(REPO / "policies/ollama-localhost.yaml")
    candidate = policy.load(REPO / "policies/ollama-lan.yaml")
    _golden("trial-localhost-to-lan.nft",
            render.to_text(compile_policy(committed, candidate, 60)))


def _load(text):
    return policy.loads("version: 1\n" + text)


def _rules(document, chain, table="policyd"):
    return [c["add"]["rule"]["expr"] for c in document["nftables"]
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
            and c["add"]["rule"]["table"] == table]


def _set(document, name):
    for command in document["nftables"]:
        if command.get("add", {}).get("set", {}).get("name") == name:
            return command["add"]["set"]
    return None


def test_deterministic():
    p = policy.load(REPO / "policies/ollama-behind-proxy.yaml")
    assert json.dumps(compile_policy(p).document()) == json.dumps(compile_policy(p).document())


def test_table_is_replaced_in_one_transaction():
    commands = compile_policy(_load("services:\n  a: {ports: [1], allow: [any]}\n")).document()["nftables"]
    verbs = [next(iter(c)) for c in commands[1:4]]
    assert verbs == ["add", "delete", "add"]
    # The ban table is never deleted: that is what keeps bans across applies.
    assert not any("delete" in c and c["delete"].get("table", {}).get("name") == "policyd_bans"
                   for c in commands)


def test_nested_networks_are_dropped_for_the_interval_set():
    doc = compile_policy(_load(
        "services:\n  a:\n    ports: [1]\n"
        "    allow: [192.0.2.0/24, 192.0.2.128/25, 192.0.2.7, 198.51.100.0/25, 198.51.100.128/25]\n")).document()
    assert _set(doc, "committed_a_v4")["elem"] == [
        {"prefix": {"addr": "192.0.2.0", "len": 24}},
        {"prefix": {"addr": "198.51.100.0", "len": 25}},
        {"prefix": {"addr": "198.51.100.128", "len": 25}}]
    assert _set(doc, "committed_a_v6") is None


def test_reject_for_udp_is_icmpx_and_for_tcp_a_reset():
    doc = compile_policy(_load(
        "services:\n  d: {ports: [53], proto: udp, action: reject, allow: [192.0.2.0/24]}\n"
        "  t: {ports: [80], action: reject, allow: ['2001:db8::/32']}\n")).document()
    assert _rules(doc, "committed_svc_d")[-1] == [{"reject": {"type": "icmpx",
                                                               "expr": "port-unreachable"}}]
    assert _rules(doc, "committed_svc_t")[-1] == [{"reject": {"type": "tcp reset"}}]


def test_any_accepts_without_sets():
    doc = compile_policy(_load("services:\n  p: {ports: [8080], allow: [any]}\n")).document()
    assert _rules(doc, "committed_svc_p") == [[{"accept": None}]]


def test_rate_limits_new_connections_per_source_with_double_burst():
    doc = compile_policy(_load("services:\n  a: {ports: [1], allow: [any], rate: 5/minute}\n")).document()
    first = _rules(doc, "committed_svc_a")[0]
    limit = first[2]["set"]["stmt"][0]["limit"]
    assert limit == {"rate": 5, "burst": 10, "per": "minute", "inv": True}
    assert _set(doc, "committed_a_rate4")["flags"] == ["timeout"]


def test_forward_chain_guards_dnat_only_in_original_direction():
    doc = compile_policy(_load("services:\n  a: {ports: [11434, 8080], allow: [any]}\n")).document()
    rules = _rules(doc, "committed_forward")
    assert len(rules) == 2
    for rule in rules:
        assert rule[0] == {"match": {"op": "==", "left": {"ct": {"key": "direction"}},
                                     "right": "original"}}
        assert rule[1]["match"]["right"] == "dnat"


def test_trial_dispatches_to_candidate_while_the_trial_set_holds_an_element():
    committed = _load("services:\n  a: {ports: [1], allow: [any]}\n")
    candidate = _load("services:\n  a: {ports: [1], allow: [192.0.2.0/24]}\n"
                      "  u: {ports: [53], proto: udp, allow: [any]}\n")
    doc = compile_policy(committed, candidate, 30).document()
    trial = [c for c in doc["nftables"] if "element" in c.get("add", {})
             and c["add"]["element"]["name"] == "trial"]
    assert trial[0]["add"]["element"]["elem"] == [
        {"elem": {"val": "tcp", "timeout": 30}}, {"elem": {"val": "udp", "timeout": 30}}]
    assert _rules(doc, "input") == [
        [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "@trial"}},
         {"goto": {"target": "candidate_input"}}],
        [{"goto": {"target": "committed_input"}}]]
    with pytest.raises(ValueError):
        compile_policy(committed, candidate).document()


def test_ban_ipv6_mask_follows_prefix():
    doc = compile_policy(_load("services:\n  a: {ports: [1], allow: [any]}\n"
                               "bans: {ipv6_prefix: 128}\n")).document()
    v6 = [r for r in _rules(doc, "input", "policyd_bans") if "@ban6" in json.dumps(r)]
    assert v6 and all("&" not in json.dumps(r) for r in v6)
    doc = compile_policy(_load("services:\n  a: {ports: [1], allow: [any]}\n"
                               "bans: {ipv6_prefix: 56}\n")).document()
    assert "ffff:ffff:ffff:ff00::" in json.dumps(_rules(doc, "input", "policyd_bans"))
