"""policyd.logs.guard: lines a request writes into another entry never count for whom they name.

The nginx entries here are built byte for byte the way nginx 1.22 writes them
(tests/netns/test_forged_lines.py checks the same forms against real nginx).
"""
import ipaddress
from urllib.parse import quote

import pytest

from policyd.logs.filters import Failure, Outcome, load_filter, scan
from policyd.logs.guard import Forgery, NginxErrorJudge, judge_for, nginx_sender

ip = ipaddress.ip_address
ROOT = "/var/www/html"
VICTIM = "192.0.2.10"
ATTACKER = "203.0.113.5"


def auth_failure(client, user="ollama", connection=5, clock="2026/12/01 10:00:00", referrer=None):
    line = (f'{clock} [error] 812#812: *{connection} user "{user}": password mismatch, '
            f'client: {client}, server: localhost, request: "GET /api/tags HTTP/1.1", host: "localhost"')
    return line + (f', referrer: "{referrer}"' if referrer else "")


def nginx_404(decoded_path, raw_path, client=ATTACKER, connection=9, referrer=None, max_bytes=2048):
    """The bytes of one write nginx makes for a 404 under a static root, truncated
    as ngx_log_error_core truncates (the errno reserve of 50 bytes, then the tail)."""
    last = max_bytes - 1
    message = f'2026/12/01 10:00:01 [error] 812#812: *{connection} open() "{ROOT}{decoded_path}" failed'.encode()
    if len(message) > last - 50:
        message = message[:last - 50] + b"..."
    entry = message + b" (2: No such file or directory)"
    tail = f', client: {client}, server: _, request: "GET {raw_path} HTTP/1.1", host: "example.org"'
    if referrer is not None:
        tail += f', referrer: "{referrer}"'
    entry = (entry + tail.encode())[:last]
    return entry + b"\n"


def forging(text, newline="%0A"):
    """A request path that decodes to `text`, and that path as nginx decodes and writes it."""
    return text, quote(text, safe="/:,@").replace("%0A", newline)


def lines_of(*writes):
    return b"".join(writes).split(b"\n")[:-1]


def failures(results):
    return [r.host for r in results if isinstance(r, Failure)]


def forgeries(results):
    return [r for r in results if isinstance(r, Forgery)]


@pytest.fixture
def nginx_auth():
    return load_filter("nginx-auth")


def judge(log_filter, lines, mid_write=False):
    return judge_for(log_filter).judge(lines, mid_write)


FORMS = {
    "trailing-newline": "/\n" + auth_failure(VICTIM) + "\n",
    "no-trailing-newline": "/\n" + auth_failure(VICTIM),
    "four-lines": "/\n" + "\n".join(auth_failure(v, connection=n) for n, v in
                                      enumerate([VICTIM, "192.0.2.11", "2001:db8::1", "::ffff:192.0.2.12"])) + "\n",
    "ipv6": "/\n" + auth_failure("2001:db8:1::10") + "\n",
    "dressed-head-and-tail": '/x" failed (2: No such file or directory), client: 192.0.2.99, server: _, '
                             'request: "GET /x HTTP/1.1", host: "localhost"\n' + auth_failure(VICTIM) + "\n"
                             + auth_failure("192.0.2.11", referrer="x"),
    "tail-is-a-whole-entry": "/\n" + auth_failure(VICTIM) + "\n" + auth_failure("192.0.2.11") + ", x",
}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("newline", ["%0A", "%0a"])
def test_no_forged_line_counts_and_the_request_counts_against_its_sender(nginx_auth, form, newline):
    decoded, raw = forging(FORMS[form], newline)
    write = nginx_404(decoded, raw)
    lines = lines_of(write)
    assert len(lines) >= 2
    # Without the guard the forged lines are failures of whom they name: the attack is real.
    assert any(isinstance(nginx_auth.classify(line), Failure) for line in lines)
    results = judge(nginx_auth, lines)
    assert failures(results) == []
    [forgery] = forgeries(results)
    assert forgery.sender == ip(ATTACKER) and forgery.dropped >= 1
    assert forgery.failure() == Failure(ip(ATTACKER), "nginx-auth")


def test_the_real_attacker_stays_countable_between_forgeries(nginx_auth):
    decoded, raw = forging(FORMS["four-lines"])
    lines = lines_of(nginx_404(decoded, raw), (auth_failure(ATTACKER) + "\n").encode(),
                     nginx_404(decoded, raw), (auth_failure(ATTACKER) + "\n").encode())
    results = judge(nginx_auth, lines)
    assert failures(results) == [ip(ATTACKER), ip(ATTACKER)]
    assert [f.sender for f in forgeries(results)] == [ip(ATTACKER), ip(ATTACKER)]


