"""`policyd doctor` against a fake host: listeners, interfaces, logs, filters, the
state dir, the kernel's tables and their drift, nftables.service and the daemon.

The kernel listing below is what `nft -j list table inet policyd` printed (nft
1.0.6) after loading POLICY_TEXT: drift must tolerate the kernel's own
normalisation of rules (implicit matches dropped, anonymous sets sorted).
"""
import hashlib
import ipaddress
import json
import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from policyd.operator import doctor, doctor_host, hostenv, tableshape
from policyd.policy import reader as policy_mod
from policyd.operator.cli import main
from policyd.rules.compile import compile_policy
from policyd.errors import InputError, KernelError
from policyd.operator.netdiag import Listener
from policyd.policy.store import Pending, PolicyStore

ip = ipaddress.ip_address
NOW = 1_000_000.0

POLICY_TEXT = """\
version: 1
services:
  ollama:
    ports: [11434, 8080]
    allow: [127.0.0.0/8, "::1", 192.0.2.0/24, {iface: lan0}]
    rate: 20/second
  dns:
    ports: [5353]
    proto: udp
    action: reject
    allow: [192.0.2.0/24]
"""
KERNEL_LISTING = json.loads(r"""
[
{"table":{"family":"inet","name":"policyd","handle":2}},
{"set":{"family":"inet","name":"committed_ollama_rate4","table":"policyd","type":"ipv4_addr","handle":4,"size":65535,"flags":["timeout"],"timeout":60}},
{"set":{"family":"inet","name":"committed_ollama_rate6","table":"policyd","type":"ipv6_addr","handle":5,"size":65535,"flags":["timeout"],"timeout":60}},
{"set":{"family":"inet","name":"committed_ollama_v4","table":"policyd","type":"ipv4_addr","handle":6,"flags":["interval"],"elem":[{"prefix":{"addr":"127.0.0.0","len":8}},{"prefix":{"addr":"192.0.2.0","len":24}}]}},
{"set":{"family":"inet","name":"committed_ollama_v6","table":"policyd","type":"ipv6_addr","handle":7,"flags":["interval"],"elem":["::1"]}},
{"set":{"family":"inet","name":"committed_dns_v4","table":"policyd","type":"ipv4_addr","handle":19,"flags":["interval"],"elem":[{"prefix":{"addr":"192.0.2.0","len":24}}]}},
{"chain":{"family":"inet","table":"policyd","name":"committed_input","handle":1}},
{"chain":{"family":"inet","table":"policyd","name":"committed_forward","handle":2}},
{"chain":{"family":"inet","table":"policyd","name":"committed_svc_ollama","handle":3}},
{"chain":{"family":"inet","table":"policyd","name":"committed_svc_dns","handle":18}},
{"chain":{"family":"inet","table":"policyd","name":"input","handle":24,"type":"filter","hook":"input","prio":0,"policy":"accept"}},
{"chain":{"family":"inet","table":"policyd","name":"forward","handle":26,"type":"filter","hook":"forward","prio":0,"policy":"accept"}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_input","handle":15,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":{"set":[8080,11434]}}},{"goto":{"target":"committed_svc_ollama"}}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_input","handle":22,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":5353}},{"goto":{"target":"committed_svc_dns"}}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_forward","handle":16,"expr":[{"match":{"op":"==","left":{"ct":{"key":"direction"}},"right":"original"}},{"match":{"op":"in","left":{"ct":{"key":"status"}},"right":"dnat"}},{"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"tcp"}},{"match":{"op":"==","left":{"ct":{"key":"proto-dst","dir":"original"}},"right":11434}},{"goto":{"target":"committed_svc_ollama"}}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_forward","handle":17,"expr":[{"match":{"op":"==","left":{"ct":{"key":"direction"}},"right":"original"}},{"match":{"op":"in","left":{"ct":{"key":"status"}},"right":"dnat"}},{"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"tcp"}},{"match":{"op":"==","left":{"ct":{"key":"proto-dst","dir":"original"}},"right":8080}},{"goto":{"target":"committed_svc_ollama"}}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_forward","handle":23,"expr":[{"match":{"op":"==","left":{"ct":{"key":"direction"}},"right":"original"}},{"match":{"op":"in","left":{"ct":{"key":"status"}},"right":"dnat"}},{"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"udp"}},{"match":{"op":"==","left":{"ct":{"key":"proto-dst","dir":"original"}},"right":5353}},{"goto":{"target":"committed_svc_dns"}}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_svc_ollama","handle":8,"expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":"new"}},{"set":{"op":"update","elem":{"payload":{"protocol":"ip","field":"saddr"}},"set":"@committed_ollama_rate4","stmt":[{"limit":{"rate":20,"burst":40,"per":"second","inv":true}}]}},{"drop":null}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_svc_ollama","handle":9,"expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":"new"}},{"set":{"op":"update","elem":{"payload":{"protocol":"ip6","field":"saddr"}},"set":"@committed_ollama_rate6","stmt":[{"limit":{"rate":20,"burst":40,"per":"second","inv":true}}]}},{"drop":null}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_svc_ollama","handle":10,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"@committed_ollama_v4"}},{"accept":null}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_svc_ollama","handle":11,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip6","field":"saddr"}},"right":"@committed_ollama_v6"}},{"accept":null}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_svc_ollama","handle":12,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"lan0"}},{"accept":null}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_svc_ollama","handle":13,"expr":[{"drop":null}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_svc_dns","handle":20,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"@committed_dns_v4"}},{"accept":null}]}},
{"rule":{"family":"inet","table":"policyd","chain":"committed_svc_dns","handle":21,"expr":[{"reject":{"type":"icmpx","expr":"port-unreachable"}}]}},
{"rule":{"family":"inet","table":"policyd","chain":"input","handle":25,"expr":[{"goto":{"target":"committed_input"}}]}},
{"rule":{"family":"inet","table":"policyd","chain":"forward","handle":27,"expr":[{"goto":{"target":"committed_forward"}}]}}]
""")


