"""The bulk paths agree with the per-line path, also where an attacker who read them would aim.

`policyd test-filter` (policyd.logs.scan) reads a log in slices and searches them
whole; the daemon (policyd.logs.guard, Filter.classify_batch) classifies a slice of
lines at once. Both must count exactly what the daemon's per-line judge counts
over the same bytes: the same failures for the same hosts, the same forged
lines dropped, wherever a slice boundary falls.
"""
import ipaddress
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_forged_line_guard import ATTACKER, VICTIM, auth_failure, forging, nginx_404

from policyd.logs import filters
from policyd.logs.filters import MAX_LINE_BYTES, Failure, Outcome, load_filter
from policyd.logs.filterbulk import failures_in_lines
from policyd.logs.guard import Forgery, failures_from, judge_for
from policyd.logs.scan import scan

NGINX_AUTH = load_filter("nginx-auth")


def per_line(log_filter, data):
    """What the daemon's judge counts reading `data` (whole lines) from its start."""
    lines = data.split(b"\n")[:-1]
    counts = {"lines": len(lines), "matched": 0, "malformed": 0, "forged": 0, "hosts": {}}
    for outcome in judge_for(log_filter).judge(lines):
        if isinstance(outcome, Forgery):
            counts["forged"] += outcome.dropped
        elif outcome is Outcome.MALFORMED:
            counts["malformed"] += 1
        elif isinstance(outcome, Failure):
            counts["matched"] += 1
            host = str(outcome.host)
            counts["hosts"][host] = counts["hosts"].get(host, 0) + 1
    counts["ignored"] = counts["lines"] - counts["matched"] - counts["malformed"] - counts["forged"]
    return counts


def scanned(log_filter, path, chunk):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("policyd.logs.filters.READ_CHUNK_BYTES", chunk)
        result = scan(log_filter, path)
    return {"lines": result.lines, "matched": result.matched, "malformed": result.malformed,
            "forged": result.forged, "hosts": result.hosts, "ignored": result.ignored}


def line(text):
    return (text + "\n").encode()


PADDING = "/".join(["q" * 200] * 12)


def truncated_write(victim=VICTIM):
    decoded, raw = forging("/" + PADDING[:900] + "\n" + auth_failure(victim) + "\n" + PADDING)
    return nginx_404(decoded, raw)


def encoded_write(victim=VICTIM):
    decoded, raw = forging("/\n" + auth_failure(victim) + "\n" + auth_failure("198.51.100.20") + "\n")
    return nginx_404(decoded, raw)


PIECES = [
    line(auth_failure(ATTACKER)),
    line(auth_failure("2001:db8::5", user="x")),
    line(auth_failure("::ffff:192.0.2.12")),
    line(auth_failure("192.0.2.300")),                    # not an address: malformed
    line('2026/12/01 10:00:00 [info] 812#812: *3 no user/password was provided for basic '
         'authentication, client: 192.0.2.9, server: localhost, request: "GET / HTTP/1.1", '
         'host: "localhost"'),
    line('2026/12/01 10:00:00 [error] 812#812: *4 open() "/var/www/html/x" failed (2: No such '
         'file or directory), client: 192.0.2.9, server: _, request: "GET /x HTTP/1.1", host: "a"'),
    line(auth_failure(ATTACKER, user="\xe9t\xe9")),      # UTF-8 in the user name
    b"\xff\xfe password mismatch \xff\n",                  # a token, no match, not UTF-8
    b"2026/12/01 10:00:00 [error] 1#1: *1 user \"\xff\": password mismatch, client: 192.0.2.7, "
    b"server: localhost, request: \"GET / HTTP/1.1\", host: \"localhost\"\n",
    b"junk \x00 password mismatch\n",                      # NUL: malformed
    b"\n",
    line(auth_failure(VICTIM, user='a", client: 198.51.100.7, server: x')),   # a decoy client field
    line(auth_failure(VICTIM, referrer="x, client: 198.51.100.8, server: y")),
    encoded_write(),
    truncated_write(),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(range(len(PIECES))), min_size=1, max_size=60),
       chunk=st.integers(min_value=64, max_value=9000))
def test_scan_counts_what_the_per_line_judge_counts(tmp_path, pieces, chunk):
    data = b"".join(PIECES[i] for i in pieces)
    log = tmp_path / "error.log"
    log.write_bytes(data)
    assert scanned(NGINX_AUTH, log, chunk) == per_line(NGINX_AUTH, data)