def test_a_tail_cut_off_by_nginx_truncation_still_drops_the_write(nginx_auth):
    padding = "/".join(["q" * 200] * 12)
    decoded, raw = forging("/" + padding[:900] + "\n" + auth_failure(VICTIM) + "\n" + padding)
    write = nginx_404(decoded, raw)
    assert len(write) == 2048 and b"%0A" not in write
    before = (auth_failure(ATTACKER) + "\n").encode()
    results = judge(nginx_auth, lines_of(before, write))
    assert failures(results) == [ip(ATTACKER)]   # the line before the write still counts
    [forgery] = forgeries(results)
    assert forgery.reason == "truncated" and forgery.sender is None and forgery.dropped == 1


def test_a_cut_inside_the_raw_request_after_a_quote_is_caught_too(nginx_auth):
    forged = "\n" + auth_failure(VICTIM) + "\n"
    # nginx takes a raw quote in the request line as it is.
    decoded, raw = '/' + '"' * 700 + forged + "b" * 400, '/' + '"' * 700 + forging(forged)[1] + "b" * 400
    write = nginx_404(decoded, raw)
    assert len(write) == 2048 and write.endswith(b'"\n')
    assert failures(judge(nginx_auth, lines_of(write))) == []


def test_a_failure_read_mid_write_waits_for_the_rest_of_the_write(nginx_auth):
    decoded, raw = forging(FORMS["trailing-newline"])
    lines = lines_of(nginx_404(decoded, raw))
    now = [0.0]
    guard = NginxErrorJudge(nginx_auth, clock=lambda: now[0], hold_seconds=1.0)
    # The follower read up to a page boundary, just after the forged line.
    assert guard.judge(lines[:2], mid_write=True) == []
    assert guard.holding
    results = guard.judge(lines[2:])
    assert failures(results) == [] and forgeries(results)[0].sender == ip(ATTACKER)


def test_a_held_genuine_failure_is_released_after_the_hold(nginx_auth):
    now = [0.0]
    guard = NginxErrorJudge(nginx_auth, clock=lambda: now[0], hold_seconds=1.0)
    line = auth_failure(ATTACKER).encode()
    assert guard.judge([line], mid_write=True) == []
    assert guard.release_in() == 1.0, "the daemon's loop wakes when it is due"
    now[0] = 0.5
    assert guard.judge([], mid_write=True) == []
    assert guard.release_in() == 0.5
    now[0] = 1.0
    assert failures(guard.judge([], mid_write=True)) == [ip(ATTACKER)]
    assert not guard.holding and guard.release_in() is None


def test_a_flood_read_in_slices_is_banned_slice_by_slice_keeping_only_the_last_write(nginx_auth):
    # A flood read 500 lines at a time ends each read at a page boundary (mid_write):
    # only failures a forging line still to come could drop (those within
    # entry_max_bytes of the end) may wait, and only those may be remembered.
    guard = judge_for(nginx_auth, clock=lambda: 0.0)
    lines = [auth_failure(ATTACKER, connection=n).encode() for n in range(5000)]
    released = 0
    for start in range(0, len(lines), 500):
        released += len(failures(guard.judge(lines[start:start + 500], mid_write=True)))
        kept = len(guard._recent) + len(guard._held)
        assert kept * len(lines[0]) < 2 * 2048, f"{kept} lines kept after {start + 500}"
    assert released >= len(lines) - 2048 // len(lines[0]) - 1
    assert len(failures(guard.judge([]))) + released == len(lines)


def test_genuine_failures_pass_at_once_when_no_write_is_cut(nginx_auth):
    lines = [auth_failure(ATTACKER, connection=n).encode() for n in range(5)]
    guard = judge_for(nginx_auth)
    assert failures(guard.judge(lines)) == [ip(ATTACKER)] * 5
    assert not guard.holding


def test_a_brute_forcer_hiding_behind_an_encoded_newline_is_counted_once_per_request(nginx_auth):
    # Its own failure line carries %0A (in the raw request): not a failure line, but
    # evidence against the sender the tail names.
    line = auth_failure(ATTACKER).replace("GET /api/tags", "GET /%0A").encode()
    results = judge(nginx_auth, [line])
    assert failures(results) == [] and forgeries(results)[0].sender == ip(ATTACKER)


def test_decoy_tails_in_the_path_or_referrer_make_the_sender_unknown_not_wrong(nginx_auth):
    decoy = f', client: {VICTIM}, server: _, request: "GET /%0A HTTP/1.1", host: "h"'
    decoded, raw = forging("/\n" + auth_failure(VICTIM) + "\n")
    write = nginx_404(decoded, raw, referrer="x" + decoy)
    results = judge(nginx_auth, lines_of(write))
    assert failures(results) == []
    assert [f.sender for f in forgeries(results)] in ([ip(ATTACKER)], [None])
    # A decoy before the real tail explains less of the line than the real one.
    decoded, raw = forging("/\n" + auth_failure(VICTIM) + "\nq" + decoy.replace("%0A", "%250A"))
    results = judge(nginx_auth, lines_of(nginx_404(decoded, raw)))
    assert failures(results) == []
    assert [f.sender for f in forgeries(results)] in ([ip(ATTACKER)], [None])


