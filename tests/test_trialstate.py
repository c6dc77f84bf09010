"""policyd.kernel.trialstate: the trial as `status` reports it, read without the compiler
(policyd.kernel.trial re-exports it: the daemon answers with the same function)."""
import subprocess
import sys

from policyd.rules import compile as compile_mod
from policyd.kernel import trial, trialstate
from test_trial import committed, files, start, store  # noqa: F401 (fixtures)


def _status(store, clock, nft=None):  # noqa: F811
    return trialstate.status(store, now=clock.now, nft=nft)


def test_the_trial_module_answers_with_the_same_function():
    assert trial.status is trialstate.status


def test_the_trial_set_is_the_compilers():
    assert trialstate.TRIAL_SET == compile_mod.TRIAL_SET


def test_status_in_every_state_of_a_trial(nft, store, files, clock, committed):  # noqa: F811
    assert _status(store, clock)["trial"] is None
    pending = start(nft, store, files["cand"], clock, seconds=30)
    clock.advance(12)
    report = _status(store, clock, nft=nft)
    assert report["trial"]["candidate_sha256"] == pending.sha256
    assert report["trial"]["kernel_seconds_left"] == 18
    clock.advance(30)
    ended = _status(store, clock)
    assert ended["trial"] is None and ended["ended_trial"]["candidate_sha256"] == pending.sha256


def test_nothing_committed(store, clock):  # noqa: F811
    assert _status(store, clock) == {"committed": None, "trial": None, "ended_trial": None,
                                   "held_back": None}


def test_status_without_a_daemon_imports_neither_yaml_nor_the_compiler(tmp_path):
    code = ("import sys, types; from policyd.operator import statusview; "
            f"obj = types.SimpleNamespace(state_dir={str(tmp_path)!r}, nft_or_none=lambda: None); "
            "print(statusview.to_text(statusview.without_daemon(obj))); "
            "print(sorted(m for m in ('yaml', 'policyd.rules.compile', 'policyd.policy.reader', "
            "'policyd.kernel.trial') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]"
    assert "policy:    nothing committed" in out.stdout