def load(text, source="/etc/policyd/policy.yaml"):
    return policy_mod.loads(text, source)


class FakeHost:
    """Every fact doctor asks for, set by the test; defaults describe a healthy host."""

    def __init__(self, tmp_path, policy):
        self.state_dir = str(tmp_path / "state")
        self.store = PolicyStore(self.state_dir)
        self.clock = NOW
        self.listening = [Listener(ip("127.0.0.1"), 11434, 0, 501)]
        self.owners = {501: [(4242, "ollama")]}
        self.links = ["lo", "lan0"]
        self.log_errors = {}
        self.filter_errors = {}
        self.tables = {policy.table, policy.bans_table}
        self.objects = {policy.table: KERNEL_LISTING}
        self.kernel_error = None
        self.listener_error = None
        self.service_links = []
        self.daemon = "listening"
        self.asked_ports = {}

    def now(self):
        return self.clock

    def kernel_tables(self):
        if self.kernel_error:
            raise self.kernel_error
        return sorted(self.tables)

    def table_objects(self, table):
        return self.objects.get(table, []) if table in self.tables else []

    def kernel_features(self):
        return {"kernel": "6.1.0-57-amd64", "destroy_set_element": False,
                "reban": "add+delete+add"}

    def listeners(self, ports, proto="tcp"):
        self.asked_ports[proto] = list(ports)
        if self.listener_error:
            raise self.listener_error
        return [l for l in self.listening if l.port in ports and l.proto == proto]

    def socket_owners(self, inodes):
        return {i: o for i, o in self.owners.items() if i in inodes}

    def interfaces(self):
        return list(self.links)

    def open_log(self, path):
        if path in self.log_errors:
            raise self.log_errors[path]

    def load_filter(self, name):
        if name in self.filter_errors:
            raise self.filter_errors[name]

    def nftables_service_links(self):
        return list(self.service_links)

    def control_socket_path(self):
        return Path("/run/policyd/control.sock")

    def control_socket_state(self):
        return self.daemon

    def daemon_status(self):
        return getattr(self, "status_answer", None)


@pytest.fixture
def policy():
    return load(POLICY_TEXT)


@pytest.fixture
def host(tmp_path, policy):
    host = FakeHost(tmp_path, policy)
    host.store.commit(POLICY_TEXT.encode(), policy, NOW - 60)
    return host


def by_check(findings, check):
    return [f for f in findings if f.check == check]


def levels(findings, check):
    return [f.level for f in by_check(findings, check)]


def test_a_healthy_host_is_all_ok_and_exits_0(host, policy):
    findings = doctor.diagnose(policy, host)
    assert [f for f in findings if f.level != "ok"] == []
    assert doctor.exit_code(findings) == 0
    checks = {f.check for f in findings}
    assert {"listener", "interface", "committed", "trial", "table", "drift",
            "nftables-service", "daemon"} <= checks
    # Only TCP ports are listed: sock_diag is asked for them alone.
    assert host.asked_ports == {"tcp": [8080, 11434], "udp": [5353]}