def shifted(tmp_path, head, body):
    """The log `body` after `head` bytes of whole ignored lines."""
    filler = b""
    while len(filler) < head:
        filler += b"x" * min(80, max(1, head - len(filler) - 1)) + b"\n"
    data = filler + body
    log = tmp_path / "error.log"
    log.write_bytes(data)
    return log, data


@pytest.mark.parametrize("write", [encoded_write(), truncated_write()], ids=["encoded", "truncated"])
@pytest.mark.parametrize("cut, step", [("slices", 41), ("processes", 97)])
def test_a_forging_write_is_judged_wherever_a_slice_or_process_boundary_falls(tmp_path, write,
                                                                              cut, step):
    # Genuine failures, then the forging write, slid over every place a slice
    # can end, or (each process counting the lines starting in its part) a part.
    body = line(auth_failure(ATTACKER)) * 3 + write + line(auth_failure("198.51.100.30"))
    for head in range(0, 4300, step):
        log, data = shifted(tmp_path, head, body)
        expected = per_line(NGINX_AUTH, data)
        assert expected["forged"] >= 1 and expected["hosts"] == {ATTACKER: 3, "198.51.100.30": 1}
        found = (scanned(NGINX_AUTH, log, 512) if cut == "slices"
                 else scanned_in_parts(NGINX_AUTH, log, 512, 2))
        assert found == expected, head


def test_a_failure_line_split_across_reads_counts_once(tmp_path):
    body = b"".join(line(auth_failure(f"192.0.2.{n}", connection=n)) for n in range(1, 40))
    for head in range(0, 700, 7):
        log, data = shifted(tmp_path, head, body)
        result = scanned(NGINX_AUTH, log, 256)
        assert result == per_line(NGINX_AUTH, data)
        assert result["matched"] == 39


def test_hosts_count_right_when_the_host_cache_is_cleared_mid_scan(tmp_path, monkeypatch):
    # The bulk path counts host texts it found good in filters' host cache,
    # which is cleared whole when full; a bad host text stays bad when it
    # comes back in a later slice, whether the cache still holds it or not.
    body = b"".join(line(auth_failure(f"198.51.100.{n}", connection=n)) for n in range(1, 50))
    bad = line(auth_failure("192.0.2.300"))
    log = tmp_path / "error.log"
    log.write_bytes(body + bad + body + bad + body)
    monkeypatch.setattr("policyd.logs.filters._HOST_CACHE_LIMIT", 16)
    filters._HOST_CACHE.clear()
    result = scanned(NGINX_AUTH, log, 600)
    assert result == per_line(NGINX_AUTH, log.read_bytes())
    assert result["matched"] == 147 and result["malformed"] == 2 and len(result["hosts"]) == 49


def test_an_over_long_line_between_slices_is_one_malformed_line(tmp_path):
    body = (line(auth_failure(ATTACKER)) + b"y" * (MAX_LINE_BYTES + 10) + b"\n" + encoded_write()
            + line(auth_failure(ATTACKER)))
    log = tmp_path / "error.log"
    log.write_bytes(body)
    result = scanned(NGINX_AUTH, log, 4096)
    assert (result["lines"], result["matched"], result["malformed"]) == (body.count(b"\n"), 2, 1)
    assert result["forged"] >= 1


LINE_PARTS = st.sampled_from([
    b"password mismatch", b"was not found in", b"\xff", b"\x00", b" client: ", b"192.0.2.1",
    b", server: ", b"2001:db8::1", b'"', b"%0A", b"x" * 50, b"\n",
    b"2026/12/01 10:00:00 [error] 1#1: *1 user \"u\"",
    b'2026/12/01 10:00:00 [info] 1#1: *2 no user/password was provided for basic authentication, ',
])


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.one_of(st.lists(LINE_PARTS, max_size=8).map(b"".join),
                                st.sampled_from([p.rstrip(b"\n") for p in PIECES])), max_size=30))
def test_classify_batch_is_classify_line_by_line(lines):
    expected = [(i, o) for i, o in enumerate(map(NGINX_AUTH.classify, lines)) if o is not Outcome.IGNORED]
    got = NGINX_AUTH.classify_batch(lines)
    assert got == expected
    assert [getattr(o, "time", None) for _, o in got] == [getattr(o, "time", None) for _, o in expected]


def test_classify_batch_on_an_over_long_candidate_line_is_malformed():
    long = auth_failure(ATTACKER).encode() + b" " * MAX_LINE_BYTES
    assert NGINX_AUTH.classify_batch([long]) == [(0, Outcome.MALFORMED)]


