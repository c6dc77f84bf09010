"""The daemon's log of the bans it makes: one key=value line per ban, and during a
flood one summary line per second (100k journal lines would cost 2 s on the ban
path, and each write hands the GIL to the state writer).
"""
import logging
import time

from policyd.logfmt import kv

log = logging.getLogger("policyd.daemon.core")

# More bans than this from one slice of lines go into the summary.
BAN_LOG_LINES = 20
# A summary line at most this often while bans keep coming.
SUMMARY_SECONDS = 1.0


class BanLog:
    """record() each batch of new bans (policyd.banning.bans.NewBans); flush() writes what
    a summary holds (the loop calls it when a backlog ends, and on housekeeping)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._count = 0
        self._filters = set()
        self._sample = []
        self._due = 0.0

    def record(self, bans):
        if len(bans) <= BAN_LOG_LINES and not self._count:
            for ban in bans:
                log.warning("ban %s", kv(addr=ban.network, filter=ban.filter,
                                         failures=ban.failures,
                                         duration=f"{round(ban.expires_at - ban.banned_at)}s"))
            return
        if not self._count:
            self._due = self.clock() + SUMMARY_SECONDS
        self._count += len(bans)
        self._filters.update(bans.filters())
        if len(self._sample) < 5:
            self._sample.extend(bans.sample(5 - len(self._sample)).split())
        if self.clock() >= self._due:
            self.flush()

    def flush(self, due_only=False):
        if due_only and self.clock() < self._due:
            return
        if self._count:
            log.warning("bans %s", kv(count=self._count, filter=",".join(sorted(self._filters)),
                                      sample=" ".join(self._sample),
                                      hint="policyd bans lists them all"))
        self._count, self._filters, self._sample = 0, set(), []
