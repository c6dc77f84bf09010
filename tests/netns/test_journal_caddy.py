"""A journal-fed Caddy log ending in a ban: real Caddy in the server namespace, its
JSON access log relayed into a real journal file as caddy.service's entries (what
journald does with a unit's output), and `policyd run` following `journal:
caddy.service`. A local user's forged entries (another unit) ban nobody."""
import json
import threading

import pytest

from policyd_lab.journal_files import JournalPipe, available
from policyd_lab.netlab import PolicydDaemon, wait_for
from policyd_lab.policies import ban_policy, journal
from policyd_lab.proxies import ProxyUnavailable, start_caddy, start_ollama_standin
from policyd_lab.webclient import http_get, syn_answered
from policyd_lab.world import SERVER_WAN_V4, STRANGER_V4, TRUSTED_V4

pytestmark = pytest.mark.skipif(not available, reason="systemd-journal-remote is not installed")
WRONG = ("ollama", "wrong")
FORGED = "203.0.113.77"


class Relay:
    """Follows Caddy's access log and sends each line to the journal as caddy.service."""

    def __init__(self, log, pipe):
        self.log, self.pipe = log, pipe
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        offset = 0
        while not self.stopping.wait(0.005):
            if not self.log.exists():
                continue
            with self.log.open("rb") as stream:
                stream.seek(offset)
                data = stream.read()
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            offset += end
            self.pipe.send([{"_SYSTEMD_UNIT": "caddy.service", "_COMM": "caddy", "_PID": "321",
                             "SYSLOG_IDENTIFIER": "caddy", "MESSAGE": line}
                            for line in data[:end].decode().splitlines() if line])

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=5)


def test_failures_that_reach_only_the_journal_end_in_a_kernel_ban(world, tmp_path):
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    pipe = JournalPipe(journal_dir / "system.journal")
    pipe.send([{"_SYSTEMD_UNIT": "caddy.service", "MESSAGE": "caddy starting"}])
    start_ollama_standin(world.server)
    try:
        caddy = start_caddy(world.server, tmp_path / "caddy")
    except ProxyUnavailable as exc:
        pipe.close()
        pytest.skip(str(exc))
    relay = Relay(caddy.access_log, pipe)
    policy = ban_policy(journal("caddy.service", journal_dir, "caddy-auth"), ports=[8081])
    daemon = PolicydDaemon(world.server, world.policy(policy))
    try:
        daemon.start()
        # A local user's `systemd-cat -t caddy` lands under its own unit: no ban.
        pipe.send([{"_SYSTEMD_UNIT": "session-2.scope", "SYSLOG_IDENTIFIER": "caddy",
                    "MESSAGE": json.dumps({"request": {"remote_ip": FORGED, "headers": {
                        "Authorization": ["REDACTED"]}}, "status": 401}, separators=(",", ":"))}
                   for _ in range(5)])
        url = f"http://{SERVER_WAN_V4}:{caddy.port}/api/tags"
        assert syn_answered(world.stranger, SERVER_WAN_V4, caddy.port, 1.0)
        for _ in range(3):
            assert http_get(world.stranger, url, auth=WRONG, timeout=10.0) == 401
        assert wait_for(lambda: not syn_answered(world.stranger, SERVER_WAN_V4, caddy.port, 0.2),
                        timeout=10), "the stranger was not banned"
        assert syn_answered(world.trusted, "192.0.2.1", caddy.port, 1.0)
        bans = json.loads(world.server.policyd("bans", "--json").stdout)
        assert [(b["network"], b["filter"]) for b in bans] == [(f"{STRANGER_V4}/32", "caddy-auth")]
        status = json.loads(world.server.policyd("status", "--json").stdout)
        source = status["logs"][0]
        assert source["path"] == "journal:caddy.service" and source["matched"] == 3
        assert TRUSTED_V4 not in json.dumps(bans) and FORGED not in json.dumps(bans)
    finally:
        relay.stop()
        err = daemon.stop_and_read()
        caddy.stop()
        pipe.close()
    assert f"addr={STRANGER_V4}/32" in err and "filter=caddy-auth" in err
