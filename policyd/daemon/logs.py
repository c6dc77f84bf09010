"""The daemon's log side: following the policy's logs and turning each slice of
new lines (or journal entries) into failures, with forged lines reported.

A part of policyd.daemon.core.Daemon (a mixin: it reads and sets the daemon's
sources, watcher, positions, metrics and bans on the main thread)."""
import logging
import os
from collections import Counter
from operator import itemgetter

from policyd.errors import InputError
from policyd.logs.filters import Outcome
from policyd.logs.guard import failures_from
from policyd.logs.journal import JournalSource
from policyd.logs.sources import LogSource, UnfollowedSource
from policyd.logfmt import kv
from policyd.logs.logwatch import LogWatcher


log = logging.getLogger(__name__)

# Lines taken from one log per turn of the loop: a flood in one log delays the
# bans of another log, control requests and housekeeping by one slice (a few
# ms), and each slice's bans reach the kernel before the next slice is read.
READ_SLICE_LINES = 500


class LogReading:
    """Following the policy's logs; one slice of a log -> its failures."""

    def _follow(self, policy):
        """Follow the policy's logs (the old ones' state and positions are written
        first, by _write_everything, so a log followed anew resumes where it stopped)."""
        for source in self.sources:
            if source.follower:
                source.close()
        if self.watcher is not None:
            self.watcher.stop()
        self.sources = [self._source(config) for config in policy.bans.logs]
        for source in self.sources:
            if source.broken:
                log.error("log not followed %s", kv(log=source.path, error=source.broken))
            elif source.kind == "file" and not os.path.exists(source.path):
                log.warning("log missing %s", kv(log=source.path, filter=source.filter_name,
                                                 action="followed from its start once it "
                                                        "appears"))
        followed = [s for s in self.sources if not s.broken and s.kind == "file"]
        self.watcher = LogWatcher([s.path for s in followed], self._on_log_change,
                                  poll_interval=1.0)
        self.watcher.start()

    def _source(self, config):
        try:
            if config.journal:
                # A journal cursor is queued with the failures read up to it and
                # written in their transaction (BanManager.queue_position).
                return JournalSource(config, self.positions, self._on_log_change,
                                     self.bans.queue_position)
            return LogSource(config, self.positions)
        except InputError as exc:
            return UnfollowedSource(config, f"filter {config.filter!r} does not load: {exc}")

    def _on_log_change(self, _path):
        self.wake.set()

    def _until_held_failures_are_due(self, pause):
        """`pause`, or less when a log's judge holds failures for the rest of a write
        that may never come (policyd.logs.guard): they are banned when due, not at
        a later turn of the loop."""
        for source in self.sources:
            judge = getattr(source, "judge", None)
            due = judge.release_in() if judge is not None else None
            if due is not None:
                pause = min(pause, due)
        return pause

    def _file_failures(self, source):
        """([(host, filter, time)], more lines waiting) from one slice of a log file;
        lines a request forged into another entry are dropped and reported."""
        lines, known = source.read_slice(READ_SLICE_LINES)
        if not lines and not source.judge.holding:
            return [], False
        if lines:
            self.metrics.log_lines.labels(log=source.path).inc(len(lines))
        failures, malformed, forgeries = failures_from(source.judge, lines, source.follower.mid_write, known)
        source.matched += len(failures)
        made = [(before, forgery.failure()) for before, forgery in forgeries
                if self._forged(source, forgery)]
        for before, failure in reversed(made):   # each where the log has it
            failures.insert(before, failure)
        self._count_outcomes(source, failures, malformed)
        return failures, len(lines) >= READ_SLICE_LINES

    def _journal_failures(self, source):
        """[(host, filter, time)] from the journal's new entries (the follower reads a
        bounded batch and wakes the loop again when more wait)."""
        outcomes = source.read()
        if outcomes:
            self.metrics.log_lines.labels(log=source.path).inc(len(outcomes))
        failures = []
        malformed = 0
        for outcome, when in outcomes:
            if outcome is Outcome.MALFORMED:
                malformed += 1
            elif outcome is not Outcome.IGNORED:
                source.matched += 1
                failures.append((outcome.host, outcome.filter, when))
        self._count_outcomes(source, failures, malformed)
        return failures

    def _count_outcomes(self, source, failures, malformed):
        if malformed:
            source.malformed += malformed
            self.metrics.log_malformed.labels(log=source.path).inc(malformed)
        for name, count in Counter(map(itemgetter(1), failures)).items():
            self.metrics.failures.labels(filter=name).inc(count)

    def _forged(self, source, forgery):
        """Count and report a request that wrote lines into another entry; True if
        its sender is known, so that it counts as a failure of that sender."""
        source.forged += 1
        self.metrics.log_forged.labels(log=source.path).inc()
        log.warning("forged-lines %s", kv(log=source.path, filter=forgery.filter,
                                          sender=forgery.sender or "unknown",
                                          dropped=forgery.dropped, reason=forgery.reason))
        return forgery.sender is not None
