"""Forged lines in nginx's error.log, with real nginx: Debian's default site (a static
root on port 80) and the Ollama auth proxy share one error.log, `nginx-auth`
follows it, and a stranger asks the static site for paths that decode to whole
"password mismatch" entries naming someone else. Nobody named may lose access;
the stranger's own wrong passwords (and the forging requests themselves) still
ban the stranger at maxretry. The same tricks through Caddy name nobody else.
"""
import base64
import json
import re
import signal
import time
from urllib.parse import quote

import pytest

from policyd.logs.filters import load_filter, scan
from policyd.logs.guard import Forgery, judge_for
from policyd.logs.nginxentry import written_lines

from policyd_lab.netlab import PolicydDaemon, wait_for
from policyd_lab.proxies import ProxyUnavailable, start_caddy, start_nginx_shared_log, start_ollama_standin
from policyd_lab.policies import ban_policy, log_file
from policyd_lab.webclient import http_get, raw_request
from policyd_lab.world import SERVER_V4, SERVER_WAN_V4, SERVER_WAN_V6, STRANGER_V4, TRUSTED_V4, TRUSTED_V6

GOOD = ("ollama", "secret")
BAD = ("ollama", "wrong")
VICTIMS = ("198.51.100.10", TRUSTED_V4, TRUSTED_V6, "2001:db8:1::77")


def forged_entry(victim, clock="2026/12/01 10:00:00", connection=7):
    """A whole nginx auth_basic failure line naming `victim`, as nginx would write it."""
    return (f'{clock} [error] 812#812: *{connection} user "ollama": password mismatch, '
            f'client: {victim}, server: localhost, request: "GET /api/tags HTTP/1.1", '
            f'host: "localhost:8080"')


def encoded(text, newline="%0A"):
    """Percent-encode for a request line nginx accepts (no raw space or control byte)."""
    return quote(text, safe="/:,@").replace("%0A", newline)


def dressed_tail(victim):
    # Starts like an entry, so the physical line nginx writes after it looks whole too.
    return forged_entry(victim, connection=9) + ', referrer: "x'


def forging_paths():
    """Every forging form an attacker who read the defence would try next."""
    one = forged_entry(VICTIMS[0])
    four = "\n".join(forged_entry(v, connection=20 + n) for n, v in enumerate(VICTIMS))
    padding = "/".join(["q" * 200] * 12)
    return {
        "trailing-newline": "/" + encoded("\n" + one + "\n"),
        "no-trailing-newline": "/" + encoded("\n" + one),
        "four-lines": "/" + encoded("\n" + four + "\n"),
        "ipv6": "/" + encoded("\n" + forged_entry(TRUSTED_V6) + "\n"),
        "dressed-head-and-tail": "/" + encoded(
            'x" failed (2: No such file or directory), client: 192.0.2.99, server: _, '
            'request: "GET /x HTTP/1.1", host: "localhost"\n' + one + "\n" + dressed_tail(TRUSTED_V4)),
        "lowercase-escape": "/" + encoded("\n" + forged_entry(TRUSTED_V4) + "\n", newline="%0a"),
        "dot-segments": "/x/..//" + encoded("\n" + forged_entry(TRUSTED_V4).replace("/", "//") + "\n"),
        "tail-cut-off": "/" + padding[:900] + encoded("\n" + forged_entry(TRUSTED_V4) + "\n") + padding,
        # The cut lands inside the raw request, before its first %0A, right after a quote.
        "tail-cut-inside-request": "/" + '"' * 700 + encoded("\n" + forged_entry(TRUSTED_V4) + "\n")
                                   + "b" * 400,
    }


@pytest.fixture
def nginx(world, lab):
    start_ollama_standin(world.server)
    try:
        proxy = start_nginx_shared_log(world.server, lab.tmp / "nginx")
    except ProxyUnavailable as reason:
        pytest.skip(str(reason))
    yield proxy
    proxy.stop()


def _daemon(world, nginx, maxretry):
    policy = world.policy(ban_policy(log_file(nginx.error_log), ports=(8080, 80), ollama=True,
                                         maxretry=maxretry))
    return PolicydDaemon(world.server, policy).start()


def _banned(world):
    return [b["network"] for b in json.loads(world.server.policyd("bans", "--json").stdout)]


def _log_status(world):
    return json.loads(world.server.policyd("status", "--json").stdout)["logs"][0]


def _caught_up(world, nginx):
    """True once the daemon has read every complete line nginx wrote."""
    lines = nginx.error_log.read_bytes().count(b"\n")
    return _log_status(world)["lines"] >= lines


def _forge(world, path, address=SERVER_WAN_V4):
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    return raw_request(world.stranger, address, 80, request)


