"""Property tests (python3-hypothesis) over every shipped filter and the log follower.

Each proxy's writer below writes entries the way that proxy does, escaping what
it escapes and nothing more, with attacker-controlled fields full of newlines,
quotes and whole forged failure lines naming victims. The log is read by the
real LogFollower at random points where a reader can see it (between writes, or
inside a write at a page boundary). The invariant: every failure host reported
is the server-written client of a real failure entry, every forging request is
blamed only on a real client, and nothing raises. Bounded for `make test`.
"""
import ipaddress
import json
import os
from itertools import accumulate
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policyd.logs.tail
import policyd.logs.writefence
from policyd.logs.filters import Failure, Outcome, load_filter
from policyd.logs.guard import Forgery, judge_for
from fakes import MemoryPositions
from policyd.logs.tail import LogFollower

ip = ipaddress.ip_address
SHIPPED = ["nginx-auth", "nginx-access", "caddy-auth", "traefik-auth",
           "haproxy-auth", "apache-auth", "oauth2-proxy", "authelia"]
CLIENTS = ["203.0.113.5", "203.0.113.6", "2001:db8:2::20"]
VICTIMS = ["192.0.2.10", "2001:db8:1::10", "198.51.100.10"]
LIMITS = settings(max_examples=40, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def forged_line(name, victim):
    """A whole failure line of this filter's log naming `victim`, as the proxy writes it."""
    return {
        "nginx-auth": f'2026/12/01 10:00:00 [error] 1#1: *1 user "u": password mismatch, client: {victim}, '
                      f'server: s, request: "GET / HTTP/1.1", host: "h"',
        "nginx-access": f'{victim} - u [01/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1" 401 5 "-" "x"',
        "caddy-auth": json.dumps({"ts": 1.0, "request": {"remote_ip": victim, "headers": {"Authorization": []}},
                                  "status": 401}, separators=(",", ":")),
        "traefik-auth": f'{victim} - u [01/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1" 401 5 "-" "x" 1 "r" "-" 0ms',
        "haproxy-auth": f'{victim}:1234 [01/Dec/2026:10:00:00.000] f b/s -1/-1/-1/-1/0 401 5 - - PR-- 0/0/0/0/0 0/0 "GET / HTTP/1.1"',
        "apache-auth": f'[Tue Dec 01 10:00:00.000000 2026] [auth_basic:error] [pid 1] [client {victim}:1] AH01617: user u: authentication failure for "/": Password Mismatch',
        "oauth2-proxy": f'{victim} - id - u [2026/12/01 10:00:00] [AuthFailure] Invalid authentication via basic auth',
        "authelia": f'time="2026-12-01T10:00:00Z" level=error msg="Unsuccessful 1FA authentication attempt by user \'u\'" remote_ip={victim}',
    }[name]


def hostile_text(name):
    """Text an attacker controls: forged lines, newlines, quotes, escapes, colons."""
    forged = st.sampled_from(VICTIMS).map(lambda v: forged_line(name, v))
    pieces = st.one_of(
        forged,
        # Whole lines: a forged entry between newlines, or running into the real tail.
        forged.map(lambda line: "\n" + line + "\n"),
        forged.map(lambda line: "\n" + line),
        # What a field without colons can write: the start of an entry naming a victim.
        st.sampled_from(VICTIMS).map(lambda v: f"\n{v} - id - u"),
        st.sampled_from(["\n", "\r", '"', "\\", ":", ", client: 192.0.2.10, server: ", " ", "%0A", "\t",
                         '", host: "h"', "[01/Dec/2026:10:00:00 +0000]", "{", "}", "/", "..", "//"]),
        st.text(min_size=0, max_size=12),
    )
    return st.lists(pieces, max_size=6).map("".join)


# ---------------------------------------------------------------- writers, one per proxy

def _no(text, chars):
    return "".join(c for c in text if c not in chars)


def _nginx_escape(text):
    # ngx_http_log_escape: ", \ and bytes outside printable ASCII become \xHH.
    return "".join(c if 0x20 <= ord(c) < 0x7f and c not in '"\\' else
                   "".join(f"\\x{b:02X}" for b in c.encode()) for c in text)


def _nginx_error_write(message, client, raw_request, referrer, max_bytes=2048):
    last = max_bytes - 1
    entry = f"2026/12/01 10:00:01 [error] 812#812: *7 {message}".encode()
    tail = f', client: {client}, server: _, request: "{raw_request}", host: "example.org"'
    if referrer:
        tail += f', referrer: "{referrer}"'
    return (entry + tail.encode())[:last] + b"\n"


def write_nginx_auth(client, fails, text, text2):
    user = _no(text.split(":")[0], "\0\r")   # nginx splits Basic credentials at the first colon
    referrer = _no(text2, "\0\r\n")
    if fails:
        return _nginx_error_write(f'user "{user}": password mismatch', client, "GET /api/tags HTTP/1.1", referrer)
    # A 404 under the static root sharing the log: the path, decoded, is written raw.
    decoded = "/" + _no(text, "\0\r").replace("//", "/").replace("/.", "/_")
    raw = quote(decoded, safe="/:,@")
    message = f'open() "/var/www/html{decoded}" failed'.encode()
    if len(message) > 2047 - 50 - 28:
        message = message[:2047 - 50 - 28] + b"..."
    message = message.decode("utf-8", "replace") + " (2: No such file or directory)"
    return _nginx_error_write(message, client, f"GET {raw} HTTP/1.1", referrer)


def write_nginx_access(client, fails, text, text2):
    user = _nginx_escape(text.split(":")[0]) or "-"
    status = 401 if fails else 200
    return (f'{client} - {user} [01/Dec/2026:10:00:00 +0000] "GET /{_nginx_escape(text2)} HTTP/1.1" {status} 5 '
            f'"{_nginx_escape(text2)}" "{_nginx_escape(text)}"\n').encode()


def write_caddy(client, fails, text, text2):
    record = {"ts": 1764583200.5, "msg": text, "request": {"remote_ip": client, "uri": text2,
              "headers": {"Authorization": ["REDACTED"], "User-Agent": [text]}}, "status": 401 if fails else 200}
    return (json.dumps(record) + "\n").encode()


def write_traefik(client, fails, text, text2, clf):
    user = text.split(":")[0] or "u"
    if clf:  # Traefik writes the user name raw; a path cannot hold controls or spaces
        path = quote(_no(text2, "\0"), safe="/")
        return (f'{client} - {user} [01/Dec/2026:10:00:00 +0000] "GET /{path} HTTP/1.1" {401 if fails else 200} 5 '
                f'"{_no(text2, chr(10) + chr(13))}" "x" 1 "r" "-" 0ms\n').encode()
    record = {"ClientHost": client, "ClientUsername": user, "DownstreamStatus": 401 if fails else 200,
              "RequestPath": text2, "time": "2026-12-01T10:00:00Z"}
    return (json.dumps(record) + "\n").encode()


def _haproxy_escape(text):
    return "".join(f"#{ord(c):02X}" if ord(c) < 0x20 or c in '"#' or ord(c) > 0x7e else c for c in text)


def write_haproxy(client, fails, text, text2):
    return (f'Dec  1 10:00:00 proxy haproxy[760]: {client}:5555 [01/Dec/2026:10:00:00.000] main main/<NOSRV> '
            f'-1/-1/-1/-1/0 {401 if fails else 200} 5 - - PR-- 0/0/0/0/0 0/0 "GET /{_haproxy_escape(text)} HTTP/1.1"\n').encode()


def _apache_escape(text):
    return "".join(c if 0x20 <= ord(c) < 0x7f and c not in '"\\' else
                   "".join(f"\\x{b:02x}" for b in c.encode()) for c in text)


def write_apache(client, fails, text, text2):
    code = "AH01617" if fails else "AH01797"
    return (f'[Tue Dec 01 10:00:00.000000 2026] [auth_basic:error] [pid 1] [client {client}:1] {code}: '
            f'user {_apache_escape(text)}: authentication failure for "/{_apache_escape(text2)}": Password Mismatch\n').encode()


def write_oauth2(client, fails, text, text2):
    user = text.split(":")[0] or "-"   # from Basic credentials: no colon, written raw
    status = "AuthFailure" if fails else "AuthSuccess"
    return (f'{client} - {_no(text2, chr(10) + chr(13))} - {user} [2026/12/01 10:00:00] [{status}] '
            f'Invalid authentication via basic auth: not in Htpasswd File\n').encode()


def write_authelia(client, fails, text, text2):
    level = "error" if fails else "info"
    message = f"Unsuccessful 1FA authentication attempt by user {json.dumps(text)}"
    return (f'time="2026-12-01T10:00:00Z" level={level} msg={json.dumps(message)} '
            f'error={json.dumps(text2)} remote_ip={client}\n').encode()


WRITERS = {
    "nginx-auth": write_nginx_auth, "nginx-access": write_nginx_access, "caddy-auth": write_caddy,
    "traefik-auth": lambda *a: write_traefik(*a, clf=True), "haproxy-auth": write_haproxy,
    "apache-auth": write_apache, "oauth2-proxy": write_oauth2, "authelia": write_authelia,
}


def entries(name):
    return st.lists(st.tuples(st.sampled_from(CLIENTS), st.booleans(), hostile_text(name), hostile_text(name)),
                    min_size=1, max_size=12)


def read_points(writes, page, draw_cuts):
    """Offsets where a reader may see the file end: after a write, or at a page
    boundary inside one (the kernel copies a write into the file page by page)."""
    points, offset = [], 0
    for write in writes:
        inside = [p for p in range(offset - offset % page + page, offset + len(write), page)]
        points.extend(inside)
        offset += len(write)
        points.append(offset)
    return sorted(set(p for p in points if draw_cuts(p)) | {offset})


class SimulatedFence:
    """policyd.logs.writefence.WriteFence as the kernel would answer for the writes
    below: each is cut by separate write(2) calls here, where the kernel copies
    one write page by page under one inode lock. It ends between writes only
    where a whole write ended."""

    write_ends = set()

    def ends_between_writes(self, fd, offset):
        return offset in self.write_ends and os.fstat(fd).st_size == offset


@pytest.mark.parametrize("fenced", [True, False], ids=["kernel-says", "kernel-cannot-say"])
@pytest.mark.parametrize("name", SHIPPED)
def test_only_real_clients_are_ever_reported(name, fenced, tmp_path, monkeypatch):
    log_filter = load_filter(name)
    # Small pages make cuts inside writes common.
    monkeypatch.setattr(policyd.logs.tail, "PAGE_BYTES", 64)
    monkeypatch.setattr(policyd.logs.writefence, "is_fenced", lambda _fd: fenced)
    monkeypatch.setattr(policyd.logs.tail, "WriteFence", SimulatedFence)

    @LIMITS
    @given(entries(name), st.randoms(use_true_random=False))
    def check(batch, random):
        writes = [WRITERS[name](client, fails, text, text2) for client, fails, text, text2 in batch]
        SimulatedFence.write_ends = set(accumulate(map(len, writes)))
        # The invariant: the server-written client of a real entry. (A request
        # may make its own non-failure look like a failure; it can never name another.)
        real = {ip(c) for c, _, _, _ in batch}
        data = b"".join(writes)
        path = tmp_path / f"{name}.log"
        path.write_bytes(b"")
        follower = LogFollower(str(path), MemoryPositions())
        judge = judge_for(log_filter, clock=lambda: 0.0)
        reported = []
        try:
            with open(path, "ab") as out:
                done = 0
                for point in read_points(writes, 64, lambda _p: random.random() < 0.5):
                    out.write(data[done:point])
                    out.flush()
                    done = point
                    reported += judge.judge(follower.read_lines(), follower.mid_write)
            reported += judge.judge(follower.read_lines(), False)
        finally:
            follower.close()
        for outcome in reported:
            if isinstance(outcome, Failure):
                assert _plain(outcome.host) in real, (outcome, data)
            elif isinstance(outcome, Forgery):
                assert outcome.sender is None or _plain(outcome.sender) in real, outcome
            else:
                assert outcome is Outcome.MALFORMED

    check()


def _plain(address):
    return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address


@pytest.mark.parametrize("name", SHIPPED)
def test_random_bytes_never_raise(name):
    log_filter = load_filter(name)

    @LIMITS
    @given(st.lists(st.binary(max_size=300), max_size=20), st.booleans())
    def check(lines, mid_write):
        for line in lines:
            log_filter.classify(line)
        judge = judge_for(log_filter, clock=lambda: 0.0)
        for outcome in judge.judge(lines, mid_write) + judge.judge([], False):
            assert isinstance(outcome, (Failure, Forgery)) or outcome is Outcome.MALFORMED

    check()


@LIMITS
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0, max_value=3000), max_size=10))
def test_the_follower_returns_exactly_the_complete_lines_whatever_the_split(tmp_path_factory, data, cuts):
    path = tmp_path_factory.mktemp("follow") / "log"
    path.write_bytes(b"")
    follower = LogFollower(str(path), MemoryPositions())
    lines = []
    done = 0
    try:
        with open(path, "ab") as out:
            for cut in sorted(set(min(c, len(data)) for c in cuts)) + [len(data)]:
                out.write(data[done:cut])
                out.flush()
                done = max(done, cut)
                lines += follower.read_lines()
        assert lines == data.split(b"\n")[:-1]
        assert follower.mid_write == (not data.endswith(b"\n") and bool(data)) or \
            os.path.getsize(path) % policyd.logs.tail.PAGE_BYTES == 0
    finally:
        follower.close()
