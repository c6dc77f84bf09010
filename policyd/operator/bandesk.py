"""Manual bans and unbans, as an operator asks for them: on the daemon's BanManager
through the control socket, or on the committed policy's bans directly when no
daemon runs (offline), so the CLI bans without importing the daemon.
"""
import logging
from pathlib import Path

from policyd.fleet import node as fleet
from policyd.policy import store as policystore
from policyd.addr import parse_host, parse_network
from policyd.banning.bans import BanManager
from policyd.errors import InputError
from policyd.logfmt import kv
from policyd.kernel.nft import BanTable, Nft
from policyd.policy.reader import parse_duration
from policyd.banning.state import STATE_FILE, State

log = logging.getLogger(__name__)


# bans.py names a refusal after its own parameter; the operator typed ADDR or --for.
_OPERATOR_KEYS = {"address": "ADDR", "duration": "--for"}


class BanDesk:
    """Manual ban and unban on a BanManager: the daemon's, or the CLI's when none runs."""

    def __init__(self, bans, publish=None):
        self.bans = bans
        self.publish = publish  # the fleet's: (op, network, expires_at, reason)

    def manual_ban(self, address, duration):
        target = _target(address)
        seconds = parse_duration(duration, key="--for") if duration is not None else None
        try:
            ban = self.bans.ban(target, seconds, reason="manual")
        except InputError as exc:
            exc.key = _OPERATOR_KEYS.get(exc.key, exc.key)
            raise
        self.bans.flush()
        if self.publish:
            self.publish("ban", ban.network, ban.expires_at, "manual")
        log.warning("ban %s", kv(addr=ban.network, reason="manual",
                                 duration=f"{round(ban.expires_at - ban.banned_at)}s"))
        return ban.as_dict()

    def manual_unban(self, address):
        lifted = self.bans.unban(_target(address))
        self.bans.flush()
        if self.publish:
            # The network lifted here (an address's covering /64, say), else the address.
            self.publish("unban", lifted or _target(address), None, "manual")
        if lifted:
            log.info("unban %s", kv(addr=lifted, reason="manual"))
        # The network lifted, which may be wider than the address asked for.
        return {"unbanned": lifted is not None, "network": str(lifted) if lifted else None}


def offline(state_dir, action):
    """Run action(BanDesk) on the committed policy's bans when no daemon runs."""
    committed = policystore.PolicyStore(state_dir).committed()
    if committed is None:
        raise InputError("nothing committed yet: run `policyd apply` first", key="policy")
    nft = Nft()
    state = State(Path(state_dir) / STATE_FILE)
    try:
        bans = BanManager(committed.bans, state,
                          BanTable(nft, committed.bans_table, committed.bans.ipv6_prefix))
        # With a fleet, what is banned here waits in the outbox for the daemon.
        publish = fleet.outbox_writer(state) if committed.fleet is not None else None
        return action(BanDesk(bans, publish=publish))
    finally:
        state.close()


def _target(text):
    if not text:
        raise InputError("an address is required", key="ADDR")
    address = parse_host(str(text))
    if address is not None:
        return address
    try:
        return parse_network(str(text))
    except ValueError:
        raise InputError(f"{text!r} is not an address or network", key="ADDR") from None
