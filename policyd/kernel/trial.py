"""Loading policies into the kernel: plain applies, trials, confirm and rollback.

The trial state machine. The trial's deadline lives in the kernel (a timeout
element, see compile.py); the state dir (policystore) only ever holds a
committed policy that an operator confirmed, so a crash, a lost session or a
reboot can only fall back to it, never keep a candidate.
"""
import logging
import os
import time

from policyd.banning.bankeys import BanElements
from policyd.policy import reader as policy_mod
from policyd.policy import preflight
from policyd.rules.compile import TRIAL_SET, compile_policy, delete_table
from policyd.rules.model import Ruleset
from policyd.kernel.trialstate import status  # noqa: F401 (re-exported)
from policyd.errors import InputError, KernelError, Refused
from policyd.kernel.lockout import operator_peers, refuse_cuts, route_iface
from policyd.policy.store import Pending

log = logging.getLogger(__name__)


class TrialRefused(Refused):
    """A trial step ran and said no (exit code 1); nothing was changed."""


class TrialRunning(TrialRefused):
    pass


class NoTrial(TrialRefused):
    pass


class TooLate(TrialRefused):
    pass


def empty_policy(table):
    """A policy that guards nothing: what "committed" means before the first commit.

    Only for the trial's fallback slot; operators cannot write one (loads()
    requires a service), so nothing else should build it.
    """
    return policy_mod.Policy(table=table, services=(),
                             bans=policy_mod.BanSettings(ports=()),
                             source="<nothing committed>", digest="")


def _refuse_if_running(store, now):
    pending = store.pending()
    if pending is not None and now < pending.deadline:
        raise TrialRunning(
            f"a trial of {pending.source} is running until {format_time(pending.deadline)}; "
            "end it first with `policyd confirm` or `policyd rollback`")
    return pending


def _fallback(store, table):
    return store.committed() or empty_policy(table)


def read_candidate(path):
    """(bytes, Policy) of the file an operator applies, proven loadable by the daemon.

    The path is made absolute first: the state dir records where a policy came
    from, and "policy.yaml" means nothing to a later reader in another directory.
    """
    data, policy = policy_mod.read(os.path.abspath(path))
    preflight.check_log_sources(policy)
    return data, policy


def apply(nft, store, path, **options):
    """Load the policy at `path` in one transaction and make it the committed one.

    `lint(policy)` replaces the anti-lockout lint (the daemon runs it in a child)."""
    return apply_tables(nft, store, path, **options)[0]


def apply_tables(nft, store, path, *, force=False, peers=operator_peers,
                 iface_of=route_iface, now=None, lint=None):
    """apply(), returning (the Policy applied, (table, bans_table) of the policy it
    replaced or None): the CLI moves bans with them, without parsing it again."""
    now = time.time() if now is None else now
    data, policy = read_candidate(path)
    if lint is not None and not force:
        lint(policy)
    elif not force:
        refuse_cuts(policy, peers, iface_of)
    with store.locked():
        _refuse_if_running(store, now)
        previous = store.committed_tables(data, policy)
        ruleset = compile_policy(policy)
        if previous is not None and previous[0] != policy.table:
            # The old guard table goes in the same transaction: left loaded it
            # would go on dropping what the new policy allows. The old ban table
            # stays until its bans are in the new one (move_bans), so no ban
            # lapses meanwhile.
            delete_table(ruleset, previous[0])
        nft.load(ruleset.document())
        store.commit(data, policy, now)
        store.clear_pending()  # an expired trial's record, if one was left
    return policy, previous


def retire_table(nft, name):
    """Delete one of policyd's former tables (a policy moved to another `table:`)."""
    nft.load(delete_table(Ruleset(), name).document())


def start_trial(nft, store, path, seconds, *, force=False, peers=operator_peers,
                iface_of=route_iface, now=None):
    """Load the policy at `path` on trial for `seconds`; return its Pending record.

    The record is on disk before the kernel sees the candidate, so the daemon's
    second guard knows the deadline even if this process dies mid-way; the
    committed policy on disk is not touched.
    """
    if seconds < 1:
        raise InputError("must be at least 1 second", key="--confirm-timeout")
    now = time.time() if now is None else now
    data, candidate = read_candidate(path)
    if not force:
        refuse_cuts(candidate, peers, iface_of)
    with store.locked():
        _refuse_if_running(store, now)
        committed = store.committed()
        if committed is not None and committed.table != candidate.table:
            raise InputError(f"a trial cannot move the policy from table {committed.table!r} "
                             f"to {candidate.table!r}; apply it without --confirm-timeout",
                             path, key="table")
        pending = Pending(data=data, source=candidate.source, sha256=candidate.digest,
                          started_at=now, deadline=now + seconds, seconds=seconds,
                          previous_sha256=committed.digest if committed else None)
        store.set_pending(pending)
        try:
            nft.load(compile_policy(committed or empty_policy(candidate.table),
                                    candidate, seconds).document())
        except BaseException:
            store.clear_pending()
            raise
    return pending