def test_json_form_is_stable(host, policy):
    host.daemon = "missing"
    document = json.loads(doctor.to_json(doctor.diagnose(policy, host)))
    assert set(document) == {"ok", "findings"}
    assert document["ok"] is False
    for finding in document["findings"]:
        assert set(finding) == {"level", "check", "message", "fix"}
        assert finding["level"] in ("ok", "warn", "fail")
        assert (finding["fix"] == "") == (finding["level"] == "ok")


def test_text_form_is_one_line_per_finding_with_the_fix(host, policy):
    host.daemon = "missing"
    findings = doctor.diagnose(policy, host)
    lines = doctor.to_text(findings).splitlines()
    assert len(lines) == len(findings)
    daemon_line, = [l for l in lines if l.startswith("warn daemon:")]
    assert "; fix: `systemctl enable --now policyd`" in daemon_line
    assert all(l.split()[0] in ("ok", "warn", "fail") for l in lines)


# --- listeners -----------------------------------------------------------

def test_ollama_on_every_ipv4_address_is_a_warning_naming_address_and_fix(host, policy):
    host.listening = [Listener(ip("0.0.0.0"), 11434, 0, 501)]
    findings = doctor_host.check_listeners(policy, host, "policyd", guard_loaded=None)
    warning, = [f for f in findings if f.level == "warn"]
    assert "0.0.0.0:11434" in warning.message and "ollama (pid 4242)" in warning.message
    assert "could not be read" in warning.message
    assert "OLLAMA_HOST=127.0.0.1:11434" in warning.fix
    assert doctor.exit_code(findings) == 1


def test_a_wildcard_listener_behind_the_loaded_table_is_the_lan_set_up(host, policy):
    # ollama-lan.yaml: OLLAMA_HOST=0.0.0.0 so that the LAN and loopback both reach it.
    host.listening = [Listener(ip("0.0.0.0"), 11434, 0, 501)]
    findings = doctor_host.check_listeners(policy, host, "policyd", guard_loaded=True)
    assert doctor.exit_code(findings) == 0
    finding, = [f for f in findings if "11434" in f.message]
    assert "(loaded) admits only the allow list" in finding.message


def test_a_wildcard_listener_without_the_table_says_nothing_guards_it(host, policy):
    host.listening = [Listener(ip("::"), 11434, 0, 777)]
    host.owners = {777: [(99, "docker-proxy")]}
    warning, = [f for f in doctor_host.check_listeners(policy, host, "policyd", guard_loaded=False)
                if f.level == "warn"]
    assert "[::]:11434" in warning.message and "NOT loaded" in warning.message
    assert "-p 127.0.0.1:11434:11434" in warning.fix


def test_an_unknown_process_on_a_wildcard_gets_the_generic_fix(host, policy):
    host.listening = [Listener(ip("0.0.0.0"), 8080, 0, 888)]
    host.owners = {}
    warning, = [f for f in doctor_host.check_listeners(policy, host, "policyd", guard_loaded=False)
                if f.level == "warn"]
    assert warning.message.startswith("tcp/8080: a socket listens on 0.0.0.0:8080")
    assert "bind it to 127.0.0.1:8080" in warning.fix


def test_loopback_and_specific_addresses_are_ok_and_silence_is_noted(host, policy):
    host.listening = [Listener(ip("127.0.0.1"), 11434, 0, 501),
                      Listener(ip("192.0.2.1"), 11434, 0, 502)]
    findings = doctor_host.check_listeners(policy, host, "policyd", guard_loaded=True)
    assert [f.level for f in findings] == ["ok", "ok", "ok", "ok"]
    messages = [f.message for f in findings]
    assert messages[0] == "tcp/8080: nothing listens"
    assert "127.0.0.1:11434 (this host only)" in messages[1]
    assert "192.0.2.1:11434 only" in messages[2]
    assert messages[3] == "udp/5353: nothing listens"


def test_a_udp_listener_on_every_address_is_a_warning(host, policy):
    host.listening = [Listener(ip("::"), 5353, 0, 901, "udp")]
    findings = doctor_host.check_listeners(policy, host, "policyd", guard_loaded=False)
    udp = [f for f in findings if f.message.startswith("udp/5353")]
    assert [f.level for f in udp] == ["warn"] and "[::]:5353" in udp[0].message


