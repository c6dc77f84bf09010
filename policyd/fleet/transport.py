"""Redis I/O of the fleet, on two threads of its own: one publishes, one reads.

Neither touches the daemon's state: they hand everything to the main thread
through `post(item)` (a queue plus the daemon's wake-up). Each owns one Redis
connection: the reader sits in a blocking XREAD, so publishing never waits for it.
"""
import collections
import itertools
import logging
import threading
import time

from policyd.fleet import wire as fleet_wire
from policyd.errors import InputError
from policyd.fleet.config import STREAM_PREFIX, node_of_stream, read_password, stream_key

log = logging.getLogger(__name__)

BLOCK_MS = 1000                  # one XREAD waits at most this long
SOCKET_TIMEOUT = 5.0             # longer than BLOCK_MS, or redis-py raises TimeoutError
CONNECT_TIMEOUT = 2.0
BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0)
READ_COUNT = 1000
DRAIN_LIMIT = 200_000
RESCAN_SECONDS = 1.0             # how soon a new node's stream is found
CLOCK_SECONDS = 30.0             # how often the server's clock is sampled again
FUTURE_MS = 60_000               # a stream id further ahead of the server's clock is not trusted
HELLO_SECONDS = 60.0             # a quiet node's heartbeat (peers' last_seen in status)
CHECK_SECONDS = 1.0              # how often an idle publisher checks that Redis kept its stream


def connect(settings, password):
    """A redis.Redis for `settings`; nothing is sent until the first command."""
    import redis  # only a node in a fleet needs python3-redis
    kwargs = dict(host=settings.host, port=settings.port, db=settings.db,
                  username=settings.redis_username(), password=password,
                  socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
                  socket_keepalive=True, retry_on_timeout=False, single_connection_client=True)
    if settings.tls:
        kwargs.update(ssl=True, ssl_cert_reqs="required", ssl_ca_certs=settings.ca_file,
                      ssl_check_hostname=True)
    return redis.Redis(**kwargs)


def server_offset_ms(client):
    """Redis server clock minus this host's clock, in ms (half a round trip of error)."""
    before = time.time()
    seconds, micros = client.time()
    after = time.time()
    return seconds * 1000 + micros / 1000 - (before + after) * 500


def stream_state(client, key):
    """(last generated id, entries added) of a stream, or None if it does not exist."""
    import redis
    try:
        info = client.xinfo_stream(key)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    return fleet_wire.parse_id(info["last-generated-id"]), info.get("entries-added")


def describe(exc):
    return f"{type(exc).__name__}: {exc}"[:200]


class _Worker(threading.Thread):
    def __init__(self, name, open_client, post):
        super().__init__(name=name, daemon=True)
        self.open_client = open_client
        self.post = post
        self.stopping = threading.Event()
        self.client = None
        self.failures = 0

    def stop(self):
        self.stopping.set()

    def _down(self, exc):
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # closing a broken connection may fail too
                pass
        self.client = None
        self.post(("down", self.name, describe(exc)))
        self.stopping.wait(BACKOFF[min(self.failures, len(BACKOFF) - 1)])
        self.failures += 1