def _trial_elements(nft, table):
    try:
        return [value for value, _timeout, _expires in nft.set_elements(table, TRIAL_SET)]
    except KernelError:
        return []  # no trial set: no trial in the kernel


def _end_expired(nft, store, pending):
    """The kernel already runs the committed chains; drop the stale candidate."""
    nft.load(compile_policy(_fallback(store, pending.policy().table)).document())
    store.clear_pending()


def confirm(nft, store, now=None):
    """Make the candidate on trial the committed policy; return it.

    One transaction deletes the trial element and loads the candidate as the
    committed policy. After the deadline the element is gone, the delete fails
    and so does the whole transaction: TooLate, and the candidate never returns.
    """
    if store.pending() is None:
        # Before the lock: saying no must not create a state dir or lock file.
        raise NoTrial("no trial to confirm")
    with store.locked():
        now = time.time() if now is None else now
        pending = store.pending()
        if pending is None:
            raise NoTrial("no trial to confirm")
        candidate = pending.policy()
        too_late = TooLate(f"too late: the trial of {pending.source} ended at "
                           f"{format_time(pending.deadline)}; the committed policy stays")
        if now >= pending.deadline:
            _end_expired(nft, store, pending)
            raise too_late
        elements = _trial_elements(nft, candidate.table)
        if not elements:
            _end_expired(nft, store, pending)
            raise too_late
        # Before the table is replaced: the delete is what proves the trial is alive.
        alive = Ruleset().delete_elements(candidate.table, TRIAL_SET, elements)
        try:
            nft.load(compile_policy(candidate, into=alive).document())
        except KernelError:
            if _trial_elements(nft, candidate.table):
                raise
            _end_expired(nft, store, pending)
            raise too_late from None
        store.commit(pending.data, candidate, now)
        store.clear_pending()
    return candidate


def rollback(nft, store):
    """Reload the committed policy now and forget the trial; return the Pending ended.

    Without a trial on record it still reloads the committed policy when the
    kernel runs a trial (its record was damaged), and returns None; with no
    trial anywhere it says no (NoTrial), as confirm does, and changes nothing.
    """
    if store.pending() is None and store.committed() is None:
        # Before the lock: saying no must not create a state dir or lock file.
        raise NoTrial("no trial to roll back")
    with store.locked():
        pending = store.pending()
        committed = store.committed()
        if pending is None and (committed is None
                                or not _trial_elements(nft, committed.table)):
            raise NoTrial("no trial to roll back; the committed policy stays")
        nft.load(compile_policy(committed or empty_policy(pending.policy().table)).document())
        store.clear_pending()
    return pending


def enforce(nft, store, now=None):
    """The second guard: roll back a trial whose deadline has passed; True if it did.

    The daemon calls this every second. On kernels where the trial set does its
    job this only tidies up; on kernels where it does not, this is the rollback.
    """
    with store.locked():
        now = time.time() if now is None else now
        pending = store.pending()
        if pending is None or now < pending.deadline:
            return False
        _end_expired(nft, store, pending)
    log.warning("trial of %s passed its deadline unconfirmed: rolled back", pending.source)
    return True


def restore_committed(nft, store, bans_in_force=None):
    """Load only the committed policy and discard any trial (boot: a reboot is a rollback),
    with bans_in_force() in the same transaction (see restore_committed_locked).

    Returns the committed Policy, or None when nothing was ever committed.
    """
    with store.locked():
        return restore_committed_locked(nft, store, bans_in_force)


def restore_committed_locked(nft, store, bans_in_force=None):
    """restore_committed for a caller that already holds the store's lock.

    bans_in_force() ([(ban key, seconds left)]): the daemon's bans, loaded in the
    same transaction, so a ban table put back after `nft flush ruleset` is never
    in the kernel without its bans, not even for a moment."""
    pending = store.pending()
    committed = store.committed()
    if committed is not None:
        document = compile_policy(committed).document()
        bans = None
        if bans_in_force is not None:
            bans = BanElements(committed.bans_table, committed.bans.ipv6_prefix, bans_in_force())
        nft.load(document, bans=bans)
    elif pending is not None:
        nft.load(compile_policy(empty_policy(pending.policy().table)).document())
    store.clear_pending()
    return committed


# `policyd status`'s view of the committed policy and the trial lives in
# policyd.kernel.trialstate (importable without the compiler); re-exported here.


def format_time(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))
