"""The trial state machine against a fake kernel and a fake clock: apply, confirm,
rollback, the daemon's second guard, boot restore, damaged records and the
anti-lockout lint."""
import base64
import hashlib
import ipaddress
import json
import logging

import pytest

from fakes import FakeNft
from policyd.kernel import lockout, trial
from policyd.policy import store as policystore
from policyd.errors import InputError, KernelError
from policyd.kernel.lockout import Peer
from policyd.policy.store import PolicyStore

ip = ipaddress.ip_address

BASE = """\
version: 1
services:
  base:
    ports: [11434]
    allow: [192.0.2.0/24]
"""
CANDIDATE = """\
version: 1
services:
  cand:
    ports: [11434, 22]
    allow: [198.51.100.0/24]
"""
OTHER_TABLE = """\
version: 1
table: elsewhere
services:
  cand:
    ports: [11434]
    allow: [198.51.100.0/24]
"""


@pytest.fixture
def store(tmp_path):
    return PolicyStore(tmp_path / "state")


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in (("base", BASE), ("cand", CANDIDATE), ("other", OTHER_TABLE)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


def no_peers(policy):
    return []


def plain(nft, store, path, clock, **kwargs):
    return trial.apply(nft, store, path, peers=kwargs.pop("peers", no_peers),
                       now=clock.now, **kwargs)


def start(nft, store, path, clock, seconds=30, **kwargs):
    return trial.start_trial(nft, store, path, seconds,
                             peers=kwargs.pop("peers", no_peers), now=clock.now, **kwargs)


@pytest.fixture
def committed(nft, store, files, clock):
    """A store and kernel where BASE was applied and committed."""
    plain(nft, store, files["base"], clock)
    return files["base"].read_bytes()


def test_trial_runs_candidate_and_leaves_the_committed_file_alone(
        nft, store, files, clock, committed):
    pending = start(nft, store, files["cand"], clock, seconds=30)
    assert nft.active_services() == ["cand"]
    assert (store.dir / policystore.COMMITTED).read_bytes() == committed
    assert store.pending() == pending
    assert pending.deadline == clock.now + 30 and pending.seconds == 30
    assert pending.data == files["cand"].read_bytes()
    assert pending.previous_sha256 == store.committed().digest


def test_pending_record_is_on_disk_before_the_kernel_sees_the_candidate(
        nft, store, files, clock, committed):
    seen = []
    nft.before_load = lambda document: seen.append(store.pending())
    start(nft, store, files["cand"], clock)
    assert seen[0] is not None and seen[0].source == str(files["cand"])


def test_kernel_running_out_of_time_brings_committed_back(nft, store, files, clock,
                                                           committed):
    start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(29)
    assert nft.active_services() == ["cand"]
    clock.advance(1)
    assert nft.active_services() == ["base"]


def test_confirm_in_time_commits_the_candidate(nft, store, files, clock, committed):
    start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(10)
    policy = trial.confirm(nft, store, now=clock.now)
    assert policy.services[0].name == "cand"
    assert store.pending() is None
    assert (store.dir / policystore.COMMITTED).read_bytes() == files["cand"].read_bytes()
    assert store.meta()["sha256"] == policy.digest
    assert nft.active_services() == ["cand"]
    assert "trial" not in nft.tables["policyd"].sets
    clock.advance(3600)  # no timer is left that could undo it
    assert nft.active_services() == ["cand"]


def test_confirm_deletes_the_trial_element_in_the_same_transaction(
        nft, store, files, clock, committed):
    start(nft, store, files["cand"], clock)
    trial.confirm(nft, store, now=clock.now)
    commands = nft.loads[-1]["nftables"]
    assert commands[1] == {"delete": {"element": {
        "family": "inet", "table": "policyd", "name": "trial", "elem": ["tcp"]}}}
    assert commands[2] == {"add": {"table": {"family": "inet", "name": "policyd"}}}


def test_confirm_after_the_kernel_expired_the_trial_is_too_late(
        nft, store, files, clock, committed):
    start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(31)
    with pytest.raises(trial.TooLate, match="too late"):
        # The daemon's clock may lag the kernel's: ask with a time inside the deadline.
        trial.confirm(nft, store, now=clock.now - 5)
    assert (store.dir / policystore.COMMITTED).read_bytes() == committed
    assert store.pending() is None
    assert nft.active_services() == ["base"]
    assert not any(c.startswith("candidate") for c in nft.tables["policyd"].chains)


def test_confirm_racing_the_timer_fails_whole_and_changes_nothing(
        nft, store, files, clock, committed):
    """The element expires between listing it and deleting it: the transaction fails."""
    start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(29)
    original, listings = nft.set_elements, []

    def list_then_expire(table, name):
        listings.append(original(table, name))
        if len(listings) == 1:
            clock.advance(2)
        return listings[-1]

    nft.set_elements = list_then_expire
    with pytest.raises(trial.TooLate):
        trial.confirm(nft, store, now=clock.now)
    assert (store.dir / policystore.COMMITTED).read_bytes() == committed
    assert nft.active_services() == ["base"]


def test_confirm_after_the_wall_clock_deadline_fails_even_if_the_kernel_kept_it(
        store, files, clock):
    nft = FakeNft(clock, timers=False)
    plain(nft, store, files["base"], clock)
    start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(30)
    with pytest.raises(trial.TooLate):
        trial.confirm(nft, store, now=clock.now)
    assert nft.active_services() == ["base"]
    assert store.committed().services[0].name == "base"


def test_confirm_without_a_trial(nft, store, clock, committed):
    with pytest.raises(trial.NoTrial):
        trial.confirm(nft, store, now=clock.now)


def test_confirm_keeps_the_trial_when_the_kernel_refuses_for_another_reason(
        nft, store, files, clock, committed):
    start(nft, store, files["cand"], clock, seconds=30)
    nft.refuse = "Operation not permitted"
    with pytest.raises(KernelError):
        trial.confirm(nft, store, now=clock.now)
    assert store.pending() is not None
    assert nft.active_services() == ["cand"]
    assert trial.confirm(nft, store, now=clock.now).services[0].name == "cand"


def test_second_trial_and_plain_apply_are_refused_while_one_runs(
        nft, store, files, clock, committed):
    start(nft, store, files["cand"], clock, seconds=30)
    loads = len(nft.loads)
    with pytest.raises(trial.TrialRunning, match="confirm.*rollback"):
        start(nft, store, files["base"], clock)
    with pytest.raises(trial.TrialRunning):
        plain(nft, store, files["base"], clock)
    assert len(nft.loads) == loads
    assert store.pending().source == str(files["cand"])


def test_a_trial_past_its_deadline_does_not_block_the_next_apply(
        nft, store, files, clock, committed):
    start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(31)
    start(nft, store, files["cand"], clock, seconds=30)
    assert nft.active_services() == ["cand"]
    clock.advance(31)
    plain(nft, store, files["cand"], clock)
    assert store.pending() is None
    assert store.committed().services[0].name == "cand"


def test_rollback_restores_committed_now(nft, store, files, clock, committed):
    start(nft, store, files["cand"], clock, seconds=30)
    ended = trial.rollback(nft, store)
    assert ended.source == str(files["cand"])
    assert nft.active_services() == ["base"]
    assert store.pending() is None
    assert (store.dir / policystore.COMMITTED).read_bytes() == committed


def test_rollback_without_a_record_still_reloads_committed(nft, store, files, clock,
                                                            committed):
    start(nft, store, files["cand"], clock, seconds=30)
    (store.dir / policystore.PENDING).write_text("{")
    assert trial.rollback(nft, store) is None
    assert nft.active_services() == ["base"]


def test_rollback_with_nothing_at_all(nft, store):
    with pytest.raises(trial.NoTrial):
        trial.rollback(nft, store)


def test_first_ever_trial_falls_back_to_guarding_nothing(nft, store, files, clock):
    start(nft, store, files["cand"], clock, seconds=30)
    assert nft.active_services() == ["cand"]
    assert store.pending().previous_sha256 is None
    clock.advance(30)
    assert nft.active_services() == []
    trial.rollback(nft, store)
    assert nft.active_services() == []
    assert store.committed() is None


def test_failed_trial_load_leaves_no_record(nft, store, files, clock, committed):
    nft.refuse = "set ban4 has the wrong type"
    with pytest.raises(KernelError):
        start(nft, store, files["cand"], clock)
    assert store.pending() is None
    assert nft.active_services() == ["base"]


def test_trial_cannot_move_the_table(nft, store, files, clock, committed):
    with pytest.raises(InputError, match="table"):
        start(nft, store, files["other"], clock)
    assert store.pending() is None


def test_confirm_timeout_must_be_positive(nft, store, files, clock):
    with pytest.raises(InputError, match="--confirm-timeout"):
        start(nft, store, files["cand"], clock, seconds=0)


def test_enforce_is_the_rollback_on_kernels_without_timers(store, files, clock):
    nft = FakeNft(clock, timers=False)
    plain(nft, store, files["base"], clock)
    start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(29)
    assert trial.enforce(nft, store, now=clock.now) is False
    assert nft.active_services() == ["cand"]
    clock.advance(1)
    assert trial.enforce(nft, store, now=clock.now) is True
    assert nft.active_services() == ["base"]
    assert store.pending() is None
    assert trial.enforce(nft, store, now=clock.now) is False


def test_restore_committed_is_a_rollback(nft, store, files, clock, committed):
    start(nft, store, files["cand"], clock, seconds=30)
    nft.tables.clear()  # a reboot: the kernel starts empty
    policy = trial.restore_committed(nft, store)
    assert policy.services[0].name == "base"
    assert nft.active_services() == ["base"]
    assert store.pending() is None


def test_restore_with_nothing_committed_guards_nothing(nft, store, files, clock):
    start(nft, store, files["cand"], clock, seconds=30)
    assert trial.restore_committed(nft, store) is None
    assert nft.active_services() == []
    assert trial.restore_committed(nft, store) is None


@pytest.mark.parametrize("damage", [
    lambda raw: raw[: len(raw) // 2],                          # truncated mid-write
    lambda raw: b"",                                           # empty
    lambda raw: b"\x00\xff" * 40,                              # garbage
    lambda raw: b"[1, 2]",                                     # JSON, wrong shape
    lambda raw: raw.replace(b'"version": 1', b'"version": 7'),
    lambda raw: raw.replace(b'"deadline"', b'"dead"'),         # a field missing
    lambda raw: raw.replace(b'"seconds": 30', b'"seconds": "x"'),
    lambda raw: raw.replace(b'"policy": "', b'"policy": "!!'),  # not base64
    lambda raw: _replace_json(raw, sha256="0" * 64),           # bytes do not match
    lambda raw: _replace_json(raw, policy=base64.b64encode(b"version: 1\n").decode(),
                              sha256=hashlib.sha256(b"version: 1\n").hexdigest()),
], ids=["truncated", "empty", "garbage", "list", "version", "missing", "type", "base64",
        "digest", "policy"])
def test_damaged_pending_record_is_no_trial(nft, store, files, clock, committed, damage,
                                            caplog):
    start(nft, store, files["cand"], clock, seconds=30)
    path = store.dir / policystore.PENDING
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="policyd.policy.store"):
        assert store.pending() is None
    assert "treating it as no trial" in caplog.text
    assert trial.status(store, now=clock.now)["trial"] is None
    with pytest.raises(trial.NoTrial):
        trial.confirm(nft, store, now=clock.now)
    assert trial.enforce(nft, store, now=clock.now + 60) is False
    # The kernel's timer is untouched by all this and still ends the candidate.
    assert nft.active_services() == ["cand"]
    clock.advance(30)
    assert nft.active_services() == ["base"]
    assert trial.restore_committed(nft, store).services[0].name == "base"
    assert not path.exists()


def _replace_json(raw, **fields):
    record = json.loads(raw)
    record.update(fields)
    return json.dumps(record).encode()


def test_bans_survive_apply_trial_confirm_and_rollback(nft, store, files, clock,
                                                        committed):
    nft.load({"nftables": [{"add": {"element": {
        "family": "inet", "table": "policyd_bans", "name": "ban4",
        "elem": [{"elem": {"val": "203.0.113.9", "timeout": 3600}}]}}}]})
    start(nft, store, files["cand"], clock)
    trial.confirm(nft, store, now=clock.now)
    start(nft, store, files["base"], clock)
    trial.rollback(nft, store)
    plain(nft, store, files["base"], clock)
    assert [value for value, _t, _left in nft.set_elements("policyd_bans", "ban4")] == [
        "203.0.113.9"]


def test_status_reports_committed_and_trial(nft, store, files, clock, committed):
    assert trial.status(store, now=clock.now)["trial"] is None
    pending = start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(12)
    report = trial.status(store, now=clock.now, nft=nft)
    assert report["committed"]["sha256"] == store.committed().digest
    assert report["committed"]["committed_at"] == pending.started_at
    assert report["trial"]["candidate_sha256"] == pending.sha256
    assert report["trial"]["seconds_left"] == 18
    assert report["trial"]["kernel_seconds_left"] == 18
    json.dumps(report)


def test_status_reports_a_trial_past_its_deadline_as_ended_not_pending(
        nft, store, files, clock, committed):
    # No daemon has cleared the record yet; the kernel has already rolled back.
    pending = start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(31)
    assert nft.active_services() == ["base"]
    report = trial.status(store, now=clock.now, nft=nft)
    assert report["trial"] is None
    assert report["ended_trial"] == {"candidate_sha256": pending.sha256,
                                     "source": pending.source, "deadline": pending.deadline}
    json.dumps(report)


def test_plain_apply_stores_a_relative_path_as_absolute(nft, store, files, clock,
                                                        monkeypatch):
    monkeypatch.chdir(files["cand"].parent)
    plain(nft, store, files["cand"].name, clock)
    assert store.meta()["source"] == str(files["cand"])
    assert store.committed().source == str(store.dir / policystore.COMMITTED)


def test_confirm_and_rollback_without_a_trial_both_say_no_and_create_nothing(nft, tmp_path):
    store = PolicyStore(tmp_path / "never-made")
    for step in (trial.confirm, trial.rollback):
        with pytest.raises(trial.NoTrial):
            step(nft, store)
    assert not (tmp_path / "never-made").exists()
    assert nft.loads == []


def test_rollback_with_a_committed_policy_but_no_trial_says_no(nft, store, files, clock,
                                                               committed):
    loads = len(nft.loads)
    with pytest.raises(trial.NoTrial, match="no trial"):
        trial.rollback(nft, store)
    assert len(nft.loads) == loads


# --- the anti-lockout lint ---------------------------------------------------

def test_ssh_peer_from_environment():
    peer = lockout.ssh_peer({"SSH_CONNECTION": "198.51.100.7 51234 192.0.2.1 22"})
    assert peer.address == ip("198.51.100.7") and peer.port == 22
    assert lockout.ssh_peer({"SSH_CONNECTION": "::ffff:192.0.2.9 5 2001:db8::1 2222"}).address \
        == ip("192.0.2.9")
    assert lockout.ssh_peer({"SSH_CONNECTION": "2001:db8::9 5 2001:db8::1 22"}).address \
        == ip("2001:db8::9")
    for bad in ("", "198.51.100.7 51234 192.0.2.1", "nonsense 1 2 3", "1.2.3.4 1 5.6.7.8 x"):
        assert lockout.ssh_peer({"SSH_CONNECTION": bad}) is None
    assert lockout.ssh_peer({}) is None


def test_lint_refuses_a_policy_that_cuts_the_ssh_client(nft, store, files, clock,
                                                         committed):
    def peers(policy):
        return [Peer(ip("192.0.2.50"), 22, "tcp", "your SSH session")]
    with pytest.raises(lockout.LockoutRisk) as refused:
        start(nft, store, files["cand"], clock, peers=peers)
    message = str(refused.value)
    assert "192.0.2.50" in message and "port 22" in message
    assert "services.cand.action: drop" in message and "--force" in message
    assert "\n" not in message
    assert store.pending() is None and nft.active_services() == ["base"]
    with pytest.raises(lockout.LockoutRisk):
        plain(nft, store, files["cand"], clock, peers=peers)
    start(nft, store, files["cand"], clock, peers=peers, force=True)
    assert nft.active_services() == ["cand"]


def test_lint_passes_allowed_and_unguarded_peers():
    from policyd.policy import reader as policy_mod
    candidate = policy_mod.loads(CANDIDATE)
    peers = [Peer(ip("198.51.100.7"), 22, "tcp", "ssh"),        # allowed by address
             Peer(ip("192.0.2.50"), 8080, "tcp", "ssh"),        # port not guarded
             Peer(ip("192.0.2.50"), 11434, "udp", "ssh")]       # other protocol
    assert lockout.lockout_cuts(candidate, peers) == []
    cut = Peer(ip("2001:db8::5"), 11434, "tcp", "an established connection")
    [(peer, decision)] = lockout.lockout_cuts(candidate, peers + [cut, cut])
    assert peer == cut and decision.verdict == "drop"


def test_lint_asks_for_the_interface_only_when_an_iface_rule_could_allow():
    from policyd.policy import reader as policy_mod
    candidate = policy_mod.loads(
        "version: 1\nservices:\n  ssh: {ports: [22], allow: [{iface: tailscale0}]}\n")
    peer = Peer(ip("100.64.0.9"), 22, "tcp", "ssh")
    asked = []

    def iface_of(address):
        asked.append(address)
        return "tailscale0" if address == ip("100.64.0.9") else "eth0"

    assert lockout.lockout_cuts(candidate, [peer], iface_of) == []
    other = Peer(ip("198.51.100.7"), 22, "tcp", "ssh")
    assert [p for p, _ in lockout.lockout_cuts(candidate, [other], iface_of)] == [other]
    assert asked == [ip("100.64.0.9"), ip("198.51.100.7")]


def test_lint_refusal_names_more_cuts(nft, store, files, clock, committed):
    def peers(policy):
        return [Peer(ip("192.0.2.50"), 22, "tcp", "a"), Peer(ip("192.0.2.51"), 11434, "tcp", "b")]
    with pytest.raises(lockout.LockoutRisk, match=r"and 1 more"):
        start(nft, store, files["cand"], clock, peers=peers)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "state" / "committed.yaml"
    policystore.atomic_write(path, b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(policystore.os, "replace", crash)
    with pytest.raises(OSError):
        policystore.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == ["committed.yaml"]


def test_operator_peers_are_the_ssh_client_and_established_peers(monkeypatch):
    from policyd.operator import netdiag
    from policyd.policy import reader as policy_mod
    asked = []

    def established(ports):
        asked.append(sorted(ports))
        return [netdiag.Connection(ip("192.0.2.1"), 11434, ip("192.0.2.77"), 40000)]

    monkeypatch.setattr(netdiag, "established_peers", established)
    candidate = policy_mod.loads(CANDIDATE + "  dns: {ports: [53], proto: udp, allow: any}\n")
    peers = lockout.operator_peers(candidate, {"SSH_CONNECTION": "198.51.100.7 5 192.0.2.1 22"})
    assert asked == [[22, 11434]]  # TCP ports only: sock_diag reads TCP here
    assert [(p.address, p.port) for p in peers] == [(ip("198.51.100.7"), 22),
                                                   (ip("192.0.2.77"), 11434)]


def test_lint_refuses_when_it_cannot_see_the_connections(monkeypatch, nft, store, files,
                                                         clock, committed):
    from policyd.operator import netdiag

    def broken(ports):
        raise OSError(95, "sock_diag: Operation not supported")

    monkeypatch.setattr(netdiag, "established_peers", broken)
    with pytest.raises(lockout.LockoutRisk, match="--force"):
        trial.start_trial(nft, store, files["cand"], 30, now=clock.now,
                          peers=lambda policy: lockout.operator_peers(policy, {}))
    assert store.pending() is None


def test_a_plain_apply_that_changes_the_table_removes_the_old_guard_table(
        nft, store, files, clock, committed):
    assert "policyd" in nft.tables
    plain(nft, store, files["other"], clock)
    assert "policyd" not in nft.tables
    assert "elsewhere" in nft.tables and "elsewhere_bans" in nft.tables
    # The old ban table stays until its bans are in the new one (the CLI or daemon
    # moves them, then retires it).
    assert "policyd_bans" in nft.tables
    trial.retire_table(nft, "policyd_bans")
    assert "policyd_bans" not in nft.tables


def test_the_lint_in_a_child_refuses_as_the_lint_does_and_loads_nothing_here(files):
    import sys
    policy = trial.policy_mod.load(files["base"])
    cut = [Peer(ip("198.51.100.7"), 11434, "tcp", "an established connection")]
    with pytest.raises(lockout.LockoutRisk, match="198.51.100.7 on tcp port 11434"):
        lockout.lint_in_child(policy, peers=lambda _p: cut, iface_of=lambda _a: None)
    lockout.lint_in_child(policy, peers=lambda _p: [], iface_of=lambda _a: None)

    def broken(_policy):
        raise RuntimeError("sock_diag said no")
    with pytest.raises(lockout.LockoutRisk, match="could not run"):
        lockout.lint_in_child(policy, peers=broken, iface_of=lambda _a: None)
    # The real peers, from this test's own namespace, in the child.
    before = set(sys.modules)
    lockout.lint_in_child(policy)
    assert "policyd.operator.netdiag" in before or "policyd.operator.netdiag" not in sys.modules


def test_a_re_apply_parses_the_policy_once(nft, store, files, clock, committed,
                                           monkeypatch):
    # The committed bytes are the candidate's: 100k entries in YAML cost a second
    # a parse, so the previous policy's tables come from the candidate itself.
    parses = []
    original = trial.policy_mod.loads
    monkeypatch.setattr(trial.policy_mod, "loads",
                        lambda *args: parses.append(args) or original(*args))
    applied, previous = trial.apply_tables(nft, store, files["base"], peers=no_peers,
                                           now=clock.now)
    assert len(parses) == 1
    assert previous == (applied.table, applied.bans_table) == ("policyd", "policyd_bans")


def test_apply_tables_names_the_tables_of_a_different_committed_policy(
        nft, store, files, clock, committed):
    applied, previous = trial.apply_tables(nft, store, files["other"], peers=no_peers,
                                           now=clock.now)
    assert applied.table == "elsewhere"
    assert previous == ("policyd", "policyd_bans")
    assert trial.apply_tables(nft, store, files["base"], peers=no_peers,
                              now=clock.now)[1] == ("elsewhere", "elsewhere_bans")


def test_a_first_apply_has_no_previous_tables(nft, store, files, clock):
    assert trial.apply_tables(nft, store, files["base"], peers=no_peers,
                              now=clock.now)[1] is None