def test_a_failure_is_the_tuple_the_ban_engine_reads():
    failure = NGINX_AUTH.classify(line(auth_failure(ATTACKER)))
    host, name, when = failure
    assert (host, name) == (ipaddress.ip_address(ATTACKER), "nginx-auth") and when is not None
    assert failure == Failure(host, name, None) and hash(failure) == hash(Failure(host, name))
    with pytest.raises(AttributeError):
        failure.host = None


@pytest.mark.parametrize("chunk", [512, 5000])
def test_a_log_read_from_a_pipe_counts_what_a_file_counts(tmp_path, chunk):
    import threading
    data = b"".join(PIECES) * 3 + b"y" * (MAX_LINE_BYTES + 5) + b"\n" + b"".join(PIECES) + PIECES[0][:-1]
    log = tmp_path / "error.log"
    log.write_bytes(data)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_bytes, args=(data,))
    writer.start()
    try:
        from_pipe = scanned(NGINX_AUTH, pipe, chunk)
    finally:
        writer.join()
    assert from_pipe == scanned(NGINX_AUTH, log, chunk)
    assert from_pipe["malformed"] >= 1 and from_pipe["forged"] >= 1


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.one_of(st.lists(LINE_PARTS.filter(lambda p: p not in (b"\x00", b"\n")),
                                         max_size=8).map(b"".join),
                                st.sampled_from([p.rstrip(b"\n") for p in PIECES if b"\x00" not in p]),
                                st.just(line(auth_failure(ATTACKER)).rstrip(b"\n"))), max_size=40),
       head=st.integers(min_value=0, max_value=3))
def test_classify_region_is_classify_line_by_line(lines, head):
    buffer = b"x\n" * head + b"".join(part + b"\n" for part in lines)
    starts, position = [], 2 * head
    for part in buffer[2 * head:].split(b"\n")[:-1]:
        starts.append(position)
        position += len(part) + 1
    expected_failures, expected_malformed = [], 0
    for start in starts:
        text = buffer[start:buffer.index(b"\n", start)]
        outcome = NGINX_AUTH.classify(text)
        if outcome is Outcome.MALFORMED:
            expected_malformed += 1
        elif isinstance(outcome, Failure):
            expected_failures.append((start, start + len(text), outcome.host))
    failures, malformed = NGINX_AUTH.classify_region(buffer, 2 * head, len(buffer))
    assert (sorted(failures), malformed) == (expected_failures, expected_malformed)


CLEAN = [line(auth_failure(host, connection=n)).rstrip(b"\n") for n, host in
         enumerate([ATTACKER, VICTIM, "2001:db8::7", "::ffff:192.0.2.13"])] + [b"", b"other text"]


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.one_of(st.sampled_from(CLEAN), st.lists(LINE_PARTS, max_size=6).map(b"".join)),
                      max_size=30))
def test_the_daemons_c_loop_path_is_classify_line_by_line(lines):
    expected, offset = [], 0
    for text in lines:
        outcome = NGINX_AUTH.classify(text)
        if outcome is not Outcome.IGNORED:
            expected.append((offset, outcome, getattr(outcome, "time", None)))
        offset += len(text) + 1
    fast = failures_in_lines(NGINX_AUTH, lines)
    if all(text in CLEAN for text in lines):
        assert fast is not None   # the common case takes the C loops
    if fast is not None:
        offsets, failures = fast
        assert [(o, f, f.time) for o, f in zip(offsets, failures)] == expected


def test_the_host_cache_filling_up_mid_slice_loses_no_failure(monkeypatch):
    # The cache is cleared whole when full; a slice of new hosts that fills it must
    # still get each line's own address (and take the C-loop path).
    monkeypatch.setattr(filters, "_HOST_CACHE_LIMIT", 50)
    filters._HOST_CACHE.clear()
    lines = [line(auth_failure(f"198.51.100.{n}", connection=n)).rstrip(b"\n") for n in range(200)]
    fast = failures_in_lines(NGINX_AUTH, lines)
    assert fast is not None
    assert fast[1] == [NGINX_AUTH.classify(text) for text in lines]
    filters._HOST_CACHE.clear()


