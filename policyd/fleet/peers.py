"""What this node keeps about each other node of the fleet: when it was last
seen and what it sent, and the token bucket that bounds how fast it may ban here.
"""


class TokenBucket:
    """`rate` per second, burst twice that, refilled by the entries' own server times."""

    def __init__(self, rate):
        self.rate = rate
        self.capacity = max(1.0, 2 * rate)
        self.tokens = self.capacity
        self.at_ms = None

    def take(self, now_ms):
        if self.at_ms is not None and now_ms > self.at_ms:
            self.tokens = min(self.capacity, self.tokens + (now_ms - self.at_ms) * self.rate / 1000)
        self.at_ms = now_ms if self.at_ms is None else max(self.at_ms, now_ms)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Peer:
    def __init__(self):
        self.last_seen = None      # server time (s) of its newest entry
        self.received = self.applied = self.rejected = 0

    def as_dict(self):
        return {"last_seen": self.last_seen, "received": self.received, "applied": self.applied,
                "rejected": self.rejected}
