"""The committed policy and the trial as `policyd status` reports them, read from
the state dir without the policy compiler or yaml (a trial's policy is parsed
only to ask the kernel's timer of a trial still running).

policyd.kernel.trial.status says the same (a test holds them together); without a
daemon `status` imports this module only: the compiler and yaml alone cost
most of its 0.2 s.
"""
import math
import time

from policyd.errors import KernelError

# policyd.rules.compile.TRIAL_SET, without importing the compiler for a constant
# (tests/test_trialstate.py holds them together).
TRIAL_SET = "trial"


def _commit_record(meta):
    """The committed policy's record with each field as policyd writes it, or None
    in its place (a record changed by hand)."""
    when = meta.get("committed_at")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        when = None
    return {"sha256": meta.get("sha256") if isinstance(meta.get("sha256"), str) else None,
            "source": meta.get("source") if isinstance(meta.get("source"), str) else None,
            "committed_at": when}


def status(store, now=None, nft=None):
    """The committed policy and the trial, for `policyd status`.

    {"committed": {"sha256", "source", "committed_at"} | None,
     "trial": {"candidate_sha256", "source", "started_at", "deadline", "seconds",
               "seconds_left", "previous_sha256", ["kernel_seconds_left"]} | None,
     "ended_trial": {"candidate_sha256", "source", "deadline"} | None,
     "held_back": {"source", "reason", "at"} | None}
    `kernel_seconds_left` (only when `nft` is given) is what the kernel's timer says.
    A trial past its deadline is `ended_trial`, never `trial`: the kernel has
    already gone back to the committed policy.
    """
    now = time.time() if now is None else now
    meta = store.meta()
    committed = None if meta is None else _commit_record(meta)
    pending = store.pending()
    trial = ended = None
    if pending is not None and now >= pending.deadline:
        # The kernel ended it at the deadline; only the record waits for a daemon
        # (or `policyd rollback`) to clear it. It is not pending any more.
        ended = {"candidate_sha256": pending.sha256, "source": pending.source,
                 "deadline": pending.deadline}
    elif pending is not None:
        trial = {"candidate_sha256": pending.sha256, "source": pending.source,
                 "started_at": pending.started_at, "deadline": pending.deadline,
                 "seconds": pending.seconds,
                 "seconds_left": max(0.0, round(pending.deadline - now, 1)),
                 "previous_sha256": pending.previous_sha256}
        if nft is not None:
            trial["kernel_seconds_left"] = _kernel_seconds_left(nft, pending)
    return {"committed": committed, "trial": trial, "ended_trial": ended,
            "held_back": store.held_back()}


def _kernel_seconds_left(nft, pending):
    try:
        elements = nft.set_elements(pending.policy().table, TRIAL_SET)
    except KernelError:
        return 0
    return max((expires or 0 for _value, _timeout, expires in elements), default=0)