def test_a_guarded_filter_without_contains_bans_in_the_daemon(tmp_path):
    # Without `contains` a filter has no prefilter: every line is a candidate.
    # The daemon's C-loop path found no candidate and so no failure at all,
    # while test-filter (and classify) found them.
    custom = tmp_path / "no-contains.yaml"
    custom.write_text(
        "rules:\n"
        "  - regex: '^(?P<time>\\d{4}/\\d\\d/\\d\\d \\d\\d:\\d\\d:\\d\\d) \\[error\\] \\d+#\\d+: \\*\\d+ "
        "user \"[^:]*\": password mismatch, client: (?P<host>[0-9A-Fa-f:.]+), server: '\n"
        "    time_format: '%Y/%m/%d %H:%M:%S'\n"
        "guard:\n  kind: nginx-error\n  entry_max_bytes: 2048\n")
    log_filter = load_filter(str(custom))
    assert log_filter.prefilter == ()
    lines = [line(auth_failure(ATTACKER, connection=n)).rstrip(b"\n") for n in range(3)]
    expected = [log_filter.classify(text) for text in lines]
    assert all(isinstance(outcome, Failure) for outcome in expected)
    failures, malformed, forgeries = failures_from(judge_for(log_filter), lines)
    assert failures == expected and not malformed and not forgeries


def test_a_slice_read_in_two_keeps_only_its_last_write_droppable():
    judge = judge_for(NGINX_AUTH)
    lines = [line(auth_failure(ATTACKER, connection=n)).rstrip(b"\n") for n in range(40)]
    decoded, raw = forging("/\n" + auth_failure(VICTIM) + "\n")
    forged = nginx_404(decoded, raw).split(b"\n")[:-1]
    first = judge.judge(lines + forged[:1], mid_write=True)
    second = judge.judge(forged[1:], mid_write=False)
    everything = first + second
    assert [f.host for f in everything if isinstance(f, Failure)] == [ipaddress.ip_address(ATTACKER)] * 40
    assert [f.sender for f in everything if isinstance(f, Forgery)] == [ipaddress.ip_address(ATTACKER)]


def scanned_in_parts(log_filter, path, chunk, workers):
    """scanned() by `workers` processes, whatever the file's size."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("policyd.logs.filters.READ_CHUNK_BYTES", chunk)
        patch.setattr("policyd.logs.scanparts.PARALLEL_BYTES", 1)
        patch.setattr("policyd.logs.scanparts.MAX_WORKERS", workers)
        result = scan(log_filter, path, workers=None)
    return {"lines": result.lines, "matched": result.matched, "malformed": result.malformed,
            "forged": result.forged, "hosts": result.hosts, "ignored": result.ignored}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(range(len(PIECES))), min_size=1, max_size=60),
       chunk=st.integers(min_value=64, max_value=9000), workers=st.integers(min_value=2, max_value=4))
def test_a_scan_in_processes_counts_what_one_process_counts(tmp_path, pieces, chunk, workers):
    # Each process counts the lines starting in its part and reads the guard's
    # context across the cut: forged lines near a cut are dropped as in one process.
    data = b"".join(PIECES[i] for i in pieces)
    log = tmp_path / "error.log"
    log.write_bytes(data)
    assert scanned_in_parts(NGINX_AUTH, log, chunk, workers) == per_line(NGINX_AUTH, data)


def test_a_log_ending_without_a_newline_or_in_an_over_long_line_counts_so_in_processes(tmp_path):
    log = tmp_path / "error.log"
    for tail in (line(auth_failure("198.51.100.31"))[:-1], b"y" * (MAX_LINE_BYTES + 10)):
        data = line(auth_failure(ATTACKER)) * 40 + b"y" * (MAX_LINE_BYTES + 10) + b"\n" + tail
        log.write_bytes(data)
        assert scanned_in_parts(NGINX_AUTH, log, 4096, 2) == scanned(NGINX_AUTH, log, 4096)


def test_a_part_whose_child_fails_is_scanned_by_the_parent(tmp_path):
    from policyd.logs import scanparts
    data = b"".join(line(auth_failure(f"192.0.2.{n}", connection=n)) for n in range(1, 60)) + encoded_write()
    log = tmp_path / "error.log"
    log.write_bytes(data)
    parent, real = os.getpid(), scanparts.scan

    def failing_children(scan_part, parts, result, hosts):
        def part(first, stop, result, hosts):
            if os.getpid() != parent:
                raise RuntimeError("a child that dies")
            return scan_part(first, stop, result, hosts)
        return real(part, parts, result, hosts)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scanparts, "scan", failing_children)
        assert scanned_in_parts(NGINX_AUTH, log, 512, 3) == per_line(NGINX_AUTH, data)
