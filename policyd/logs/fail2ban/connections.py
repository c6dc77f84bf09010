"""fail2ban's <F-MLFID> connection cache: lines of one connection, merged.

Owns what sshd needs to ban from lines that name no address: the address seen
earlier on the same connection (its id: the line prefix with the PID), failures
pending until an address comes, <F-NOFAIL>, <F-MLFFORGET> and <F-MLFGAINED>.
"""
import collections

# As in fail2ban: at most this many connections, each for at most this long.
MLFID_CACHE_SIZE = 100
MLFID_CACHE_SECONDS = 300


class ConnectionCache:
    """<F-MLFID> groups by connection id: bounded in count and age, oldest dropped first."""

    def __init__(self, clock):
        self.clock = clock
        self.entries = collections.OrderedDict()

    def get(self, key):
        entry = self.entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry[0] > MLFID_CACHE_SECONDS:
            del self.entries[key]
            return None
        return entry[1]

    def set(self, key, groups):
        self.entries[key] = (self.clock(), groups)
        self.entries.move_to_end(key)
        while len(self.entries) > MLFID_CACHE_SIZE:
            self.entries.popitem(last=False)

    def forget(self, key):
        self.entries.pop(key, None)


def merge(cache, connection, groups):
    """One connection's lines merged: its address, pending failures, success."""
    gained = bool(groups.get("mlfgained"))
    if gained and not groups.get("nofail"):
        groups["nofail"] = groups["mlfgained"]
    forget = bool(groups.pop("mlfforget", None))
    cached = cache.get(connection)
    users = None
    if cached is not None:
        users = _add_user(cached, groups.get("user"))
        cached.pop("nofail", None)
        cached.pop("mlfgained", None)
        if gained:
            cached.pop("mlfpending", None)
        cached.update((k, v) for k, v in groups.items() if v is not None)
        groups = cached
        if forget:
            cache.forget(connection)
    elif not forget:
        users = _add_user(groups, groups.get("user"))
        cache.set(connection, groups)
    if groups.pop("mlfpending", 0) or (users and len(users) > 1):
        # Failures seen before, or several user names: a success or a
        # disconnect no longer excuses this connection.
        groups.pop("nofail", None)
        groups.pop("mlfgained", None)
    return groups


def _add_user(groups, user):
    users = groups.get("users")
    if user:
        if users is None:
            users = groups["users"] = set()
        users.add(user)
    return users