def test_listeners_that_cannot_be_listed_are_a_warning(host, policy):
    host.listener_error = PermissionError(1, "Operation not permitted")
    finding, = doctor_host.check_listeners(policy, host, "policyd", guard_loaded=True)
    assert finding.level == "warn" and "as root" in finding.fix


# --- interfaces ----------------------------------------------------------

def test_interfaces_that_do_not_exist_are_warned_about(host):
    policy = load("""\
version: 1
services:
  ollama:
    ports: [11434]
    allow: [{iface: lan0}, {iface: nosuch0}, {iface: "wg*"}, {iface: "tun*"}]
""")
    host.links = ["lo", "lan0", "wg0"]
    findings = doctor_host.check_interfaces(policy, host)
    by_name = {f.message.split()[0]: f for f in findings}
    assert by_name["lan0"].level == "ok" and by_name["wg*"].level == "ok"
    assert by_name["nosuch0"].level == "warn" and by_name["tun*"].level == "warn"
    assert "services.ollama.allow" in by_name["nosuch0"].fix
    assert "lan0, lo, wg0" in by_name["nosuch0"].fix


def test_no_interface_rules_no_interface_findings(host):
    assert doctor_host.check_interfaces(load("version: 1\nservices: {a: {ports: [1], allow: any}}"),
                                   host) == []


# --- logs and filters ----------------------------------------------------

LOGS_POLICY = """\
version: 1
services:
  proxy: {ports: [8080], allow: any}
bans:
  logs:
    - {path: /var/log/nginx/error.log, filter: nginx-auth}
    - {path: /var/log/missing.log, filter: nginx-auth}
    - {path: /var/log/secret.log, filter: caddy-auth}
    - {path: /home/me/caddy.log, filter: broken}
"""


def test_missing_unreadable_and_hidden_logs(host):
    host.log_errors = {"/var/log/missing.log": FileNotFoundError(2, "No such file"),
                       "/var/log/secret.log": PermissionError(13, "Permission denied")}
    findings = doctor_host.check_logs(load(LOGS_POLICY), host)
    assert [f.level for f in findings] == ["ok", "warn", "fail", "warn"]
    assert "does not exist" in findings[1].message and "bans.logs[1].path" in findings[1].fix
    assert "Permission denied" in findings[2].message
    assert "ProtectHome" in findings[3].message


def test_a_filter_that_does_not_load_fails_once_per_filter(host):
    host.filter_errors = {"broken": InputError("unknown filter 'broken'", key="filter")}
    findings = doctor_host.check_filters(load(LOGS_POLICY), host)
    assert [(f.level, f.message.split("'")[1]) for f in findings] == [
        ("fail", "broken"), ("ok", "caddy-auth"), ("ok", "nginx-auth")]
    assert "unknown filter" in findings[0].message


def test_the_real_host_tells_missing_from_unreadable_logs(tmp_path):
    env = hostenv.HostEnvironment(tmp_path / "s", tmp_path / "r", nft_factory=None)
    readable = tmp_path / "access.log"
    readable.write_text("x\n")
    env.open_log(str(readable))
    with pytest.raises(FileNotFoundError):
        env.open_log(str(tmp_path / "nope.log"))
    with pytest.raises(OSError) as caught:
        env.open_log(str(tmp_path))
    assert not isinstance(caught.value, FileNotFoundError)


def test_the_real_host_loads_shipped_filters_and_refuses_unknown_ones(tmp_path):
    env = hostenv.HostEnvironment(tmp_path / "s", tmp_path / "r", nft_factory=None)
    env.load_filter("nginx-auth")
    with pytest.raises(InputError):
        env.load_filter("no-such-filter")


# --- the state dir -------------------------------------------------------

def test_nothing_committed_is_a_warning_with_the_apply_command(tmp_path, policy):
    host = FakeHost(tmp_path, policy)
    finding, = by_check(doctor.diagnose(policy, host), "committed")
    assert finding.level == "warn"
    assert finding.fix == "`policyd apply /etc/policyd/policy.yaml`"


def test_a_policy_file_that_differs_from_the_committed_one(host):
    edited = load(POLICY_TEXT.replace("8080", "8081"))
    finding, = by_check(doctor.diagnose(edited, host), "committed")
    assert finding.level == "warn"
    assert "from /etc/policyd/policy.yaml" in finding.message  # the meta's source
    assert "policyd apply" in finding.fix


