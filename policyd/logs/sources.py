"""The logs the daemon follows: a file with its filter, forged-line judge and, in
a flood, the child classifying its backlog ahead; or a bans.logs entry that
stopped loading (reported, costing only that log). Journal sources are
policyd.logs.journal's.
"""
import logging
import os
import time

from policyd.logfmt import kv
from policyd.logs import lookahead
from policyd.logs.filters import load_filter
from policyd.logs.guard import judge_for
from policyd.logs.tail import LogFollower

log = logging.getLogger(__name__)

# After a lookahead that could not start or gave up, this log is read without
# one for this long: a log that defeats it must not cost a fork every few slices.
LOOKAHEAD_RETRY_SECONDS = 60.0


class LogSource:
    """One followed log file and the filter that reads it, with its counters."""

    kind = "file"
    broken = None

    def __init__(self, config, positions):
        self.path = config.path
        self.filter = load_filter(config.filter, mode=config.mode)
        self.filter_name = config.filter
        self.matched = 0
        self.malformed = 0
        fresh = positions.load(self.path) is None
        self.follower = LogFollower(self.path, positions)
        if fresh and os.path.exists(self.path):
            # A log seen for the first time is followed from its end: old
            # failures must not ban anyone today. One that appears later is
            # read from its start, since all of it is new.
            self.follower.skip_to_end()
            self.follower.commit()
        self.judge = judge_for(self.filter)
        self.forged = 0
        self.ahead = None   # a policyd.logs.lookahead.Lookahead while a backlog is read
        self._ahead_after = 0.0   # no lookahead before this time.monotonic()

    def read_slice(self, max_lines):
        """(lines, what the lookahead worked out for them or None): the follower's next
        slice. A full slice with megabytes still unread starts the lookahead."""
        lines = self.follower.read_lines(max_lines=max_lines)
        known = None
        if self.ahead is not None:
            known = self.ahead.take(lines)
            if self.ahead.finished:
                self._stop_ahead()
        elif len(lines) >= max_lines and self.judge.takes_known and time.monotonic() >= self._ahead_after:
            try:
                self.ahead = lookahead.start(self.filter, self.follower)
            except OSError as error:   # no fork (a process limit): classified here, as before
                self._ahead_after = time.monotonic() + LOOKAHEAD_RETRY_SECONDS
                log.warning("lookahead not started %s", kv(log=self.path, error=error))
            if self.ahead is not None:
                log.info("lookahead started %s", kv(log=self.path, pid=self.ahead.pid))
        return lines, known

    def _stop_ahead(self):
        ahead, self.ahead = self.ahead, None
        ahead.close()
        if ahead.gave_up:
            self._ahead_after = time.monotonic() + LOOKAHEAD_RETRY_SECONDS
        log.info("lookahead done %s", kv(log=self.path, lines=ahead.cursor, answered=ahead.served,
                                         behind=ahead.behind, gave_up=ahead.gave_up))

    def close(self):
        if self.ahead is not None:
            self._stop_ahead()
        self.follower.close()

    def stats(self):
        return dict(self.follower.stats, filter=self.filter.name, matched=self.matched,
                    malformed=self.malformed, forged=self.forged)


class UnfollowedSource:
    """A bans.logs entry whose filter or journal stopped loading since `apply` checked
    it (a file edited or removed): it costs this log only, and is reported."""

    kind = "unfollowed"
    follower = None

    def __init__(self, config, error):
        self.path = config.label
        self.filter_name = config.filter
        self.broken = error
        self.matched = 0
        self.malformed = 0

    def stats(self):
        return {"path": self.path, "filter": self.filter_name, "exists": None,
                "inode": None, "offset": 0, "lines": 0, "matched": 0, "malformed": 0,
                "forged": 0, "oversized": 0, "rotations": 0, "error": self.broken}
