"""The logs the daemon follows: a file with its filter and forged-line judge, or a
bans.logs entry that stopped loading (reported, costing only that log). Journal
sources are policyd.logs.journal's.
"""
import os

from policyd.logs.filters import load_filter
from policyd.logs.guard import judge_for
from policyd.logs.tail import LogFollower


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