def test_a_damaged_committed_policy_fails(host, policy):
    (Path(host.state_dir) / "committed.yaml").write_text("version: [")
    finding, = by_check(doctor.diagnose(policy, host), "committed")
    assert finding.level == "fail" and "cannot be read" in finding.message


def pending_for(text, seconds=120, started=NOW - 20):
    data = text.encode()
    return Pending(data=data, source="/tmp/candidate.yaml",
                   sha256=hashlib.sha256(data).hexdigest(), started_at=started,
                   deadline=started + seconds, seconds=seconds, previous_sha256=None)


CANDIDATE_TEXT = """\
version: 1
services:
  ollama:
    ports: [11434]
    allow: [127.0.0.0/8]
"""


def test_a_trial_in_progress_is_reported_with_seconds_left_not_as_drift(host, policy):
    pending = pending_for(CANDIDATE_TEXT)
    host.store.set_pending(pending)
    ruleset = compile_policy(policy, pending.policy(), pending.seconds)
    host.objects[policy.table] = ruleset.listed_objects(policy.table)
    findings = doctor.diagnose(policy, host)
    trial, = by_check(findings, "trial")
    assert trial.level == "warn" and "100s left" in trial.message
    assert "policyd confirm" in trial.fix
    drift, = by_check(findings, "drift")
    assert drift.level == "ok" and "with the trial" in drift.message


def test_a_trial_past_its_deadline_says_so(host, policy):
    host.store.set_pending(pending_for(CANDIDATE_TEXT, seconds=10, started=NOW - 40))
    trial, = by_check(doctor.diagnose(policy, host), "trial")
    assert trial.level == "warn" and "30s ago" in trial.message
    assert "policyd rollback" in trial.fix


def test_the_policy_on_trial_is_not_reported_as_uncommitted(host):
    pending = pending_for(CANDIDATE_TEXT)
    host.store.set_pending(pending)
    finding, = by_check(doctor.diagnose(load(CANDIDATE_TEXT), host), "committed")
    assert finding.level == "ok" and "on trial" in finding.message


# --- the kernel ----------------------------------------------------------

def test_missing_tables_fail_and_a_missing_guard_skips_drift(host, policy):
    host.tables = {policy.bans_table}
    findings = doctor.diagnose(policy, host)
    assert levels(findings, "table") == ["fail", "ok"]
    assert "guard table inet policyd is missing" in by_check(findings, "table")[0].message
    assert by_check(findings, "drift") == []
    host.tables = {policy.table}
    assert levels(doctor.diagnose(policy, host), "table") == ["ok", "fail"]


def test_a_kernel_that_cannot_be_read_is_one_failure(host, policy):
    host.kernel_error = KernelError("Operation not permitted")
    findings = doctor.diagnose(policy, host)
    table, = by_check(findings, "table")
    assert table.level == "fail" and "Operation not permitted" in table.message
    assert by_check(findings, "drift") == []


def test_a_missing_nftables_binding_names_the_package(host, policy):
    host.kernel_error = ImportError("No module named 'nftables'")
    table, = by_check(doctor.diagnose(policy, host), "table")
    assert table.level == "fail" and table.fix == "install python3-nftables"


def test_the_real_kernel_listing_matches_the_compiled_policy(policy):
    expected = tableshape.table_shape(compile_policy(policy).listed_objects("policyd"))
    assert tableshape.compare_shapes(expected, tableshape.table_shape(KERNEL_LISTING)) == []


def drift_of(host, policy, edit):
    listing = json.loads(json.dumps(KERNEL_LISTING))
    edit(listing)
    host.objects[policy.table] = listing
    finding, = by_check(doctor.diagnose(policy, host), "drift")
    return finding


def test_an_added_rule_is_drift(host, policy):
    def add_accept(listing):
        listing.append({"rule": {"family": "inet", "table": "policyd", "chain": "input",
                                 "handle": 99, "expr": [{"accept": None}]}})
    finding = drift_of(host, policy, add_accept)
    assert finding.level == "fail"
    assert "chain input has 2 rules" in finding.message
    assert "policyd restore" in finding.fix


def test_an_added_allowlist_element_is_drift_and_named(host, policy):
    def add_element(listing):
        for obj in listing:
            if obj.get("set", {}).get("name") == "committed_ollama_v4":
                obj["set"]["elem"].append({"prefix": {"addr": "203.0.113.0", "len": 24}})
    finding = drift_of(host, policy, add_element)
    assert "set committed_ollama_v4: 1 element(s) not in the policy (203.0.113.0/24)" \
        in finding.message


