"""The daemon's answers to control requests (policyd.operator.control_server hands them
to the main loop) and the metrics snapshot scrapes read.

A part of policyd.daemon.core.Daemon (a mixin on the main thread; OffLoop answers
are built on the server's thread from a copy)."""
import logging
import os
from concurrent.futures import Future

from policyd import __version__
from policyd.kernel import trial
from policyd.operator import control, metrics
from policyd.errors import InputError
from policyd.policy.lists import cidr_text as network_text
from policyd.operator.bandesk import BanDesk
from policyd.logfmt import kv


log = logging.getLogger(__name__)

# How long a `reload` control request waits for the worker's reload.
RELOAD_REPLY_SECONDS = 60.0


class ControlAnswers:
    """What the daemon answers: control requests, its status and the metrics snapshot."""

    def _status_line(self):
        if self.bans is None:
            return f"NOT ENFORCING: {self.held_back['reason'] if self.held_back else '?'}"
        problems = f"; {len(self.problems)} problem(s), see policyd status" if self.problems else ""
        return (f"{self.bans.active_count} bans, {len(self.sources)} logs, "
                f"policy {self.policy.digest[:12]}{problems}")

    def _handle(self, command, args):
        """A control request, on the main thread."""
        if self.bans is None and command in ("ban", "unban"):
            raise InputError("nothing is enforced yet (see `policyd status`): apply a policy "
                             "first", key="policy")
        desk = BanDesk(self.bans, publish=self.fleet and self.fleet.publish)
        handlers = {
            "status": self.status,
            "bans": lambda: self.ban_list(args.get("form")),
            "ban": lambda: self._counted(desk.manual_ban(args.get("address"),
                                                         args.get("duration"))),
            "unban": lambda: desk.manual_unban(args.get("address")),
            "reload": self._reload_now,
            "applied": lambda: self._applied(args.get("kind")),
            "metrics": self._metrics_text,
        }
        if command not in handlers:
            raise InputError(f"unknown command {command!r}", key="command")
        return handlers[command]()

    def _publish_metrics(self):
        """The gauges scrapes read until the next call: made here, on the main
        thread, so the HTTP thread never runs daemon code (the trial's state comes
        from the worker's last housekeeping: no policy is parsed here either)."""
        self.metrics.snapshot.publish({
            "policyd_bans_active": self.bans.active_count if self.bans else 0,
            "policyd_trial_active": int(self.trial_active),
            "policyd_enforcing": int(self.held_back is None),
            "policyd_log_errors": {source.path: int(source.stats()["error"] is not None)
                                   for source in self.sources},
        })
        if self.fleet is not None:
            self.fleet.publish_metrics()

    def _metrics_text(self):
        self._publish_metrics()
        return metrics.render(self.registry)

    def _counted(self, ban):
        self.metrics.bans.labels(reason="manual").inc()
        return ban

    def _applied(self, kind):
        """The CLI changed the kernel and the state dir (it tells us, for the metrics)."""
        if kind not in metrics.APPLY_KINDS:
            raise InputError(f"unknown apply kind {kind!r}", key="kind")
        self.metrics.applies.labels(kind=kind).inc()
        log.info("policy %s", kv(change=kind))
        return {}

    def _reload_now(self):
        """Answered once the worker's reload is in use; _control() waits for it."""
        reply = Future()
        self._reload(replies=[reply])
        return reply

    def _control(self, command, args):
        """ControlServer's handler, on a server thread: the command runs on the main
        loop; a reload is answered when done, without the main loop waiting for it."""
        answer = self.calls(command, args)
        if isinstance(answer, Future):
            return answer.result(RELOAD_REPLY_SECONDS)
        if isinstance(answer, OffLoop):
            return answer.work()
        return answer

    def status(self):
        now = self.clock()
        return {
            "daemon": {"pid": os.getpid(), "version": __version__,
                       "started_at": self.started_at,
                       "uptime": round(now - self.started_at, 1),
                       "problems": [f"{what}: {why}" for what, why in sorted(self.problems.items())]},
            "policy": trial.status(self.store, now=now),
            "bans": {"active": self.bans.active_count,
                     "total": sum(self.bans.bans_total.values())} if self.bans else None,
            "logs": [source.stats() for source in self.sources],
            "fleet": self.fleet.status() if self.fleet is not None else None,
            "kernel": self.kernel_features,
            "lists": self.lists.stats() if self.lists is not None else [],
        }

    def ban_list(self, form=None):
        """Answered off the main loop (see _control): the main loop only takes a
        snapshot. Asked for columns (policyd.operator.banlist.WIRE), a control.Stream of
        them, soonest expiry first, each part made while the client prints the
        one before and in steps that give the main loop the GIL between them;
        else the list of objects older clients read."""
        from policyd.operator import banlist
        if self.bans is None:
            return []
        # A dict copy here (3 ms for 100k bans), listed off the loop (building the
        # list here held bans up 20 ms); none while the listing of the book as it
        # is now is kept (policyd.operator.banlist.kept).
        stamp, now = self.bans.book.stamp, self.clock()
        if form == banlist.WIRE:
            listing = banlist.kept(stamp)
            book = dict(self.bans.book.active) if listing is None else None
            return OffLoop(lambda: control.Stream(banlist.parts_from_snapshot(
                book, now, network_text, stamp=stamp, listing=listing), {"form": form}))
        book = dict(self.bans.book.active)
        return OffLoop(lambda: banlist.rows_from_snapshot(list(book.items()), now, network_text))


class OffLoop:
    """A control answer the main loop leaves to the server thread: work() builds it
    from data the main loop copied (100k bans formatted would hold bans up 1 s)."""

    def __init__(self, work):
        self.work = work
