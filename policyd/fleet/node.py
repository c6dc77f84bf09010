"""The fleet on the daemon's main thread: bans to publish, bans received, and what is said about both.

Owns the durable outbox (State), the rules every received entry passes (this
node's ignore list and loopback, prefix and duration limits, a rate limit per
sending node), applying them to the BanManager, the fleet's metrics and status.
The Redis I/O itself runs in policyd.fleet.transport on threads that only post here.
"""
import logging
import math
import queue
import sqlite3
import time

from policyd.fleet import transport as fleet_redis, wire as fleet_wire
from policyd.operator import metrics
from policyd.fleet.peers import Peer, TokenBucket
from policyd.banning.bankeys import as_network
from policyd.errors import InputError
from policyd.fleet.config import read_password
from policyd.logfmt import kv

log = logging.getLogger(__name__)

ORIGIN = "fleet:"            # the filter name of a ban received from another node
WARN_EVERY_SECONDS = 10.0
REJECT_REASONS = ("malformed", "expired", "rate", "prefix", "protected", "overlap", "unban")


class Fleet:
    """One node's part of the fleet; every method runs on the daemon's main thread."""

    def __init__(self, settings, state, bans, registry, wake, clock=time.time):
        self.settings = settings
        self.node = settings.node_name()
        self.state = state
        self.bans = bans
        self.wake = wake
        self.clock = clock
        self.inbox = queue.Queue()
        self.pending = []          # (op, network, expires_at, reason) not yet in the outbox
        self.peers = {}
        self.buckets = {}
        self.connected = {"fleet-publish": False, "fleet-read": False}
        self.offset_ms = 0.0
        self.last_error = None
        self.lag_ms = None
        self.published = self.received = self.applied = 0
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.next_warning = {}
        self.publisher = self.reader = None
        made = metrics.fleet_metrics(registry, REJECT_REASONS)
        self.m_published, self.m_received = made.published, made.received
        self.m_applied, self.m_rejected, self.m_latency = made.applied, made.rejected, made.latency
        self.m_gauges = made.gauges

    def publish_metrics(self):
        """The fleet's gauges as of now, for the scrapes that follow (main thread)."""
        self.m_gauges.publish({
            "policyd_fleet_connected": int(all(self.connected.values())),
            "policyd_fleet_outbox": self.publisher.queued() if self.publisher else 0,
        })

    # ------------------------------------------------------------ start and stop

    def start(self):
        """Catch up with every other node's stream (bounded), then run the I/O threads.

        Returns the number of bans applied by the catch-up; the caller flushes.
        Redis being down is not an error: local banning goes on, the threads retry.
        """
        try:
            import redis  # noqa: F401  (python3-redis: only a node in a fleet needs it)
        except ImportError:
            self.last_error = "python3-redis is not installed"
            log.error("fleet disabled %s", kv(error=self.last_error))
            return 0
        try:
            read_password(self.settings.password_file)  # refused now, said once, clearly
        except InputError as exc:
            self.last_error = str(exc)
            log.error("fleet disabled %s", kv(error=exc))
            return 0

        def open_client():
            # Read again at every connection: a rotated password needs no restart.
            return fleet_redis.connect(self.settings, read_password(self.settings.password_file))

        last = self.state.fleet_meta("last_published")
        try:
            last = fleet_wire.parse_id(last) if last else None
        except fleet_wire.Malformed:
            last = None
        retain_ms = self.settings.max_duration * 1000
        self.publisher = fleet_redis.Publisher(open_client, self.node, self._post,
                                               last,
                                               max(retain_ms, self.bans.settings.bantime_max * 1000),
                                               clock=self.clock)
        self.reader = fleet_redis.Reader(open_client, self.node, self._post)
        changed = 0
        started = time.monotonic()
        try:
            entries, own_unbans = self.reader.catch_up()
            self.connected["fleet-read"] = True
            self.offset_ms = self.reader.offset_ms
            changed = self._apply_entries(
                entries, self.offset_ms, live=False,
                superseded=dict(own_unbans))
            log.info("fleet caught up %s", kv(node=self.node, entries=len(entries), applied=changed,
                                              streams=len(self.reader.cursors),
                                              ms=round((time.monotonic() - started) * 1000, 1)))
        except Exception as exc:  # Redis down or refusing: start anyway, catch up later
            self.reader.client = None
            self.last_error = fleet_redis.describe(exc)
            log.warning("fleet catch-up failed, banning locally %s", kv(error=self.last_error))
        outbox = self.state.fleet_outbox()
        self.publisher.submit(outbox)
        self.publisher.start()
        self.reader.start()
        return changed

    def stop(self):
        for worker in (self.publisher, self.reader):
            if worker is not None:
                worker.stop()
        # A blocked XREAD returns within BLOCK_MS; a hung connection is not worth
        # a slow stop: the threads are daemon threads and the outbox is on disk.
        deadline = time.monotonic() + 2 * fleet_redis.BLOCK_MS / 1000
        for worker in (self.publisher, self.reader):
            if worker is not None and worker.is_alive():
                worker.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------ publishing

    def publish_ban(self, ban):
        """Queue a ban this node made (auto or manual); commit() hands it on."""
        if not (ban.filter or "").startswith(ORIGIN):
            self.pending.append(("ban", str(ban.network), ban.expires_at, ban.reason))

    def publish(self, op, address, expires_at, reason):
        """A manual ban or unban: queued and committed at once."""
        self.pending.append((op, str(as_network(address)), expires_at, reason))
        self.commit()

    def commit(self):
        """Write queued bans to the durable outbox (one transaction) and to the publisher.

        Called after the kernel took them: publishing never delays a ban."""
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        try:
            with self.state.transaction() as writer:
                seqs = writer.add_fleet_outbox(rows)
        except (sqlite3.Error, OSError) as exc:
            log.error("fleet outbox not written, publishing from memory %s", kv(error=exc))
            seqs = [None] * len(rows)
        if self.publisher is not None:
            self.publisher.submit([(seq, *row) for seq, row in zip(seqs, rows)])

    def _refill(self):
        """Redis lost this node's stream: send every ban this node made that is still in force."""
        own = [ban for ban in self.bans.active() if not (ban.filter or "").startswith(ORIGIN)]
        for ban in own:
            self.publish_ban(ban)
        self.commit()
        log.warning("fleet stream lost by Redis, refilled %s", kv(node=self.node, bans=len(own)))

    # ------------------------------------------------------------ the main loop's side

    def _post(self, item):
        self.inbox.put(item)
        self.wake()

    def pump(self):
        """Handle what the I/O threads posted; returns how many bans changed (caller flushes)."""
        changed = 0
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return changed
            kind = item[0]
            if kind == "entries":
                _, entries, offset_ms, live = item
                self.offset_ms = offset_ms
                changed += self._apply_entries(entries, offset_ms, live)
            elif kind == "published":
                self._published(*item[1:])
            elif kind == "connected":
                _, worker, offset_ms, lost, last_id = item
                if not self.connected[worker]:
                    log.info("fleet connected %s", kv(node=self.node, link=worker))
                self.connected[worker] = True
                self.offset_ms = offset_ms
                if last_id is not None:
                    self._remember_last(last_id)
                if lost:
                    self._refill()
            elif kind == "down":
                _, worker, error = item
                if self.connected[worker] or error != self.last_error:
                    log.warning("fleet link down %s", kv(link=worker, error=error))
                self.connected[worker] = False
                self.last_error = error

    def _published(self, seqs, sent, last_id):
        self.published += sent
        self.m_published.inc(sent)
        try:
            with self.state.transaction() as writer:
                writer.delete_fleet_outbox([seq for seq in seqs if seq is not None])
                if last_id is not None:
                    writer.set_fleet_meta("last_published", last_id)
        except (sqlite3.Error, OSError) as exc:
            log.error("fleet outbox not updated %s", kv(error=exc))

    def _remember_last(self, last_id):
        try:
            with self.state.transaction() as writer:
                writer.set_fleet_meta("last_published", last_id)
        except (sqlite3.Error, OSError) as exc:
            log.error("fleet state not updated %s", kv(error=exc))

    # ------------------------------------------------------------ receiving

    def _apply_entries(self, entries, offset_ms, live, superseded=None):
        """superseded: network -> ms of this node's own unbans; older bans of it are skipped."""
        changed = 0
        for entry in entries:
            server_now_ms = self.clock() * 1000 + offset_ms
            if isinstance(entry, tuple):  # (node, Malformed) from the reader
                node, problem = entry
                self._reject(node, "malformed", problem)
                continue
            peer = self.peers.setdefault(entry.node, Peer())
            # An id in the future (a node that XADDs explicit ids) gains it nothing.
            sent_ms = min(entry.id[0], server_now_ms)
            peer.last_seen = max(peer.last_seen or 0, sent_ms / 1000)
            if entry.op == "hello":
                continue
            if (superseded and entry.op == "ban"
                    and entry.id[0] < superseded.get(entry.network, 0)):
                continue
            peer.received += 1
            self.received += 1
            self.m_received.labels(node=entry.node).inc()
            verdict = self._admit(entry, sent_ms, server_now_ms)
            if verdict is not None:
                self._reject(entry.node, verdict, entry.network)
                continue
            try:
                applied = self._apply(entry, sent_ms, server_now_ms)
            except Exception as exc:  # another node's entry must never end this daemon
                log.exception("fleet entry not applied %s", kv(node=entry.node))
                self._reject(entry.node, "malformed", exc)
                continue
            if applied:
                changed += 1
                peer.applied += 1
                self.applied += 1
                self.m_applied.labels(op=entry.op).inc()
                if live:
                    self.lag_ms = max(0.0, server_now_ms - entry.id[0])
                    self.m_latency.observe(self.lag_ms / 1000)
        return changed

    def _admit(self, entry, sent_ms, server_now_ms):
        """None if `entry` may be applied here, else the reason it may not."""
        if entry.op == "ban" and sent_ms + entry.ttl_ms <= server_now_ms:
            return "expired"
        if entry.op == "unban" and not self.settings.accept_unbans:
            return "unban"
        bucket = self.buckets.setdefault(entry.node, TokenBucket(self.settings.rate_per_second))
        if not bucket.take(sent_ms):
            return "rate"
        network = entry.network
        if entry.op == "unban":
            # An unban lifts what covers the address here, but never a wider ban
            # than this node would take from another: one address inside a
            # local /24 must not free the /24.
            covering = self.bans.covering(network)
            network = covering.network if covering is not None else network
        shortest = (self.settings.accept_ipv4_prefix if network.version == 4
                    else self.settings.accept_ipv6_prefix)
        if network.prefixlen < shortest:
            return "prefix"
        # The kernel holds a ban exactly as wide as it was made (range sets for
        # every width but the auto-ban units), so that network must pass here.
        if entry.op == "ban" and self.bans.protects(network):
            return "protected"
        return None

    def _apply(self, entry, sent_ms, server_now_ms):
        if entry.op == "unban":
            return self.bans.unban(entry.network)
        left_ms = sent_ms + entry.ttl_ms - server_now_ms
        seconds = min(math.ceil(left_ms / 1000), self.settings.max_duration)
        network = entry.network
        current = self.bans.covering(network)
        if current is not None and current.expires_at >= self.clock() + seconds - 1:
            return False  # already banned here at least as long
        try:
            self.bans.ban(network, seconds, reason=entry.reason,
                          filter_name=ORIGIN + entry.node)
        except InputError as exc:  # inside or over a ban of another extent
            self._reject(entry.node, "overlap", exc)
            return False
        return True

    def _reject(self, node, reason, detail):
        self.rejected[reason] += 1
        self.m_rejected.labels(reason=reason).inc()
        if node is not None:
            self.peers.setdefault(node, Peer()).rejected += 1
        now = time.monotonic()
        if now >= self.next_warning.get((node, reason), 0) and reason != "expired":
            self.next_warning[(node, reason)] = now + WARN_EVERY_SECONDS
            log.warning("fleet entry skipped %s", kv(node=node, reason=reason,
                                                     detail=str(detail)[:120],
                                                     total=self.rejected[reason]))

    # ------------------------------------------------------------ status

    def status(self):
        return {
            "node": self.node,
            "redis": self.settings.url,
            "connected": all(self.connected.values()),
            "links": dict(self.connected),
            "peers": {node: peer.as_dict() for node, peer in sorted(self.peers.items())},
            "streams": sorted(_node_of(key) for key in list(self.reader.cursors if self.reader
                                                                            else ())),
            "outbox": self.publisher.queued() if self.publisher else len(self.state.fleet_outbox()),
            "lag_ms": None if self.lag_ms is None else round(self.lag_ms, 1),
            "published": self.published,
            "received": self.received,
            "applied": self.applied,
            "rejected": dict(self.rejected),
            "last_error": self.last_error,
            "accept": {"ipv4_prefix": self.settings.accept_ipv4_prefix,
                       "ipv6_prefix": self.settings.accept_ipv6_prefix,
                       "max_duration": self.settings.max_duration,
                       "rate_per_second": self.settings.rate_per_second,
                       "unbans": self.settings.accept_unbans},
        }


def _node_of(key):
    return key.rsplit(":", 1)[-1]


def outbox_writer(state):
    """publish() for the CLI without a daemon: straight into the durable outbox."""
    def publish(op, address, expires_at, reason):
        try:
            with state.transaction() as writer:
                writer.add_fleet_outbox([(op, str(as_network(address)), expires_at, reason)])
        except (sqlite3.Error, OSError) as exc:  # the ban itself is in force already
            log.error("fleet outbox not written, the other nodes will not hear of it %s",
                      kv(op=op, addr=address, error=exc))
    return publish


def status_line(fleet):
    """`policyd status`'s one line about the fleet."""
    state = "connected" if fleet["connected"] else f"NOT connected ({fleet.get('last_error')})"
    lag = "" if fleet.get("lag_ms") is None else f", lag {fleet['lag_ms']} ms"
    rejected = sum(fleet["rejected"].values())
    return (f"fleet:     node {fleet['node']} {state} to {fleet['redis']}, "
            f"{len(fleet['peers'])} peers seen, {fleet['outbox']} to publish{lag}; "
            f"{fleet['published']} published, {fleet['received']} received, "
            f"{fleet['applied']} applied, {rejected} rejected")