def test_a_deleted_chain_and_a_changed_verdict_are_drift(host, policy):
    def break_it(listing):
        listing[:] = [o for o in listing
                      if o.get("chain", {}).get("name") != "committed_svc_dns"
                      and o.get("rule", {}).get("chain") != "committed_svc_dns"]
        for obj in listing:
            if obj.get("rule", {}).get("chain") == "committed_svc_ollama" \
                    and obj["rule"]["expr"] == [{"drop": None}]:
                obj["rule"]["expr"] = [{"accept": None}]
    message = drift_of(host, policy, break_it).message
    assert "chain committed_svc_dns is missing" in message
    assert "chain committed_svc_ollama has 6 rules" in message


def test_dynamic_set_entries_are_not_drift(host, policy):
    def rate_entries(listing):
        for obj in listing:
            if obj.get("set", {}).get("name") == "committed_ollama_rate4":
                obj["set"]["elem"] = [{"elem": {"val": "198.51.100.7", "timeout": 60,
                                                "expires": 42}}]
    assert drift_of(host, policy, rate_entries).level == "ok"


def test_ranges_and_addresses_compare_as_networks():
    compiled = [{"set": {"name": "s", "type": "ipv4_addr", "flags": ["interval"],
                         "elem": [{"prefix": {"addr": "192.0.2.0", "len": 25}},
                                  {"prefix": {"addr": "192.0.2.128", "len": 25}}]}}]
    listed = [{"set": {"name": "s", "type": "ipv4_addr", "flags": ["interval"],
                       "elem": [{"range": ["192.0.2.0", "192.0.2.255"]}]}}]
    # One /24 as a range is not the same two elements: that is a real difference.
    assert tableshape.compare_shapes(tableshape.table_shape(compiled), tableshape.table_shape(listed))
    listed[0]["set"]["elem"] = ["192.0.2.0/25", {"prefix": {"addr": "192.0.2.128", "len": 25}}]
    assert tableshape.compare_shapes(tableshape.table_shape(compiled), tableshape.table_shape(listed)) == []


def test_addresses_spelled_differently_by_the_kernel_are_the_same_element():
    compiled = [{"set": {"name": "s", "type": "ipv6_addr", "flags": ["interval"],
                         "elem": ["::c000:201", {"prefix": {"addr": "2001:db8::", "len": 32}}]}}]
    listed = [{"set": {"name": "s", "type": "ipv6_addr", "flags": ["interval"],
                       "elem": ["::192.0.2.1", {"prefix": {"addr": "2001:db8::", "len": 32}}]}}]
    assert tableshape.compare_shapes(tableshape.table_shape(compiled), tableshape.table_shape(listed)) == []
    listed[0]["set"]["elem"][0] = "::192.0.2.2"
    difference, = tableshape.compare_shapes(tableshape.table_shape(compiled),
                                        tableshape.table_shape(listed))
    assert "1 element(s) not in the policy (::c000:202/128)" in difference


# --- nftables.service and the daemon --------------------------------------

def test_an_enabled_nftables_service_is_found_by_its_wants_symlink(tmp_path):
    systemd = tmp_path / "systemd"
    env = hostenv.HostEnvironment(tmp_path / "s", tmp_path / "r", nft_factory=None,
                                 systemd_dir=systemd)
    systemd.mkdir()
    assert doctor_host.check_nftables_service(env)[0].level == "ok"
    (systemd / "sysinit.target.wants").mkdir()
    (systemd / "sysinit.target.wants" / "nftables.service").symlink_to(
        "/lib/systemd/system/nftables.service")
    finding, = doctor_host.check_nftables_service(env)
    assert finding.level == "warn" and "sysinit.target.wants" in finding.message
    assert "After=nftables.service" in finding.fix


def test_the_daemon_check_connects_to_the_control_socket(tmp_path):
    run_dir = tmp_path / "run"
    env = hostenv.HostEnvironment(tmp_path / "s", run_dir, nft_factory=None)
    assert env.control_socket_state() == "missing"
    assert "not running" in doctor_host.check_daemon(env)[0].message
    run_dir.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(run_dir / "control.sock"))
    try:
        assert env.control_socket_state() == "stale"  # bound, never listening
        server.listen(1)
        assert env.control_socket_state() == "listening"
        assert doctor_host.check_daemon(env)[0].level == "ok"
    finally:
        server.close()
    assert doctor_host.check_daemon(env)[0].level == "warn"


