"""The daemon's policy side: taking the committed policy at start (or holding
the first one back), reloading it on the worker and adopting what it found.

A part of policyd.daemon.core.Daemon (a mixin on the main thread; the *_job
methods run on the worker, policyd.daemon.chores)."""
import gc
import hashlib
import logging
import sqlite3
import time
from pathlib import Path

from policyd.kernel import drift, lockout, trial
from policyd.rules.compile import compile_policy
from policyd.errors import InputError, KernelError, PolicydError
from policyd.kernel.nft import Nft
from policyd.logfmt import kv


log = logging.getLogger(__name__)


class PolicyKeeping:
    """The committed policy: taken at start, reloaded on the worker, adopted here."""

    def _first_start_lint(self):
        """With nothing committed: the lint's verdict on the policy file, as a callable
        for trial.apply (it re-raises a refusal); None otherwise."""
        if self.store.committed() is not None or self.store.held_back() is not None:
            return None
        try:
            policy = trial.read_candidate(self.policy_path)[1]
            lockout.lint_in_child(policy)
        except (lockout.LockoutRisk, InputError) as exc:
            refusal = exc

            def refuse(_policy):
                raise refusal
            return refuse
        return lambda _policy: None

    def _committed_or_first_policy(self, first_lint=None):
        """The committed policy, kept in the kernel; else the policy file, applied as
        `policyd apply` would: after the anti-lockout lint. None when the first policy
        is held back (it would cut a connected client, or it does not load); the daemon
        then enforces nothing and waits for an operator's `policyd apply`."""
        committed = self.store.committed()
        earlier = self.store.held_back() if committed is None else None
        if earlier is not None:
            # Once held back, only an operator's apply enforces: a restart or a
            # reboot (no connections yet to lint) must not cut those clients later.
            self._hold_back(f"{earlier['reason']} (held back since "
                            f"{trial.format_time(earlier['at'])})", earlier["at"])
            return None
        if committed is None:
            log.info("nothing committed yet %s", kv(applying=self.policy_path))
            try:
                return trial.apply(self.nft, self.store, self.policy_path, lint=first_lint)
            except (lockout.LockoutRisk, InputError) as exc:
                self._hold_back(exc)
                return None
        if not self._tables_present(committed):
            # Loaded with the bans, once the state file is read (_start_enforcing).
            self.tables_gone = True
        else:
            # A live trial survives a daemon restart; one past its deadline ends.
            trial.enforce(self.nft, self.store)
        return committed

    def _hold_back(self, exc, since=None):
        """Enforce nothing, say so plainly, and remember it for status and doctor."""
        reason = str(exc)
        since = self.clock() if since is None else since
        self.held_back = {"source": self.policy_path, "reason": reason, "at": since}
        if self.store.held_back() is None:
            self.store.hold_back(self.policy_path, reason, since)
        log.error("NOT ENFORCING %s", kv(
            policy=self.policy_path, reason=reason,
            fix="fix the policy (or add the client to its allow list), then "
                "`policyd apply --confirm-timeout 120`; the daemon takes it at once"))

    def _warn_if_file_differs(self):
        """An edited policy file takes effect through `policyd apply`, never silently."""
        try:
            data = Path(self.policy_path).read_bytes()
        except OSError:
            return
        if hashlib.sha256(data).hexdigest() != self.policy.digest:
            log.warning("policy file differs from the committed policy %s", kv(
                file=self.policy_path, hint="policyd apply --confirm-timeout 60 to load it"))

    def _upkeep_job(self, nft, policy, elements_drifted, bans_in_force):
        """On the worker: housekeeping's policy half, and the list files of a newer
        committed policy read there too (100k lines parsed on the main loop would
        hold bans up)."""
        found = self.upkeep.check(nft, policy, elements_drifted, bans_in_force)
        if found.get("committed") is not None:
            self.lists.epoch += 1
            try:
                found["lists"] = self.lists.prepare(found["committed"])
                self.lists.take(found["lists"])
            finally:
                self.lists.epoch += 1
        return found

    def _take_first_commit(self):
        """While held back: an operator's apply committed a policy; enforce from now on."""
        try:
            trial.enforce(self.nft, self.store)  # a first trial past its deadline ends
            committed = self.store.committed()
        except (PolicydError, OSError) as exc:  # an unreadable committed policy included
            self._trouble("taking the committed policy", exc)
            return
        if committed is None:
            return
        self.policy = committed
        try:
            self._start_enforcing()
        except (PolicydError, OSError, sqlite3.Error) as exc:
            # Still held back (a damaged state file, a refusing kernel): the next
            # housekeeping tries again.
            self._trouble("starting to enforce", exc)
            self._stop_enforcing()
            return
        self.problems.pop("taking the committed policy", None)
        self.problems.pop("starting to enforce", None)

    def _upkept(self, found, error):
        """The worker's housekeeping findings, on the main thread."""
        if error is not None:
            self._trouble("policy upkeep", error)
            return
        self.problems.pop("policy upkeep", None)
        self.trial_active = found.get("trial_active", False)
        if found.get("committed") is not None:
            self._adopt(found["committed"], found.get("lists"))
        if found.get("rolled_back"):
            self.metrics.applies.labels(kind="rollback").inc()
            log.warning("trial ended %s", kv(reason="deadline passed unconfirmed"))
        if "restored_ms" in found:
            # The worker put the committed policy back; the bans are this thread's.
            started = time.perf_counter()
            try:
                count = self.bans.restore()
            except (KernelError, OSError) as exc:
                self._trouble("restoring bans", exc)
                return
            differences = self.elements.differences
            self.elements.reset()
            self.metrics.table_restores.inc()
            log.warning("tables were gone or changed: restored %s", kv(
                policy=self.policy.digest[:12], bans=count, sets="; ".join(differences) or None,
                ms=round(found["restored_ms"] + (time.perf_counter() - started) * 1000, 1)))

    def _kernel_epoch(self):
        """For the drift check: moves whenever the list follower's epoch or the loads
        do, and is odd while either is (both can be at once, on the worker)."""
        lists_epoch, loads = self.lists.epoch, Nft.loads
        return 2 * (lists_epoch + loads) + ((lists_epoch | loads) & 1)

    def _expected_sets(self):
        """What the guard table's interval sets should hold (on the drift thread):
        the committed policy's, with list-fed sets as the list follower loaded them.
        Nothing during a trial: a false alarm there would end the trial."""
        policy = self.policy
        if self.store.pending() is not None:
            return {}
        list_fed = {kernel_set.name: kernel_set for kernel_set in self.lists.sets}
        if self._sets_key != policy.digest:
            self._sets = drift.expected_intervals(compile_policy(policy), policy.table,
                                                  skip=list_fed)
            self._sets_key = policy.digest
        sets = dict(self._sets)
        for name, kernel_set in list_fed.items():
            if len(kernel_set):  # an empty set is not in the ruleset at all
                sets[name] = (kernel_set.bits // 8, kernel_set.intervals())
        return sets

    def _restore_tables(self, bans=()):
        """The committed policy back in a kernel that lost the tables, with `bans`
        ([(key, seconds left)]) in the same transaction."""
        trial.restore_committed(self.nft, self.store, lambda: bans)
        self.tables_gone = False

    def _tables_present(self, policy):
        names = self.nft.tables()
        return policy.table in names and policy.bans_table in names

    def _reload(self, load_kernel=True, replies=()):
        """Take the committed policy again, on the worker: SIGHUP loads it into the
        kernel too; after a confirm or apply by the CLI (load_kernel=False) the
        kernel has it already. Each of `replies` (Futures) gets {"sha256"} once the
        policy is in use. Asked for while one runs, it runs once more afterwards."""
        if self.bans is None:
            self._take_first_commit()
            for reply in replies:
                reply.set_result({"sha256": self.policy.digest if self.policy else None})
            return
        current = self.policy
        replies = list(replies)
        if not self.chores.submit("reload", lambda nft: self._reload_job(nft, load_kernel, current),
                                  lambda result, error: self._reloaded(result, error, replies)):
            again_kernel, again_replies = self._reload_again or (False, [])
            self._reload_again = (again_kernel or load_kernel, again_replies + replies)

    def _reload_job(self, nft, load_kernel, current):
        """On the worker: everything a reload parses, compiles and loads. A policy
        whose chains and rules the kernel has goes in as only the elements that
        differ (a small transaction: the kernel's commit lock, which ban adds wait
        for, is held milliseconds, not the 0.3 s of 100k elements), and its list
        files are read here, not on the main loop."""
        self.lists.epoch += 1  # odd: the drift check does not compare meanwhile
        try:
            committed, loaded = self.upkeep.reload(nft, load_kernel, current,
                                                   self._expected_sets)
            prepared = self.lists.prepare(committed) if committed is not None else None
            if prepared is not None:
                self.lists.take(prepared)
        finally:
            self.lists.epoch += 1
        return committed, loaded, prepared

    def _reloaded(self, result, error, replies):
        if error is not None:
            self._trouble("reload", error)
            for reply in replies:
                reply.set_exception(error)
        else:
            committed, loaded, prepared = result
            if loaded:
                self.metrics.applies.labels(kind="restore").inc()
            if committed is not None:
                self._adopt(committed, prepared)
            for reply in replies:
                reply.set_result({"sha256": self.policy.digest})
        if self._reload_again is not None:
            load_kernel, waiting = self._reload_again
            self._reload_again = None
            self._reload(load_kernel, waiting)

    def _adopt(self, committed, lists_prepared=None):
        """Make `committed` the daemon's policy: ban settings, ban table, logs, and
        list files (as ListSync.prepare read them on the worker, if it did)."""
        changed_logs = committed.bans.logs != self.policy.bans.logs
        changed_fleet = committed.fleet != self.policy.fleet
        changed_prefix = committed.bans.ipv6_prefix != self.policy.bans.ipv6_prefix
        previous, self.policy = self.policy, committed
        self.bans.kernel = self._ban_table(committed)
        if previous.bans_table != committed.bans_table or changed_prefix:
            # `table:` changed: the bans move to the new ban table, then the old goes.
            # ipv6_prefix changed: the IPv6 elements mean other networks now, and
            # are replaced in one transaction.
            try:
                self.bans.restore(flush_ipv6=changed_prefix)
            except (KernelError, OSError) as error:  # reconcile retries what is missing
                log.error("could not move the bans to the new ban table %s", kv(
                    table=committed.bans_table, ipv6_prefix=committed.bans.ipv6_prefix,
                    error=error))
            if previous.bans_table != committed.bans_table:
                trial.retire_table(self.nft, previous.bans_table)
        for ban in self.bans.reconfigure(committed.bans):
            log.info("unban %s", kv(addr=ban.network, reason="now ignored"))
        self._flush()
        if changed_logs:
            self._write_everything()  # so a log followed anew resumes where it stopped
            self._follow(committed)
        if changed_fleet:
            if self.fleet is not None:
                self.fleet.stop()
                self.fleet = None
            self._start_fleet()
        gc.freeze()
        self.lists.follow(committed, lists_prepared)
        self.elements.table = committed.table
        self.elements.reset()
        log.info("reloaded %s", kv(policy=committed.source, sha256=committed.digest[:12]))
