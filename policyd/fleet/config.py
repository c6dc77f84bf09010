"""The policy's `fleet:` block and the secrets it points to.

Owns validation of the Redis URL (never a password in it), the node name, the
limits on bans received from other nodes, and reading the root-only password file.
"""
import os
import re
import socket
import stat
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from policyd.errors import InputError

# A node name becomes part of a Redis key and of an ACL user name: no spaces,
# no glob characters, nothing a key pattern could widen.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
STREAM_PREFIX = "policyd:{bans}:"
RATE_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
DEFAULT_RATE_PER_SECOND = 100
# Ten years: far past any real ban, still a timeout the kernel takes.
MAX_DURATION_LIMIT = 10 * 365 * 86400


@dataclass(frozen=True)
class FleetSettings:
    host: str
    port: int
    db: int
    tls: bool
    username: str | None          # None: the node name
    node: str | None              # None: the host name, resolved by node_name()
    password_file: str | None
    ca_file: str | None
    accept_ipv4_prefix: int       # shortest prefix applied from other nodes
    accept_ipv6_prefix: int
    max_duration: int             # longest ban applied from other nodes, seconds
    rate_per_second: float        # bans+unbans applied per sending node; burst is twice that
    accept_unbans: bool           # False: other nodes may add bans here but never lift one
    url: str                      # as written (it holds no password)

    def node_name(self):
        return self.node if self.node is not None else default_node_name()

    def redis_username(self):
        return self.username if self.username is not None else self.node_name()


def stream_key(node):
    return STREAM_PREFIX + node


def node_of_stream(key):
    """The node a stream key belongs to, or None if the key is not a node's stream."""
    if not key.startswith(STREAM_PREFIX):
        return None
    node = key[len(STREAM_PREFIX):]
    return node if NODE_NAME.match(node) else None


def default_node_name():
    name = socket.gethostname().split(".")[0]
    if not NODE_NAME.match(name):
        raise InputError(f"host name {name!r} cannot be a fleet node name; set fleet.node",
                         key="fleet.node")
    return name


def read_fleet(reader, node, bans):
    """Validate the `fleet:` mapping with the policy reader (file:line:key errors)."""
    items = reader.mapping(node, "fleet", {"redis", "password_file", "ca_file", "node", "accept"},
                           required=("redis",))
    url_node = items["redis"][1]
    url = reader.scalar_text(url_node, "fleet.redis")
    try:
        host, port, db, tls, username = parse_url(url)
    except ValueError as exc:
        reader.fail(url_node, "fleet.redis", str(exc))
    paths = reader.absolute_paths(items, ("password_file", "ca_file"), "fleet")
    if "ca_file" in paths and not tls:
        reader.fail(items["ca_file"][1], "fleet.ca_file", "needs a rediss:// (TLS) URL")
    node_name = None
    if "node" in items:
        node_name = reader.scalar_text(items["node"][1], "fleet.node")
        if not NODE_NAME.match(node_name):
            reader.fail(items["node"][1], "fleet.node",
                        f"{node_name!r} is not a node name (letters, digits, _ . -; at most 63)")
    limits = {"ipv4_prefix": 32, "ipv6_prefix": bans.ipv6_prefix,
              "max_duration": bans.bantime_max, "rate": DEFAULT_RATE_PER_SECOND, "unbans": True}
    if "accept" in items:
        accept = reader.mapping(items["accept"][1], "fleet.accept",
                                {"ipv4_prefix", "ipv6_prefix", "max_duration", "rate", "unbans"})
        if "unbans" in accept:
            limits["unbans"] = reader.scalar(accept["unbans"][1], "fleet.accept.unbans")
            if not isinstance(limits["unbans"], bool):
                reader.fail(accept["unbans"][1], "fleet.accept.unbans",
                            f"{accept['unbans'][1].value!r} is not true or false")
        if "ipv4_prefix" in accept:
            limits["ipv4_prefix"] = reader.integer(accept["ipv4_prefix"][1],
                                                   "fleet.accept.ipv4_prefix", 8, 32)
        if "ipv6_prefix" in accept:
            # As wide as a manual ban may be (policyd.banning.bans.MIN_BAN_PREFIX).
            limits["ipv6_prefix"] = reader.integer(accept["ipv6_prefix"][1],
                                                   "fleet.accept.ipv6_prefix", 16, 128)
        if "max_duration" in accept:
            limits["max_duration"] = reader.duration(accept["max_duration"][1],
                                                     "fleet.accept.max_duration")
            if limits["max_duration"] > MAX_DURATION_LIMIT:
                reader.fail(accept["max_duration"][1], "fleet.accept.max_duration",
                            f"is longer than {MAX_DURATION_LIMIT} seconds")
        if "rate" in accept:
            rate = reader.rate(accept["rate"][1], "fleet.accept.rate")
            limits["rate"] = rate.count / RATE_SECONDS[rate.per]
    return FleetSettings(host=host, port=port, db=db, tls=tls, username=username, node=node_name,
                         password_file=paths.get("password_file"), ca_file=paths.get("ca_file"),
                         accept_ipv4_prefix=limits["ipv4_prefix"],
                         accept_ipv6_prefix=limits["ipv6_prefix"],
                         max_duration=min(limits["max_duration"], MAX_DURATION_LIMIT),
                         rate_per_second=limits["rate"], accept_unbans=limits["unbans"], url=url)


def parse_url(url):
    """redis[s]://[user@]host[:port][/db] -> (host, port, db, tls, user or None)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a Redis URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"{url!r}: the scheme must be redis:// or rediss:// (TLS)")
    if parts.password is not None:
        raise ValueError("the URL must not hold a password: put it in fleet.password_file")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no ?query or #fragment allowed")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"{url!r}: the path is the database number, like /0")
    db = int(path) if path else 0
    if db > 15:
        raise ValueError(f"{url!r}: database {db} is out of range 0..15")
    user = unquote(parts.username) if parts.username else None
    if user is not None and not NODE_NAME.match(user):
        raise ValueError(f"{url!r}: {user!r} is not a usable Redis user name")
    return parts.hostname, port or 6379, db, parts.scheme == "rediss", user


def read_password(path):
    """The password in `path`, which must be a regular file that only its owner (root) can read."""
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(exc.strerror or str(exc), file=path, key="fleet.password_file") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError("is not a regular file", file=path, key="fleet.password_file")
        if info.st_mode & 0o077:
            raise InputError(f"is readable or writable by others (mode {stat.S_IMODE(info.st_mode):04o});"
                             " chmod 600 it", file=path, key="fleet.password_file")
        if info.st_uid not in (0, os.geteuid()):
            raise InputError(f"is owned by uid {info.st_uid}, not root", file=path,
                             key="fleet.password_file")
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    if len(data) > 4096:
        raise InputError("is longer than 4096 bytes", file=path, key="fleet.password_file")
    try:
        password = data.decode("utf-8").strip("\r\n")
    except UnicodeDecodeError:
        raise InputError("is not UTF-8", file=path, key="fleet.password_file") from None
    if not password or "\n" in password:
        raise InputError("must hold the password on one line", file=path, key="fleet.password_file")
    return password