def test_socket_owners_map_inodes_to_processes_through_proc(tmp_path):
    proc = tmp_path / "proc"
    for pid, name, links in ((4242, "ollama", ["socket:[501]", "/dev/null"]),
                             (77, "nginx", ["socket:[900]"])):
        (proc / str(pid) / "fd").mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(name + "\n")
        for fd, target in enumerate(links):
            os.symlink(target, proc / str(pid) / "fd" / str(fd))
    (proc / "self").mkdir()
    env = hostenv.HostEnvironment(tmp_path / "s", tmp_path / "r", nft_factory=None,
                                 proc_dir=proc)
    assert env.socket_owners({501, 600}) == {501: [(4242, "ollama")]}


# --- the CLI -----------------------------------------------------------------

def test_a_bad_policy_exits_2(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("version: 1\nservices: {a: {ports: [0], allow: any}}\n")
    result = CliRunner().invoke(main, ["--state-dir", str(tmp_path / "s"), "--run-dir",
                                       str(tmp_path / "r"), "doctor", str(bad)])
    assert result.exit_code == 2
    assert "services.a.ports" in result.output


# --- set-ups the README recommends are healthy --------------------------------

PROXY_TEXT = """\
version: 1
services:
  ollama:
    ports: [11434]
    allow: [127.0.0.0/8, "::1"]
  proxy:
    ports: [8080, 8443]
    allow: [any]
"""


def test_a_wildcard_listener_on_an_allow_any_port_is_ok(tmp_path):
    proxy = load(PROXY_TEXT)
    host = FakeHost(tmp_path, proxy)
    host.listening = [Listener(ip("0.0.0.0"), 8080, 0, 601), Listener(ip("::"), 8443, 0, 602),
                      Listener(ip("127.0.0.1"), 11434, 0, 501)]
    host.owners = {601: [(10, "nginx")], 602: [(10, "nginx")], 501: [(11, "ollama")]}
    findings = doctor_host.check_listeners(proxy, host, proxy.table, True)
    assert [f.level for f in findings] == ["ok", "ok", "ok"]
    assert "allows any source" in findings[1].message


def test_a_wildcard_listener_on_an_allowlisted_port_without_the_table_is_a_warning(tmp_path):
    proxy = load(PROXY_TEXT)
    host = FakeHost(tmp_path, proxy)
    host.listening = [Listener(ip("0.0.0.0"), 11434, 0, 501)]
    findings = doctor_host.check_listeners(proxy, host, proxy.table, False)
    assert [f.level for f in findings if "11434" in f.message] == ["warn"]


def test_a_held_back_first_policy_fails_and_says_why(tmp_path, policy):
    host = FakeHost(tmp_path, policy)  # nothing committed
    host.store.hold_back("/etc/policyd/policy.yaml", "refusing: 192.0.2.7 on tcp port 11434 "
                         "(an established connection) would be cut", NOW)
    finding, = by_check(doctor.diagnose(policy, host), "committed")
    assert finding.level == "fail"
    assert "NOT ENFORCED" in finding.message and "192.0.2.7" in finding.message


def test_logs_the_running_daemon_cannot_follow_fail(host, policy):
    host.status_answer = {"logs": [
        {"path": "/var/log/a.log", "error": None},
        {"path": "/var/log/b.log", "error": "filter 'gone' does not load: unknown filter"}]}
    findings = [f for f in doctor.diagnose(policy, host) if f.level != "ok"]
    assert [(f.check, f.level) for f in findings] == [("log", "fail")]
    assert "/var/log/b.log" in findings[0].message


def test_without_the_default_policy_file_the_committed_policy_is_diagnosed(host, policy,
                                                                          tmp_path):
    missing = str(tmp_path / "policy.yaml")
    diagnosed, about = doctor.policy_or_committed(missing, host.store, explicit=False)
    assert diagnosed.digest == policy.digest
    assert [(f.level, f.check) for f in about] == [("ok", "policy-file")]
    with pytest.raises(InputError):
        doctor.policy_or_committed(missing, host.store, explicit=True)
    with pytest.raises(InputError):
        doctor.policy_or_committed(missing, PolicyStore(tmp_path / "empty"), explicit=False)


def test_doctor_with_a_missing_named_policy_exits_2(tmp_path):
    result = CliRunner(mix_stderr=False).invoke(main, [
        "--state-dir", str(tmp_path), "doctor", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2


# --- the installed unit's sandbox and the fleet's Redis -----------------------

SHIPPED_UNIT = Path(__file__).resolve().parents[1] / "debian" / "policyd.service"
FLEET_POLICY = """version: 1
services:
  ollama: {ports: [11434], allow: [192.0.2.0/24]}
fleet:
  redis: redis://gpu1@10.0.0.5:6379/0
"""


@pytest.fixture
def unit_dirs(tmp_path):
    """systemd's search path in miniature, the shipped unit installed in lib/."""
    dirs = [tmp_path / name for name in ("etc", "run", "lib")]
    for directory in dirs:
        directory.mkdir()
    (dirs[2] / "policyd.service").write_text(SHIPPED_UNIT.read_text())
    return dirs


def dropin(directory, name, text):
    folder = directory / "policyd.service.d"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"[Service]\n{text}\n")


def sandbox_findings(tmp_path, unit_dirs, policy_text=FLEET_POLICY):
    env = hostenv.HostEnvironment(tmp_path / "s", tmp_path / "r", nft_factory=None,
                                  unit_dirs=[str(d) for d in unit_dirs])
    return doctor_host.check_fleet_sandbox(policy_mod.loads(policy_text), env)


def test_the_shipped_unit_keeps_the_daemon_from_a_remote_redis(tmp_path, unit_dirs):
    [finding] = sandbox_findings(tmp_path, unit_dirs)
    assert finding.level == "fail"
    assert "may not reach Redis at 10.0.0.5" in finding.message
    assert str(unit_dirs[2] / "policyd.service") in finding.message
    assert "IPAddressAllow=10.0.0.5" in finding.fix and "systemctl edit policyd" in finding.fix


def test_the_readme_drop_in_lets_it_through(tmp_path, unit_dirs):
    dropin(unit_dirs[0], "override.conf", "IPAddressAllow=10.0.0.5")
    [finding] = sandbox_findings(tmp_path, unit_dirs)
    assert finding.level == "ok" and "override.conf" in finding.message


def test_drop_ins_merge_as_systemd_merges_them(tmp_path, unit_dirs):
    # an empty assignment resets the list: nothing is denied any more
    dropin(unit_dirs[0], "open.conf", "IPAddressDeny=")
    assert sandbox_findings(tmp_path, unit_dirs)[0].level == "ok"
    # a later drop-in (by name) denies again; a network (not just the address) allows
    dropin(unit_dirs[0], "zz-close.conf", "IPAddressDeny=any")
    assert sandbox_findings(tmp_path, unit_dirs)[0].level == "fail"
    dropin(unit_dirs[1], "zzz-allow.conf", "IPAddressAllow=10.0.0.0/24 localhost")
    assert sandbox_findings(tmp_path, unit_dirs)[0].level == "ok"
    # the same drop-in name higher up the search path hides the lower one
    dropin(unit_dirs[0], "zzz-allow.conf", "IPAddressAllow=192.0.2.1")
    assert sandbox_findings(tmp_path, unit_dirs)[0].level == "fail"
    # an allow in another section, or an entry systemd cannot parse, allows nothing
    (unit_dirs[0] / "policyd.service.d" / "zzzz.conf").write_text(
        "[Unit]\nIPAddressAllow=10.0.0.5\n[Service]\nIPAddressAllow=10.0.0.5/99 banana\n")
    assert sandbox_findings(tmp_path, unit_dirs)[0].level == "fail"


def test_a_unit_in_etc_replaces_the_packaged_one(tmp_path, unit_dirs):
    (unit_dirs[0] / "policyd.service").write_text("[Service]\nExecStart=/usr/bin/policyd run\n")
    dropin(unit_dirs[2], "deny.conf", "IPAddressDeny=10.0.0.0/8")
    [finding] = sandbox_findings(tmp_path, unit_dirs)
    assert finding.level == "fail" and "deny.conf" in finding.message


def test_no_unit_or_no_fleet_says_nothing(tmp_path, unit_dirs):
    no_fleet = FLEET_POLICY.split("fleet:")[0]
    assert sandbox_findings(tmp_path, unit_dirs, no_fleet) == []
    (unit_dirs[2] / "policyd.service").unlink()
    assert sandbox_findings(tmp_path, unit_dirs) == []