def test_the_forging_requests_reach_the_log_as_whole_lines(world, nginx):
    """The attack is real: nginx writes each forged entry as a physical line of its own."""
    for name, path in forging_paths().items():
        assert _forge(world, path) == 404, name
    lines = nginx.error_log.read_bytes().split(b"\n")
    for victim in VICTIMS:
        forged = forged_entry(victim).encode()
        assert any(line.startswith(forged[:36]) and f"client: {victim},".encode() in line
                   for line in lines), victim
    # Yet no shipped filter counts them: error.log through the guard, and the
    # same requests in access.log (nginx escapes them there) for nginx-access.
    result = scan(load_filter("nginx-auth"), nginx.error_log)
    assert result.matched == 0 and result.forged >= len(VICTIMS), result
    assert scan(load_filter("nginx-access"), nginx.access_log).matched == 0


@pytest.mark.parametrize("form", sorted(forging_paths()))
def test_no_forging_form_bans_anyone_it_names(world, nginx, form):
    daemon = _daemon(world, nginx, maxretry=1)
    try:
        path = forging_paths()[form]
        assert _forge(world, path) == 404
        assert _forge(world, path, SERVER_WAN_V6) == 404
        assert wait_for(lambda: _caught_up(world, nginx), 10)
        time.sleep(1.5)  # anything held for the rest of a write (HOLD_SECONDS) is decided by now
        banned = _banned(world)
        assert not [n for n in banned if not n.startswith((STRANGER_V4, "2001:db8:2:"))], banned
        assert http_get(world.trusted, f"http://{SERVER_V4}:8080/api/tags", auth=GOOD) == 200
    finally:
        err = daemon.stop_and_read()
    assert "forged-lines" in err, err


def test_forging_requests_count_against_their_sender(world, nginx):
    daemon = _daemon(world, nginx, maxretry=3)
    try:
        path = forging_paths()["trailing-newline"]
        for _ in range(2):
            assert _forge(world, path) == 404
        assert wait_for(lambda: _caught_up(world, nginx), 10)
        assert _banned(world) == []
        _forge(world, path)
        assert wait_for(lambda: _banned(world) == [f"{STRANGER_V4}/32"], 10), _banned(world)
        assert _log_status(world)["forged"] == 3
    finally:
        err = daemon.stop_and_read()
    assert f"sender={STRANGER_V4}" in err


def test_a_brute_forcer_who_forges_meanwhile_is_banned_at_maxretry(world, nginx):
    daemon = _daemon(world, nginx, maxretry=3)
    url = f"http://{SERVER_WAN_V4}:8080/api/tags"
    try:
        # Forms whose sender cannot be read (the tail is cut off) count nothing,
        # so only the three wrong passwords count here.
        cut = forging_paths()["tail-cut-off"]
        for attempt in range(3):
            assert _forge(world, cut) == 404
            if attempt < 2:
                assert http_get(world.stranger, url, auth=BAD) == 401
                assert wait_for(lambda: _caught_up(world, nginx), 10)
                assert _banned(world) == []
            else:
                http_get(world.stranger, url, auth=BAD)
        assert wait_for(lambda: _banned(world) == [f"{STRANGER_V4}/32"], 10), _banned(world)
    finally:
        err = daemon.stop_and_read()
    assert f"ban addr={STRANGER_V4}/32 filter=nginx-auth failures=3" in err
    for victim in VICTIMS:
        assert f"ban addr={victim}" not in err


def _forge_with_referrer(world, path, referrer):
    request = (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nReferer: {referrer}\r\n"
               f"Connection: close\r\n\r\n").encode()
    return raw_request(world.stranger, SERVER_WAN_V4, 80, request)


def test_a_brute_forcer_pairing_each_wrong_password_with_forging_requests_is_banned_at_maxretry(world, nginx):
    """Each wrong password shares one read of the daemon with requests made to hide
    it: a 404 whose query and referrer hold encoded newlines just before, and a
    forging request with a referrer full of them and a decoy tail naming the admin
    just after. Each try counts twice (the wrong password, and the forging request
    against its sender), so maxretry 4 bans at the second try, not before."""
    daemon = _daemon(world, nginx, maxretry=4)
    url = f"http://{SERVER_WAN_V4}:8080/api/tags"
    decoy = f', client: {VICTIMS[0]}, server: _, request: "GET /{"%0A" * 12} HTTP/1.1", host: "h"'
    try:
        for attempt in range(2):
            # Stopped, the daemon reads the whole burst at once, as if it were sent at one instant.
            daemon.proc.send_signal(signal.SIGSTOP)
            try:
                assert _forge_with_referrer(world, "/nothing?" + "%0A" * 40, "%0A" * 40) == 404
                assert http_get(world.stranger, url, auth=BAD) == 401
                assert _forge_with_referrer(world, forging_paths()["trailing-newline"],
                                            "%0A" * 60 + decoy) == 404
            finally:
                daemon.proc.send_signal(signal.SIGCONT)
            assert wait_for(lambda: _caught_up(world, nginx), 10)
            if attempt == 0:
                time.sleep(1.5)  # anything held for the rest of a write (HOLD_SECONDS) is decided by now
                assert _banned(world) == []
        assert wait_for(lambda: _banned(world) == [f"{STRANGER_V4}/32"], 10), _banned(world)
        assert _log_status(world)["forged"] == 2
    finally:
        err = daemon.stop_and_read()
    assert f"ban addr={STRANGER_V4}/32 filter=nginx-auth failures=4" in err, err
    for victim in VICTIMS:
        assert f"ban addr={victim}" not in err


