"""policyd.trialstate: status without a daemon reads the trial without the compiler,
and says exactly what policyd.trial.status says (the daemon's answer)."""
import subprocess
import sys

from policyd import compile as compile_mod
from policyd import trial, trialstate
from test_trial import committed, files, kernel, start, store  # noqa: F401 (fixtures)


def _same(store, clock, nft=None):  # noqa: F811
    report = trialstate.status(store, now=clock.now, nft=nft)
    assert report == trial.status(store, now=clock.now, nft=nft)
    return report


def test_the_trial_set_is_the_compilers():
    assert trialstate.TRIAL_SET == compile_mod.TRIAL_SET


def test_status_says_what_the_trial_module_says_in_every_state(
        kernel, store, files, clock, committed):  # noqa: F811
    assert _same(store, clock)["trial"] is None
    pending = start(kernel, store, files["cand"], clock, seconds=30)
    clock.advance(12)
    report = _same(store, clock, nft=kernel)
    assert report["trial"]["candidate_sha256"] == pending.sha256
    assert report["trial"]["kernel_seconds_left"] == 18
    clock.advance(30)
    assert _same(store, clock)["ended_trial"]["candidate_sha256"] == pending.sha256


def test_nothing_committed_is_said_alike(store, clock):  # noqa: F811
    assert _same(store, clock) == {"committed": None, "trial": None, "ended_trial": None,
                                   "held_back": None}


def test_status_without_a_daemon_imports_neither_yaml_nor_the_compiler(tmp_path):
    code = ("import sys, types; from policyd import statusview; "
            f"obj = types.SimpleNamespace(state_dir={str(tmp_path)!r}, nft_or_none=lambda: None); "
            "print(statusview.to_text(statusview.without_daemon(obj))); "
            "print(sorted(m for m in ('yaml', 'policyd.compile', 'policyd.policy', "
            "'policyd.trial') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]"
    assert "policy:    nothing committed" in out.stdout
