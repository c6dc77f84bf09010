"""The part of the daemon that keeps the kernel converged (chores.PolicyUpkeep), on
the fake nftables: tables edited or gone are put back, a trial's deadline is
kept, a newer committed policy is reported; nothing is done when all is well."""
import pytest

from policyd.kernel import trial
from policyd.daemon.chores import PolicyUpkeep
from policyd.policy.store import PolicyStore

BASE = "version: 1\nservices:\n  base:\n    ports: [11434]\n    allow: [192.0.2.0/24]\n"
OTHER = "version: 1\nservices:\n  other:\n    ports: [22]\n    allow: [198.51.100.0/24]\n"


@pytest.fixture
def world(tmp_path, clock, nft):
    kernel, store = nft, PolicyStore(tmp_path / "state")
    paths = {}
    for name, text in (("base", BASE), ("other", OTHER)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    policy = trial.apply(kernel, store, paths["base"], peers=lambda _p: [], now=clock.now)
    return kernel, store, paths, policy, PolicyUpkeep(store, clock=clock)


def test_nothing_to_do_when_the_kernel_holds_the_committed_policy(world):
    kernel, _store, _paths, policy, upkeep = world
    loads = len(kernel.loads)
    found = upkeep.check(kernel, policy)
    assert found == {"rolled_back": False, "trial_active": False}
    assert len(kernel.loads) == loads


def test_an_edited_or_deleted_table_is_put_back(world):
    kernel, _store, _paths, policy, upkeep = world
    kernel.model.tables["policyd"].chains["committed_svc_base"].rules.pop()  # `nft delete rule`
    found = upkeep.check(kernel, policy)
    assert "restored_ms" in found
    assert kernel.model.skeleton("policyd") == upkeep._expected["policyd"]
    del kernel.model.tables["policyd"]  # `nft flush ruleset`, the guard half
    assert "restored_ms" in upkeep.check(kernel, policy)
    assert kernel.active_services() == ["base"]


def test_a_trial_is_kept_until_its_deadline_then_ended(world, clock):
    kernel, store, paths, policy, upkeep = world
    trial.start_trial(kernel, store, paths["other"], 30, peers=lambda _p: [], now=clock.now)
    found = upkeep.check(kernel, policy)
    assert found["trial_active"] and "restored_ms" not in found, "the candidate is no drift"
    assert kernel.active_services() == ["other"]
    clock.advance(31)
    found = upkeep.check(kernel, policy)
    assert found["rolled_back"] and not found["trial_active"]
    assert kernel.active_services() == ["base"]


def test_a_policy_committed_by_the_cli_is_reported(world, clock):
    kernel, store, paths, policy, upkeep = world
    newer = trial.apply(kernel, store, paths["other"], peers=lambda _p: [], now=clock.now)
    found = upkeep.check(kernel, policy)
    assert found["committed"].digest == newer.digest and "restored_ms" not in found


def test_the_worker_collects_nothing_during_a_job_and_freezes_what_a_big_one_leaves():
    """A cyclic collection holds the GIL while it walks every young object: none
    runs while a job does, and the survivors of a big job are frozen, not walked
    later on the ban path. Collection is on again after it."""
    import gc
    import threading
    from policyd.daemon.chores import FREEZE_AFTER_OBJECTS, Chores
    done = threading.Event()
    seen = {}

    def job(_nft):
        seen["enabled"] = gc.isenabled()
        return [[i] for i in range(2 * FREEZE_AFTER_OBJECTS)]

    before = gc.get_freeze_count()
    chores = Chores(lambda: None, wake=done.set)
    chores.start()
    try:
        chores.submit("big", job, lambda result, error: seen.update(result=result, error=error))
        assert done.wait(10)
        chores.collect()
    finally:
        chores.stop()
    assert seen["enabled"] is False and seen["error"] is None
    assert len(seen["result"]) == 2 * FREEZE_AFTER_OBJECTS
    assert gc.isenabled()
    assert gc.get_freeze_count() >= before + 2 * FREEZE_AFTER_OBJECTS
    gc.unfreeze()


def test_flushed_tables_come_back_with_their_bans_in_the_same_transaction(world, clock):
    """After `nft flush ruleset` the ban table must never be back without its bans:
    a banned source would get through between the policy's load and a later one
    of the bans. The bans in force ride in the load that puts the tables back."""
    kernel, _store, _paths, policy, upkeep = world
    ban = (4, 0xC6336401, 32)  # 198.51.100.1
    expires = {ban: clock.now + 600, (4, 0xC6336402, 32): clock.now - 1}  # the second has ended
    kernel.model.tables.clear()
    found = upkeep.check(kernel, policy, bans_in_force=lambda: [
        (key, int(ends - clock.now)) for key, ends in expires.items() if ends > clock.now])
    assert "restored_ms" in found
    assert kernel.ban_loads == [(len(kernel.loads) - 1, policy.bans_table,
                                 policy.bans.ipv6_prefix, [(ban, 600)])]


def test_tables_put_back_before_any_ban_book_exists_load_only_the_policy(world):
    kernel, _store, _paths, policy, upkeep = world
    kernel.model.tables.clear()
    assert "restored_ms" in upkeep.check(kernel, policy)
    assert kernel.ban_loads == []