def test_nginx_sender_reads_the_real_tail_through_merged_slashes_and_dot_segments():
    decoded = "/x/../\n" + auth_failure(VICTIM).replace("/", "//") + "\nrest"
    raw = quote("/x/..//" + decoded[7:], safe="/:,@")
    line = nginx_404(decoded.replace("//", "/"), raw).split(b"\n")[-2]
    assert line.startswith(b"rest")
    assert nginx_sender(line) == ip(ATTACKER)


def test_an_encoded_newline_in_the_query_alone_is_not_evidence(nginx_auth):
    line = auth_failure(ATTACKER).replace("GET /api/tags", "GET /?q=a%0Ab").encode()
    results = judge(nginx_auth, [auth_failure("192.0.2.30").encode(), line])
    # Nothing was forged (nginx decodes paths only) and nobody is blamed; both
    # failures are whole entries and count (dropping the lines before it was the
    # brute-forcer's way to hide its own: tests/test_guard_evasion.py).
    assert failures(results) == [ip("192.0.2.30"), ip(ATTACKER)] and forgeries(results) == []


def test_scan_agrees_with_the_daemon(nginx_auth, tmp_path):
    writes = [(auth_failure(ATTACKER) + "\n").encode()]
    for form in sorted(FORMS):
        decoded, raw = forging(FORMS[form])
        writes += [nginx_404(decoded, raw), (auth_failure(ATTACKER) + "\n").encode()]
    padding = "/".join(["q" * 200] * 12)
    decoded, raw = forging("/" + padding[:900] + "\n" + auth_failure(VICTIM) + "\n" + padding)
    writes.append(nginx_404(decoded, raw))
    log = tmp_path / "error.log"
    log.write_bytes(b"".join(writes) * 3)
    result = scan(nginx_auth, log)
    daemon_view = judge(nginx_auth, lines_of(*writes * 3))
    assert result.hosts == {ATTACKER: len(failures(daemon_view))}
    assert result.matched == len(failures(daemon_view)) == 3 * (1 + len(FORMS))
    assert result.forged == sum(f.dropped for f in forgeries(daemon_view))


# ---------------------------------------------------------------- continuation

CLF = '{client} - {user} [01/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1" 401 17 "-" "curl" 1 "r" "-" 0ms'


def test_traefik_clf_user_name_lines_never_count(tmp_path):
    traefik = load_filter("traefik-auth")
    # Traefik writes the user name raw; a Basic user name holds no colon, so the
    # lines it writes hold no time: `a\n192.0.2.10 - x [01/Dec/2026 10\n198.51.100.10 - b`.
    entry = CLF.format(client=ATTACKER, user=f"a\n{VICTIM} - x [01/Dec/2026 10\n198.51.100.10 - b")
    lines = [CLF.format(client="192.0.2.40", user="alice").encode(), *entry.encode().split(b"\n")]
    assert [isinstance(traefik.classify(line), Failure) for line in lines] == [True, False, False, True]
    results = judge(traefik, lines)
    assert failures(results) == [ip("192.0.2.40")]
    assert [(f.sender, f.dropped) for f in forgeries(results)] == [(ip(ATTACKER), 1)]
    log = tmp_path / "access.log"
    log.write_bytes(b"\n".join(lines) + b"\n")
    assert (scan(traefik, log).matched, scan(traefik, log).forged) == (1, 1)


def test_traefik_json_lines_stay_whole():
    traefik = load_filter("traefik-auth")
    line = (b'{"ClientHost":"192.0.2.41","ClientUsername":"u","DownstreamStatus":401,'
            b'"time":"2026-12-01T10:00:00Z"}')
    assert failures(judge(traefik, [line, line])) == [ip("192.0.2.41")] * 2


def test_oauth2_proxy_user_name_lines_never_count():
    oauth2 = load_filter("oauth2-proxy")
    forged = f"{VICTIM} - id - u [2026/12/01 10"   # a user name holds no colon
    lines = f"{ATTACKER} - id - a\n{forged}\n198.51.100.10 - id - b [2026/12/01 10:00:01] " \
            f"[AuthFailure] Invalid authentication via basic auth: not in Htpasswd File".encode().split(b"\n")
    results = judge(oauth2, lines)
    assert failures(results) == []
    assert {f.sender for f in forgeries(results)} == {ip(ATTACKER)}


def test_unguarded_filters_judge_line_by_line():
    caddy = load_filter("caddy-auth")
    line = (b'{"ts":1764583200.5,"request":{"remote_ip":"192.0.2.42","headers":{"Authorization":[]}},'
            b'"status":401}')
    [failure] = judge(caddy, [line, b"junk"])
    assert failure == Failure(ip("192.0.2.42"), "caddy-auth", 1764583200.5)
    assert judge(caddy, [b'{"status":401']) == [Outcome.MALFORMED]
