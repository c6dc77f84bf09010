"""Filters: every shipped filter against its annotated sample, loader errors, hostile bytes, scan counts."""
import ipaddress
import json
from pathlib import Path

import pytest
import yaml

from policyd.errors import InputError
from policyd.logs.filters import MAX_LINE_BYTES, Failure, Outcome, load_filter, scan
from policyd.logs.guard import failures_from, judge_for

SAMPLES = Path(__file__).parent / "samples"
FILTERS = Path(__file__).parent.parent / "filters"
SHIPPED = ["nginx-auth", "nginx-access", "caddy-auth", "traefik-auth",
           "haproxy-auth", "apache-auth", "oauth2-proxy", "authelia"]
EXPECT = b"# expect: "


def annotated_lines(path):
    """(line number, expectation, raw log line) for every annotated line; comments are stripped."""
    cases, expectation = [], None
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if raw.startswith(EXPECT):
            expectation = json.loads(raw[len(EXPECT):])
        elif raw.startswith(b"#") or (not raw and expectation is None):
            continue
        elif expectation is not None:
            cases.append((number, expectation, raw))
            expectation = None
    return cases


def test_every_shipped_filter_has_a_file_and_a_sample():
    assert sorted(p.stem for p in FILTERS.glob("*.yaml")) == sorted(SHIPPED)
    assert sorted(p.stem for p in SAMPLES.glob("*.log")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_sample_lines_classify_as_annotated(name):
    log_filter = load_filter(name)
    cases = annotated_lines(SAMPLES / f"{name}.log")
    kinds = {"match": 0, "nomatch": 0, "malformed": 0}
    for number, expected, line in cases:
        outcome = log_filter.classify(line)
        where = f"{name}.log:{number}: {line[:120]!r}"
        if expected.get("malformed"):
            kinds["malformed"] += 1
            assert outcome is Outcome.MALFORMED, where
        elif expected["match"]:
            kinds["match"] += 1
            assert isinstance(outcome, Failure), f"{where} -> {outcome}"
            assert (outcome.host, outcome.filter) == (ipaddress.ip_address(expected["host"]), name), \
                f"{where} -> {outcome}"
            # Every proxy writes its time: the failure window uses it (issue 10, point 4).
            assert outcome.time is not None, f"{where}: no time read"
        else:
            kinds["nomatch"] += 1
            assert not isinstance(outcome, Failure), f"{where} -> {outcome}"
    assert all(kinds.values()), f"{name} sample lacks a kind of line: {kinds}"


@pytest.mark.parametrize("name", SHIPPED)
def test_samples_cover_ipv6_and_mapped_ipv4_and_never_ban_injected_addresses(name):
    cases = annotated_lines(SAMPLES / f"{name}.log")
    hosts = [ipaddress.ip_address(e["host"]) for _, e, _ in cases if e.get("match")]
    assert any(h.version == 6 for h in hosts)
    assert any(b"::ffff:" in line for _, e, line in cases if e.get("match"))
    # 203.0.113.9x is the injected address in every sample: it is never the expected host.
    assert not any(str(h).startswith("203.0.113.9") for h in hosts)
    assert any(b"203.0.113.9" in line for _, _, line in cases)


def _every_line_variant(name, tmp_path):
    """The shipped filter with its rules' `contains` removed: no prefilter, so
    every line is a candidate (as in a filter an operator writes without it)."""
    data = yaml.safe_load((FILTERS / f"{name}.yaml").read_text())
    for rule in data["rules"]:
        rule.pop("contains", None)
    path = tmp_path / f"{name}-every-line.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_filter(str(path))


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("variant", ["shipped", "without contains"])
def test_scan_agrees_with_classify_on_the_sample(name, variant, tmp_path):
    log_filter = load_filter(name) if variant == "shipped" else _every_line_variant(name, tmp_path)
    cases = annotated_lines(SAMPLES / f"{name}.log")
    log = tmp_path / "sample.log"
    log.write_bytes(b"\n".join(line for _, _, line in cases) + b"\n")
    result = scan(log_filter, log)
    outcomes = [log_filter.classify(line) for _, _, line in cases]
    assert result.lines == len(cases)
    assert result.matched == sum(isinstance(o, Failure) for o in outcomes)
    assert result.malformed == sum(o is Outcome.MALFORMED for o in outcomes)
    assert result.ignored == sum(o is Outcome.IGNORED for o in outcomes)


def _is_subsequence(part, whole):
    rest = iter(whole)
    return all(any(item == other for other in rest) for item in part)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("variant", ["shipped", "without contains"])
def test_the_daemons_path_agrees_with_classify_on_the_sample(name, variant, tmp_path):
    # What test-filter and explain say a line is must be what the daemon bans:
    # its bulk path, slice by slice, against classify() line by line.
    log_filter = load_filter(name) if variant == "shipped" else _every_line_variant(name, tmp_path)
    assert bool(log_filter.prefilter) == (variant == "shipped")
    lines = [line for _, _, line in annotated_lines(SAMPLES / f"{name}.log")]
    outcomes = [log_filter.classify(line) for line in lines]
    expected = [o for o in outcomes if isinstance(o, Failure)]
    assert expected
    for size in (1, 3, len(lines)):
        judge = judge_for(log_filter)
        failures, malformed, dropped = [], 0, 0
        for at in range(0, len(lines), size):
            found, bad, forgeries = failures_from(judge, lines[at:at + size])
            failures += found
            malformed += bad
            dropped += sum(forgery.dropped for _before, forgery in forgeries)
        assert malformed == outcomes.count(Outcome.MALFORMED), size
        # The guard may drop lines a request wrote into another entry; nothing else.
        assert len(failures) + dropped == len(expected), size
        assert _is_subsequence(failures, expected), size
        assert not dropped or log_filter.guard, size


NGINX_FAIL = (b'2024/05/01 10:00:01 [error] 1#1: *1 user "a": password mismatch, client: 192.0.2.1, '
              b'server: , request: "GET / HTTP/1.1", host: "h"')


def test_classify_tolerates_a_trailing_newline():
    assert load_filter("nginx-auth").classify(NGINX_FAIL + b"\n").host == ipaddress.ip_address("192.0.2.1")


@pytest.mark.parametrize("junk", [
    b"\x00\x01\x02\xff\xfe" * 40,
    NGINX_FAIL.replace(b"user", b"us\x00er"),
    b'2024/05/01 10:00:01 [error] 1#1: *1 user "a": password mismatch, client: \xff\xfe, server: ',
    b'2024/05/01 10:00:01 [error] 1#1: *1 user "\xff": password mismatch, cl\xffient: 192.0.2.1',
    NGINX_FAIL + b" " + b"A" * MAX_LINE_BYTES,
])
def test_hostile_bytes_are_malformed(junk):
    assert load_filter("nginx-auth").classify(junk) is Outcome.MALFORMED


def test_non_utf8_user_name_still_bans_the_real_client():
    line = NGINX_FAIL.replace(b'user "a"', b'user "\xff\xfe"')
    assert load_filter("nginx-auth").classify(line).host == ipaddress.ip_address("192.0.2.1")


def test_json_filter_junk_is_malformed_and_never_raises():
    caddy = load_filter("caddy-auth")
    for line in [b'{"status":401', b'["status":401]', b'{"status":401,"request":{"remote_ip":5,"headers":{"Authorization":[]}}}',
                 b'{"status":401}' + b"\xff", b"[" * 100000 + b'"status":401']:
        assert caddy.classify(line) is Outcome.MALFORMED, line[:60]


def test_json_true_is_not_status_1():
    rule_file = FILTERS / "traefik-auth.yaml"
    log_filter = load_filter(str(rule_file))
    line = b'{"ClientHost":"192.0.2.1","ClientUsername":"a","DownstreamStatus":true,"x":"\\"DownstreamStatus\\":401"}'
    assert log_filter.classify(line) is Outcome.IGNORED


def write_filter(tmp_path, text, name="custom"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, line, key, words", [
    ("rules:\n  - regex: '^(?P<host>\\S+) x'\n    colour: red\n", 3, "rules[0].colour", "unknown key"),
    ("descripton: x\nrules:\n  - regex: '^(?P<host>\\S+)'\n", 1, "descripton", "unknown key"),
    ("rules:\n  - contains: [x]\n    regex: '^(\\S+) fail'\n", 3, "rules[0].regex", "(?P<host>"),
    ("rules:\n  - regex: '^(?P<host>[0-9'\n", 2, "rules[0].regex", "bad regex"),
    ("rules:\n  - regex: '(?P<host>\\S+) fail'\n", 2, "rules[0].regex", "anchored"),
    ("rules: []\n", 1, "rules", "at least one rule"),
    ("description: x\n", 1, "rules", "missing"),
    ("rules:\n  - json:\n      match: {status: 401}\n", 3, "rules[0].json.host", "missing"),
    ("rules:\n  - json:\n      host: [a]\n      match: {status: {x: 1}}\n", 4, "rules[0].json.match.status", "scalar"),
    ("rules:\n  - json: {host: [a]}\n    regex: '^(?P<host>x)'\n", 2, "rules[0]", "exactly one"),
    ("rules:\n  - regex: '^(?P<host>x)'\nignore:\n  - 'no anchor'\n", 4, "ignore[0]", "anchored"),
    ("rules:\n  - regex: '^(?P<host>x)'\nrules: []\n", 3, "rules", "duplicate"),
])
def test_loader_errors_name_file_line_and_key(tmp_path, text, line, key, words):
    path = write_filter(tmp_path, text)
    with pytest.raises(InputError) as raised:
        load_filter(str(path))
    message = str(raised.value)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert words in message