class Publisher(_Worker):
    """XADDs this node's bans and unbans to its own stream, in order, retrying until Redis takes them.

    Items are (seq, op, network text, expires_at on this host's clock, reason);
    the time left is computed at XADD, so a ban queued while Redis was down
    arrives with what is left of it. Posts ("published", [seq], last id).
    """

    def __init__(self, open_client, node, post, last_published, retain_ms, clock=time.time):
        super().__init__("fleet-publish", open_client, post)
        self.key = stream_key(node)
        self.last_published = last_published  # (ms, seq) or None
        self.retain_ms = retain_ms
        self.clock = clock
        self.pending = collections.deque()
        self.lock = threading.Condition()
        self.offset_ms = 0.0
        self.next_check = 0.0
        self.next_hello = 0.0

    def submit(self, items):
        with self.lock:
            self.pending.extend(items)
            self.lock.notify()

    def queued(self):
        return len(self.pending)

    def run(self):
        while not self.stopping.is_set():
            if self.client is None:
                try:
                    self._connect()
                except Exception as exc:  # any Redis or TLS failure: retry later
                    self._down(exc)
                    continue
            with self.lock:
                if not self.pending:
                    self.lock.wait(CHECK_SECONDS)
                batch = list(itertools.islice(self.pending, READ_COUNT))
            try:
                if batch:
                    self._send(batch)
                elif time.monotonic() >= self.next_check:
                    # Idle: a Redis that restarted empty would otherwise go
                    # unnoticed until this node next bans someone.
                    self._check(self.client)
            except Exception as exc:
                self._down(exc)

    def _connect(self):
        client = self.open_client()
        self.offset_ms = server_offset_ms(client)
        self.client = client
        self._check(client, hello=True)
        self.failures = 0

    def _check(self, client, hello=False):
        """Say hello (creating the stream) and post ("connected", ..., lost, last id)."""
        self.next_check = time.monotonic() + CHECK_SECONDS
        state = stream_state(client, self.key)
        last = state[0] if state else None
        # Redis lost this node's stream (restarted empty) or holds an older one:
        # everything still banned here must be sent again.
        lost = self.last_published is not None and (last is None or last < self.last_published)
        if last is not None and last[0] > self._server_now_ms() + FUTURE_MS:
            # Ids a day ahead (an XADD with an explicit id, a server clock that
            # jumped back) would order this node's bans after everyone's unbans.
            log.warning("fleet stream ids lie in the future, starting it again %s",
                        f"stream={self.key} last={fleet_wire.format_id(last)}")
            client.delete(self.key)
            lost = True
        # A quiet node says hello now and then, so the others see it is alive.
        hello = hello or time.monotonic() >= self.next_hello
        if not (hello or lost):
            return
        self.next_hello = time.monotonic() + HELLO_SECONDS
        entry_id = client.xadd(self.key, fleet_wire.encode_hello(), minid=self._minid())
        self.last_published = fleet_wire.parse_id(entry_id)
        self.post(("connected", self.name, self.offset_ms, lost,
                   fleet_wire.format_id(self.last_published)))

    def _server_now_ms(self):
        return self.clock() * 1000 + self.offset_ms

    def _minid(self):
        return max(0, int(self._server_now_ms() - self.retain_ms))

    def _send(self, batch):
        now = self.clock()
        pipe = self.client.pipeline(transaction=False)
        sent = []
        for seq, op, network, expires_at, reason in batch:
            if op == "ban":
                ttl_ms = int((expires_at - now) * 1000)
                if ttl_ms <= 0:
                    continue  # ended while queued: nothing to tell anyone
                fields = fleet_wire.encode_ban(network, ttl_ms, reason)
            else:
                fields = fleet_wire.encode_unban(network)
            pipe.xadd(self.key, fields, minid=self._minid())
            sent.append(seq)
        ids = pipe.execute() if sent else []
        with self.lock:
            for _ in batch:
                self.pending.popleft()
        if ids:
            self.last_published = fleet_wire.parse_id(ids[-1])
            if self.last_published[0] > self._server_now_ms() + FUTURE_MS:
                self.next_check = 0.0  # _check() starts the stream again
        self.post(("published", [seq for seq, *_ in batch], len(sent),
                   fleet_wire.format_id(self.last_published) if self.last_published else None))


