"""Real nginx and Caddy in a server namespace: the proxies the ban engine reads.

These check the lab pieces in policyd_lab.proxies and that what the real
proxies write is what the shipped filters expect: a wrong password is a
Failure naming the client, a credential-less first request is not.
"""
from ipaddress import ip_address

import pytest

from policyd_lab.netlab import wait_for
from policyd_lab.world import SERVER_V4, SERVER_V6, TRUSTED_V4, TRUSTED_V6
from policyd.logs.filters import Failure, Outcome, load_filter
from policyd_lab.proxies import ProxyUnavailable, start_caddy, start_nginx, start_ollama_standin
from policyd_lab.webclient import KeepAlive, http_get

RIGHT = ("ollama", "secret")
WRONG = ("ollama", "wrong")
# Caddy's bcrypt (cost 14, from `caddy hash-password`) takes over a second per check.
CADDY_TIMEOUT = 10.0
FAMILIES = [pytest.param(SERVER_V4, TRUSTED_V4, id="ipv4"),
            pytest.param(SERVER_V6, TRUSTED_V6, id="ipv6")]


def url(server, port, path="/api/tags"):
    return f"http://[{server}]:{port}{path}" if ":" in server else f"http://{server}:{port}{path}"


def lines_of(path):
    return path.read_bytes().splitlines() if path.exists() else []


def new_lines(path, before, needle):
    """Lines after the first `before` lines of path that contain `needle` (bytes)."""
    return [line for line in lines_of(path)[before:] if needle in line]


@pytest.fixture
def nginx(world, tmp_path):
    start_ollama_standin(world.server)
    proxy = start_nginx(world.server, tmp_path / "nginx")
    yield proxy
    # A graceful stop lets the master reap its workers; the lab's SIGKILL of the
    # whole group would leave them as zombies of an init that may not reap.
    proxy.stop()


@pytest.fixture
def caddy(world, tmp_path):
    start_ollama_standin(world.server)
    try:
        proxy = start_caddy(world.server, tmp_path / "caddy")
    except ProxyUnavailable as exc:
        pytest.skip(str(exc))
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("server, client", FAMILIES)
def test_nginx_lets_the_right_password_through_to_ollama(world, nginx, server, client):
    assert http_get(world.trusted, url(server, nginx.port), auth=RIGHT) == 200
    # The stand-in answers only /api/tags: a 404 proves the answer came from upstream.
    assert http_get(world.trusted, url(server, nginx.port, "/api/nothing"), auth=RIGHT) == 404


@pytest.mark.parametrize("server, client", FAMILIES)
@pytest.mark.parametrize("auth", [WRONG, ("nobody", "secret")], ids=["wrong-password", "unknown-user"])
def test_nginx_wrong_credentials_log_a_failure_naming_the_client(world, nginx, server, client, auth):
    before = len(lines_of(nginx.error_log))
    assert http_get(world.trusted, url(server, nginx.port), auth=auth) == 401
    logged = new_lines(nginx.error_log, before, b"[error]")
    assert len(logged) == 1, logged
    assert load_filter("nginx-auth").classify(logged[0]) == Failure(ip_address(client), "nginx-auth")


def test_nginx_credentialless_request_is_401_but_not_a_failure(world, nginx):
    before = len(lines_of(nginx.error_log))
    assert http_get(world.trusted, url(SERVER_V4, nginx.port)) == 401
    logged = new_lines(nginx.error_log, before, b"basic authentication")
    assert len(logged) == 1, logged
    assert b"no user/password was provided" in logged[0]
    assert load_filter("nginx-auth").classify(logged[0]) is Outcome.IGNORED


def test_keep_alive_carries_many_requests_and_notices_a_cut(world, nginx):
    with KeepAlive(world.trusted, SERVER_V4, nginx.port) as conn:
        # A 401 must not end the connection either: a ban test relies on a
        # connection that already failed staying open until the ban cuts it.
        statuses = [conn.get("/api/tags", RIGHT), conn.get("/api/tags", WRONG),
                    conn.get("/api/tags", RIGHT)]
        assert statuses == [200, 401, 200]
        assert conn.local_address == TRUSTED_V4
        nginx.stop()
        assert conn.get("/api/tags", RIGHT) is None
        assert conn.get("/api/tags", RIGHT) is None, "KeepAlive must never reconnect"


def test_nginx_reopen_after_rename_writes_a_new_error_log(world, nginx):
    assert http_get(world.trusted, url(SERVER_V4, nginx.port), auth=WRONG) == 401
    rotated = nginx.error_log.with_name("error.log.1")
    nginx.error_log.rename(rotated)
    nginx.reopen()
    assert wait_for(nginx.error_log.exists)
    rotated_size = rotated.stat().st_size
    assert http_get(world.trusted, url(SERVER_V6, nginx.port), auth=WRONG) == 401
    failures = [load_filter("nginx-auth").classify(line) for line in lines_of(nginx.error_log)]
    assert Failure(ip_address(TRUSTED_V6), "nginx-auth") in failures
    assert rotated.stat().st_size == rotated_size


@pytest.mark.parametrize("server, client", FAMILIES)
def test_caddy_wrong_password_is_a_failure_and_no_credentials_is_not(world, caddy, server, client):
    caddy_filter = load_filter("caddy-auth")
    assert http_get(world.trusted, url(server, caddy.port), auth=RIGHT, timeout=CADDY_TIMEOUT) == 200
    assert http_get(world.trusted, url(server, caddy.port), auth=WRONG, timeout=CADDY_TIMEOUT) == 401
    assert http_get(world.trusted, url(server, caddy.port), timeout=CADDY_TIMEOUT) == 401
    # Caddy writes its access log after the response.
    assert wait_for(lambda: len(lines_of(caddy.access_log)) == 3)
    outcomes = [caddy_filter.classify(line) for line in lines_of(caddy.access_log)]
    assert outcomes == [Outcome.IGNORED, Failure(ip_address(client), "caddy-auth"), Outcome.IGNORED]