def test_bad_yaml_names_the_line(tmp_path):
    path = write_filter(tmp_path, "rules:\n  - regex: [unclosed\n")
    with pytest.raises(InputError) as raised:
        load_filter(str(path))
    assert str(raised.value.file) == str(path) and raised.value.line == 3


def test_lookup_by_name_searches_dirs_in_order(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    write_filter(second, "rules:\n  - regex: '^(?P<host>\\S+) second'\n", name="mine")
    assert load_filter("mine", [first, second]).classify(b"192.0.2.5 second").host == ipaddress.ip_address("192.0.2.5")
    write_filter(first, "rules:\n  - regex: '^(?P<host>\\S+) first'\n", name="mine")
    assert load_filter("mine", [first, second]).classify(b"192.0.2.5 second") is Outcome.IGNORED


@pytest.mark.parametrize("name", ["no-such-filter", "../etc/passwd", ".hidden"])
def test_unknown_or_unsafe_names_are_input_errors(name, tmp_path):
    with pytest.raises(InputError):
        load_filter(name, [tmp_path])


def test_ignore_regex_wins_over_a_rule(tmp_path):
    path = write_filter(tmp_path, "rules:\n  - contains: [fail]\n    regex: '^(?P<host>\\S+) fail'\n"
                                  "ignore:\n  - '^\\S+ fail for healthcheck'\n")
    log_filter = load_filter(str(path))
    assert isinstance(log_filter.classify(b"192.0.2.1 fail for alice"), Failure)
    assert log_filter.classify(b"192.0.2.1 fail for healthcheck") is Outcome.IGNORED


def test_json_host_with_port_and_precedence(tmp_path):
    path = write_filter(tmp_path, "rules:\n  - json:\n      match: {s: [401, 403]}\n      host: [a, b]\n")
    log_filter = load_filter(str(path))
    assert log_filter.classify(b'{"s":403,"b":"[2001:db8::1]:80"}').host == ipaddress.ip_address("2001:db8::1")
    assert log_filter.classify(b'{"s":401,"a":"192.0.2.1","b":"192.0.2.2:1"}').host == ipaddress.ip_address("192.0.2.1")
    assert log_filter.classify(b'{"s":401,"a":"","b":"192.0.2.2:1"}').host == ipaddress.ip_address("192.0.2.2")
    assert log_filter.classify(b'{"s":401,"a":"192.0.2.1:99999"}') is Outcome.MALFORMED
    assert log_filter.classify(b'{"s":200,"a":"192.0.2.1"}') is Outcome.IGNORED


def test_scan_counts_a_generated_file(tmp_path):
    fail = NGINX_FAIL
    other = b'2024/05/01 10:00:01 [info] 1#1: *2 no user/password was provided for basic authentication, client: 192.0.2.9, server: '
    v6 = fail.replace(b"192.0.2.1", b"2001:db8::5")
    mapped = fail.replace(b"192.0.2.1", b"::ffff:192.0.2.1")
    body = [fail, other, v6, b"", mapped, b"\x00junk", fail.replace(b"192.0.2.1", b"192.0.2.300")] * 50
    huge = b"x" * (MAX_LINE_BYTES * 3)
    log = tmp_path / "error.log"
    log.write_bytes(b"\n".join(body) + b"\n" + huge + b"\n" + fail)  # last line without newline
    result = scan(load_filter("nginx-auth"), log)
    assert (result.lines, result.matched, result.ignored, result.malformed) == (352, 151, 100, 101)
    assert result.hosts == {"192.0.2.1": 101, "2001:db8::5": 50}
    report = result.to_json()
    assert set(report) == {"lines", "matched", "ignored", "malformed", "forged", "hosts", "seconds",
                           "lines_per_second", "filter", "file"}
    assert report["filter"] == "nginx-auth" and report["file"] == str(log)
    json.dumps(report)


def test_scan_fast_path_spans_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("policyd.logs.filters.READ_CHUNK_BYTES", 1000)
    other = b'2024/05/01 10:00:01 [error] 1#1: *2 open() "/x" failed (2: No such file or directory), client: 192.0.2.9'
    log = tmp_path / "error.log"
    log.write_bytes((NGINX_FAIL + b"\n" + other + b"\n") * 200)
    result = scan(load_filter("nginx-auth"), log)
    assert (result.lines, result.matched, result.ignored, result.malformed) == (400, 200, 200, 0)


def test_scan_of_a_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        scan(load_filter("nginx-auth"), tmp_path / "absent.log")