class Reader(_Worker):
    """Follows every other node's stream with plain XREAD (each node sees every entry).

    Cursors are concrete ids, never `$`. Every second (and on every reconnect)
    it checks each cursor against its stream: a stream that is gone, or whose
    last id is below the cursor (Redis restarted empty, or its node started it
    again), is read again from the start.
    Posts ("entries", [Entry or (node, Malformed)], offset_ms, live).
    """

    def __init__(self, open_client, node, post):
        super().__init__("fleet-read", open_client, post)
        self.own_key = stream_key(node)
        self.cursors = {}       # stream key -> (ms, seq)
        self.offset_ms = 0.0
        self.next_scan = self.next_clock = 0.0

    def catch_up(self):
        """Connect and read everything there is, on the calling thread (start-up).

        Returns (entries, own unbans: network -> ms): an unban this node
        published outranks any older ban it now reads from the others."""
        self._connect()
        return self._drain(), self._own_unbans()

    def _own_unbans(self):
        unbans = {}
        start = "-"
        while True:
            entries = self.client.xrange(self.own_key, min=start, count=READ_COUNT)
            for raw_id, fields in entries:
                try:
                    entry = fleet_wire.decode(None, raw_id, fields)
                except fleet_wire.Malformed:
                    continue
                if entry.op == "unban":
                    unbans[entry.network] = entry.id[0]
            if len(entries) < READ_COUNT:
                return unbans
            start = "(" + entries[-1][0].decode()

    def run(self):
        while not self.stopping.is_set():
            try:
                if self.client is None:
                    self._connect()
                    self.post(("entries", self._drain(), self.offset_ms, False))
                    self.post(("connected", self.name, self.offset_ms, False, None))
                self._read_once()
            except Exception as exc:  # any Redis or TLS failure: reconnect
                self._down(exc)

    def _connect(self):
        client = self.open_client()
        self.offset_ms = server_offset_ms(client)
        self.client = client
        self.failures = 0
        self._scan()

    def _verify_cursors(self):
        """Start again any stream that is gone or whose last id is below our cursor:
        Redis restarted empty, or its node started it again. XREAD would wait for
        ids that will not come, silently."""
        keys = [key for key, cursor in self.cursors.items() if cursor != (0, 0)]
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.xinfo_stream(key)
        for key, info in zip(keys, pipe.execute(raise_on_error=False)):
            if isinstance(info, Exception):
                if "no such key" not in str(info).lower():
                    raise info
                last = None
            else:
                last = fleet_wire.parse_id(info["last-generated-id"])
            cursor = self.cursors[key]
            if last is None or last < cursor:
                log.warning("fleet stream read again from its start %s",
                            f"stream={key} cursor={fleet_wire.format_id(cursor)} "
                            f"last={fleet_wire.format_id(last) if last else 'none'}")
                self.cursors[key] = (0, 0)

    def _scan(self):
        self._verify_cursors()
        for raw in self.client.scan_iter(match=STREAM_PREFIX + "*", count=1000, _type="stream"):
            key = raw.decode("utf-8", "replace")
            if key != self.own_key and key not in self.cursors and node_of_stream(key):
                self.cursors[key] = (0, 0)
        self.next_scan = time.monotonic() + RESCAN_SECONDS

    def _drain(self):
        """Entries past the cursors, across streams, oldest id first; at most
        DRAIN_LIMIT (a node that filled its stream cannot fill this daemon's
        memory: the rest follows through the normal reads)."""
        found = []
        while self.cursors and len(found) < DRAIN_LIMIT:
            batch = self._xread(block=None)
            if not batch:
                break
            found.extend(batch)
        found.sort(key=lambda item: item[0])
        return [entry for _id, entry in found]

    def _read_once(self):
        now = time.monotonic()
        if now >= self.next_clock:
            self.offset_ms = server_offset_ms(self.client)
            self.next_clock = now + CLOCK_SECONDS
        if now >= self.next_scan:
            self._scan()
        if not self.cursors:
            self.stopping.wait(RESCAN_SECONDS)
            return
        batch = self._xread(block=BLOCK_MS)
        if batch:
            batch.sort(key=lambda item: item[0])
            self.post(("entries", [entry for _id, entry in batch], self.offset_ms, True))

    def _xread(self, block):
        streams = {key: fleet_wire.format_id(cursor) for key, cursor in self.cursors.items()}
        reply = self.client.xread(streams, count=READ_COUNT, block=block) or []
        out = []
        for raw_key, entries in reply:
            key = raw_key.decode("utf-8", "replace")
            node = node_of_stream(key)
            for raw_id, fields in entries:
                try:
                    entry_id = fleet_wire.parse_id(raw_id)
                except fleet_wire.Malformed:
                    continue  # cannot happen with a real Redis; never loop on it
                self.cursors[key] = entry_id
                try:
                    out.append((entry_id, fleet_wire.decode(node, raw_id, fields)))
                except fleet_wire.Malformed as exc:
                    out.append((entry_id, (node, exc)))
        return out


def doctor_findings(settings):
    """doctor: [(level, message, fix)] about reaching Redis and the ACL of this node."""
    try:
        import redis
    except ImportError:
        return [("fail", "python3-redis is not installed: the fleet cannot run",
                 "apt install python3-redis")]
    try:
        password = read_password(settings.password_file)
    except InputError as exc:
        return [("fail", f"the fleet password cannot be used: {exc}",
                 "chown root: and chmod 600 the password file")]
    node = settings.node_name()
    own = stream_key(node)
    where = f"{settings.host}:{settings.port}"
    try:
        client = connect(settings, password)
        client.ping()
    except Exception as exc:
        return [("fail", f"Redis at {where} is not reachable as user "
                 f"{settings.redis_username()} ({describe(exc)})",
                 "check fleet.redis, the password file, the CA file and that redis-server runs")]
    findings = [("ok", f"Redis at {where} answers (user {settings.redis_username()})", "")]
    try:
        # XTRIM MINID 0 removes nothing but needs write access to the key.
        client.xtrim(own, minid=0)
        findings.append(("ok", f"this node may write its own stream {own}", ""))
    except redis.ResponseError as exc:
        findings.append(("fail", f"this node cannot write its own stream {own} ({exc})",
                         f"ACL SETUSER {settings.redis_username()} ... %RW~{own} (see README)"))
    try:
        client.xtrim(stream_key("doctor-probe-not-" + node), minid=0)
        findings.append(("fail", "this node may write other nodes' streams: one compromised node "
                         "could forge every node's bans",
                         f"give user {settings.redis_username()} write access to {own} only (README)"))
    except redis.ResponseError:
        findings.append(("ok", "the ACL keeps this node out of other nodes' streams", ""))
    try:
        list(client.scan_iter(match=STREAM_PREFIX + "*", count=100, _type="stream"))
        client.xread({stream_key("doctor-probe-not-" + node): "0-0"}, count=1)
        findings.append(("ok", "this node may read the other nodes' streams", ""))
    except redis.ResponseError as exc:
        findings.append(("fail", f"this node cannot read the fleet's streams ({exc})",
                         f"ACL: %R~{STREAM_PREFIX}* +scan +xread (see README)"))
    finally:
        client.close()
    return findings
