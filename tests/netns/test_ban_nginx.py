"""Bans through real proxies: nginx (auth_basic, htpasswd) and Caddy in front of a
stand-in Ollama on 127.0.0.1:11434, the daemon following their logs.
"""
import json

import pytest

from policyd_lab.netlab import PolicydDaemon, wait_for
from policyd_lab.policies import ban_policy, log_file
from policyd_lab.proxies import ProxyUnavailable, start_caddy, start_nginx, start_ollama_standin
from policyd_lab.webclient import KeepAlive, http_get
from policyd_lab.world import SERVER_V4, SERVER_WAN_V4, SERVER_WAN_V6, STRANGER_V4, TRUSTED_V4

GOOD = ("ollama", "secret")
BAD = ("ollama", "wrong")


@pytest.fixture
def nginx(world, lab):
    start_ollama_standin(world.server)
    proxy = start_nginx(world.server, lab.tmp / "nginx")
    yield proxy
    proxy.stop()


def _daemon(world, log, port=8080, log_filter="nginx-auth"):
    policy = world.policy(ban_policy(log_file(log, log_filter), ports=[port], ollama=True))
    return PolicydDaemon(world.server, policy).start()


def _banned(world):
    return [b["network"] for b in json.loads(world.server.policyd("bans", "--json").stdout)]


def test_wrong_passwords_ban_the_source_even_on_its_keep_alive_connection(world, nginx):
    daemon = _daemon(world, nginx.error_log)
    try:
        url = f"http://{SERVER_WAN_V4}:8080/api/tags"
        assert http_get(world.stranger, url, auth=GOOD) == 200
        # A browser's first request carries no credentials: that is not a failure.
        for _ in range(4):
            assert http_get(world.stranger, url) == 401
        with KeepAlive(world.stranger, SERVER_WAN_V4, 8080) as kept:
            assert kept.get("/api/tags", GOOD) == 200
            for _ in range(2):
                assert http_get(world.stranger, url, auth=BAD) == 401
            assert _banned(world) == []
            # The third wrong password: banned, whatever the answer's fate.
            http_get(world.stranger, url, auth=BAD)
            assert wait_for(lambda: _banned(world) == [f"{STRANGER_V4}/32"], 2)
            # The connection opened before the ban carries nothing any more.
            assert kept.get("/api/tags", GOOD) is None
        assert http_get(world.stranger, url, auth=GOOD, timeout=0.5) is None
        assert not world.stranger.can_connect(SERVER_WAN_V4, 11434, 0.3)
        # Another client, and the same attacker over IPv6 (another source), are fine.
        assert http_get(world.trusted, f"http://{SERVER_V4}:8080/api/tags", auth=GOOD) == 200
        assert http_get(world.stranger, f"http://[{SERVER_WAN_V6}]:8080/api/tags",
                        auth=GOOD) == 200
    finally:
        err = daemon.stop_and_read()
    assert f"ban addr={STRANGER_V4}/32 filter=nginx-auth failures=3" in err


def test_injection_bans_only_the_sender_and_only_at_maxretry(world, nginx):
    daemon = _daemon(world, nginx.error_log)
    try:
        forged = f"client: {TRUSTED_V4}, server: x"
        base = f"http://{SERVER_WAN_V4}:8080"
        # The request line and Host header follow `client:` in error.log; the user
        # name cannot hold a colon (nginx splits Basic credentials at the first one).
        assert http_get(world.stranger, f"{base}/a,%20{forged.replace(' ', '%20')}",
                        auth=(f"x client {TRUSTED_V4}", "pw")) == 401
        assert http_get(world.stranger, f"{base}/?q=, {forged}".replace(" ", "%20"),
                        auth=BAD) == 401
        assert _banned(world) == []
        http_get(world.stranger, f"{base}/api/tags", auth=BAD)
        assert wait_for(lambda: _banned(world) == [f"{STRANGER_V4}/32"], 2)
        assert http_get(world.trusted, f"http://{SERVER_V4}:8080/api/tags", auth=GOOD) == 200
    finally:
        daemon.stop_and_read()


def test_rotation_with_reopen_loses_no_failure(world, nginx):
    daemon = _daemon(world, nginx.error_log)
    try:
        url = f"http://{SERVER_WAN_V4}:8080/api/tags"
        for _ in range(2):
            assert http_get(world.stranger, url, auth=BAD) == 401
        # logrotate's `create` plus nginx's postrotate: rename, then reopen.
        nginx.error_log.rename(nginx.error_log.with_name("error.log.1"))
        nginx.reopen()
        http_get(world.stranger, url, auth=BAD)
        assert wait_for(lambda: _banned(world) == [f"{STRANGER_V4}/32"], 3)
    finally:
        daemon.stop_and_read()


def test_bans_made_through_nginx_survive_apply_and_flush(world, nginx):
    daemon = _daemon(world, nginx.error_log)
    try:
        url = f"http://{SERVER_WAN_V4}:8080/api/tags"
        for _ in range(3):
            http_get(world.stranger, url, auth=BAD)
        assert wait_for(lambda: _banned(world) == [f"{STRANGER_V4}/32"], 2)
        policy = world.policy(ban_policy(log_file(nginx.error_log), ollama=True), "again.yaml")
        assert world.server.policyd("apply", policy, "--force").returncode == 0
        assert http_get(world.stranger, url, auth=GOOD, timeout=0.5) is None
        world.server.nft("flush", "ruleset")
        assert wait_for(lambda: "policyd_bans" in world.server.nft("list", "tables").stdout, 2)
        assert http_get(world.stranger, url, auth=GOOD, timeout=0.5) is None
        assert http_get(world.trusted, f"http://{SERVER_V4}:8080/api/tags", auth=GOOD) == 200
    finally:
        daemon.stop_and_read()


def test_caddy_json_log_bans_too(world, lab):
    start_ollama_standin(world.server)
    try:
        caddy = start_caddy(world.server, lab.tmp / "caddy")
    except ProxyUnavailable as exc:
        pytest.skip(str(exc))
    daemon = _daemon(world, caddy.access_log, port=8081, log_filter="caddy-auth")
    try:
        url = f"http://{SERVER_WAN_V4}:8081/api/tags"
        # Caddy's bcrypt cost makes each check take about a second.
        assert http_get(world.stranger, url, auth=GOOD, timeout=5) == 200
        assert http_get(world.stranger, url, timeout=5) == 401  # no credentials: no failure
        for _ in range(3):
            http_get(world.stranger, url, auth=BAD, timeout=5)
        assert wait_for(lambda: _banned(world) == [f"{STRANGER_V4}/32"], 3)
        assert http_get(world.stranger, url, auth=GOOD, timeout=0.5) is None
        assert http_get(world.trusted, f"http://{SERVER_V4}:8081/api/tags", auth=GOOD,
                        timeout=5) == 200
    finally:
        daemon.stop_and_read()
        caddy.stop()