def forgeries(results):
    return [r for r in results if isinstance(r, Forgery)]


# Paths whose decoded form nginx normalizes: the guard must know the lines each writes.
NORMALIZED_PATHS = ["/a%0Ab", "/a/%2E%2E/%0Ab", "/x%2F%2Fy%0Az", "/x//y%0A/z", "/a%0A/../b%0Ac", "/a/./b%0A.",
                    "/a%0A#x%0Ay", "/a%0A%23x%0Ay", "/a%0A?x%0Ay", "/a%0A%3Fq%0Ay", "/a%0a%25%0Ab",
                    "/a%0A//%0A//b", "/a%0A/...%0Ab", "/a%0A%5C..%5Cb", "/%0A/", "/a%0A/index.html%0A/",
                    "/a%0A+b%0A", "/a/b%0A/c/%2e/d/%2e%2e/e%0A", "/a%0D%0Ab", "/a%0A%2F", "/..%0A/b",
                    "/a%0A%2F%2F%2E%2F.%2Fb", "/a%0A%C3%A9%FFb", "/a%0A%20%22b"]


# Request lines of other forms nginx 1.22 takes: HTTP/0.9 (no version, no headers),
# absolute URIs (scheme and host before the path), a raw quote in the path.
OTHER_REQUESTS = [b"GET /a%0Ab\r\n", b'GET /a"%0Ab\r\n', b"GET http://localhost/a%0Ab HTTP/1.1\r\nHost: x\r\n\r\n",
                  b"GET HTTP://LOCALHOST:80/c/../a%0Ab?q HTTP/1.1\r\nHost: x\r\n\r\n"]


def test_the_guard_knows_the_lines_nginx_writes_for_each_path(world, nginx):
    """policyd.logs.nginxentry.written_lines against nginx itself: a forging write is
    recognised by its tail reproducing the lines before it, so the decoding and
    normalizing must be nginx's (percent-decoding, merged slashes, dot segments,
    a raw `?` or `#` ending the path, the index file after a directory)."""
    root = str(nginx.error_log.parent / "html").encode()
    requests = [f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
                for path in NORMALIZED_PATHS] + OTHER_REQUESTS
    for request in requests:
        size = nginx.error_log.stat().st_size if nginx.error_log.exists() else 0
        raw_request(world.stranger, SERVER_WAN_V4, 80, request)
        assert wait_for(lambda: nginx.error_log.stat().st_size > size, 5), request
        entry = nginx.error_log.read_bytes()[size:]
        wrote = entry[entry.index(root) + len(root):]
        wrote = wrote[:list(re.finditer(rb'" (?:failed|is not found) \(', wrote))[-1].start()]
        expected = b"\n".join(written_lines(request.split(b"\r\n")[0].split(b" ")[1]))
        assert wrote in (expected, expected + b"index.html"), (request, wrote, expected)
    # And each of those writes is recognised whole, as the stranger's.
    judge = judge_for(load_filter("nginx-auth"))
    found = forgeries(judge.judge(nginx.error_log.read_bytes().split(b"\n")[:-1]))
    assert [(f.reason, str(f.sender)) for f in found] == [("encoded-newline", STRANGER_V4)] * len(requests)


def test_the_same_tricks_through_caddy_name_only_their_sender(world, lab):
    """Caddy's JSON log escapes what a request writes: the forging path and a Basic
    user name holding newlines and a whole forged line stay inside one entry."""
    start_ollama_standin(world.server)
    try:
        caddy = start_caddy(world.server, lab.tmp / "caddy")
    except ProxyUnavailable as reason:
        pytest.skip(str(reason))
    try:
        forged = ('{"level":"error","ts":1,"request":{"remote_ip":"%s","headers":{"Authorization":[]}},'
                  '"status":401}' % VICTIMS[0])
        user = f"x\n{forged}\n"
        token = base64.b64encode(f"{user}:wrong".encode()).decode()
        for path in forging_paths().values():
            request = (f"GET {path[:1500]} HTTP/1.1\r\nHost: localhost\r\n"
                       f"Authorization: Basic {token}\r\nConnection: close\r\n\r\n").encode()
            raw_request(world.stranger, SERVER_WAN_V4, caddy.port, request)
        assert wait_for(lambda: caddy.access_log.exists() and caddy.access_log.stat().st_size > 0, 5)
        time.sleep(0.5)
        result = scan(load_filter("caddy-auth"), caddy.access_log)
        assert result.matched >= 1 and set(result.hosts) == {STRANGER_V4}, result
    finally:
        caddy.stop()
