"""policyd's reading of fail2ban filter.d files: overrides, includes, substitution,
modes, the engine's tags, and what log text an attacker writes cannot do."""
import ipaddress
import os
import textwrap

import pytest

from policyd.errors import InputError
from policyd.logs.fail2ban.config import read_filter
from policyd.logs.fail2ban.engine import load
from policyd.logs.filters import Failure, Outcome, load_filter, scan

ip = ipaddress.ip_address
NOW = 1_780_000_000.0
installed = pytest.mark.skipif(not os.path.isfile("/etc/fail2ban/filter.d/sshd.conf"),
                               reason="Debian's fail2ban is not installed")


def write(directory, name, text):
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def filter_dir(tmp_path):
    write(tmp_path, "base.conf", """
        [DEFAULT]
        _daemon = \\S*
        __prefix = \\s*<_daemon>\\[\\d+\\]:\\s+
        [Definition]
        datepattern = {^LN-BEG}
        """)
    write(tmp_path, "demo.conf", """
        [INCLUDES]
        before = base.conf
        [DEFAULT]
        _daemon = demod
        [Definition]
        prefregex = ^<F-MLFID>%(__prefix)s</F-MLFID><F-CONTENT>.+</F-CONTENT>$
        failregex = ^bad password for <F-USER>\\S+</F-USER> from <HOST>$
                    <mode-<mode>>
                    ^<F-NOFAIL>login ok</F-NOFAIL> for \\S+ from <HOST>$
        mode-normal =
        mode-strict = ^probe from <ADDR>$
        mode = normal
        ignoreregex = ^bad password for trusted from
        """)
    return tmp_path


def lines(flt, *texts):
    return [flt.classify(t.encode()) for t in texts]


def test_includes_defaults_modes_and_tags_resolve(filter_dir):
    definition = read_filter("demo", filter_dir=str(filter_dir))
    assert definition.prefregex.startswith(r"^<F-MLFID>\s*demod\[\d+\]:\s+</F-MLFID>")
    assert len(definition.failregex) == 2            # empty <mode-normal> dropped
    strict = read_filter("demo", {"mode": "strict"}, filter_dir=str(filter_dir))
    assert strict.failregex[1] == "^probe from <ADDR>$"
    assert definition.datepatterns == ("{^LN-BEG}",)


def test_local_and_d_overrides_win_in_fail2bans_order(filter_dir):
    write(filter_dir, "demo.d/10-more.conf", "[Definition]\nmode = strict\n")
    assert read_filter("demo", filter_dir=str(filter_dir)).failregex[1].startswith("^probe")
    write(filter_dir, "demo.local", "[Definition]\nmode = normal\n")
    assert len(read_filter("demo", filter_dir=str(filter_dir)).failregex) == 2
    write(filter_dir, "demo.d/20-last.local", "[Definition]\nmode = strict\n")
    assert read_filter("demo", filter_dir=str(filter_dir)).failregex[1].startswith("^probe")


def test_known_refers_to_the_value_before_an_override(filter_dir):
    write(filter_dir, "demo.local", "[DEFAULT]\n__prefix = X%(known/__prefix)s\n")
    with pytest.raises(InputError):   # DEFAULT has no earlier value of its own
        read_filter("demo", filter_dir=str(filter_dir))
    (filter_dir / "demo.local").unlink()
    write(filter_dir, "demo.local",
          "[Definition]\nignoreregex = %(known/ignoreregex)s\n    ^also ignored\n")
    assert read_filter("demo", filter_dir=str(filter_dir)).ignoreregex == (
        "^bad password for trusted from", "^also ignored")


def test_engine_cuts_the_date_uses_content_ignore_and_nofail(filter_dir):
    flt = load("demo", filter_dir=str(filter_dir), clock=lambda: NOW)
    found, ignored, nofail = lines(
        flt, "Jun  1 10:00:00 demod[12]: bad password for bob from 192.0.2.7",
        "Jun  1 10:00:01 demod[12]: bad password for trusted from 192.0.2.8",
        "Jun  1 10:00:02 demod[13]: login ok for bob from 192.0.2.9")
    assert found == Failure(ip("192.0.2.7"), "fail2ban:demo")
    assert ignored is Outcome.IGNORED and nofail is Outcome.IGNORED


def test_the_prefix_names_the_filters_own_daemon(filter_dir):
    # demo.conf's _daemon (demod) overrides base.conf's catch-all.
    flt = load("demo", filter_dir=str(filter_dir), clock=lambda: NOW)
    assert flt.classify(b"Jun  1 10:00:03 otherd[12]: bad password for bob from 192.0.2.10") \
        is Outcome.IGNORED


def test_the_time_is_the_lines_own(filter_dir):
    flt = load("demo", filter_dir=str(filter_dir), clock=lambda: NOW)
    outcome, when = flt.classify_timed(b"2026-05-01 10:00:00 demod[1]: bad password for x from 192.0.2.7")
    assert isinstance(outcome, Failure)
    assert when is not None and abs(when - NOW) < 60 * 86400


def test_hosts_are_addresses_never_names(filter_dir):
    flt = load("demo", filter_dir=str(filter_dir), clock=lambda: NOW)
    assert flt.classify(b"Jun  1 10:00:00 demod[1]: bad password for x from evil.example.org") \
        is Outcome.IGNORED
    mapped = flt.classify(b"Jun  1 10:00:00 demod[1]: bad password for x from ::ffff:192.0.2.7")
    assert mapped.host == ip("192.0.2.7")


def test_multi_line_filters_match_across_lines_and_consume_what_they_matched(filter_dir):
    write(filter_dir, "multi.conf", textwrap.dedent("""\
        [Definition]
        failregex = ^\\s*\\S+ conn=(?P<_c>\\d+) ACCEPT from <HOST><SKIPLINES>\\s*\\S+ conn=(?P=_c) DENIED$
        maxlines = 4
        datepattern = {^LN-BEG}
        """))
    flt = load("multi", filter_dir=str(filter_dir), clock=lambda: NOW)
    outcomes = [flt.classify(line) for line in (
        b"Jun  1 10:00:00 x conn=1 ACCEPT from 192.0.2.30",
        b"Jun  1 10:00:01 x conn=2 ACCEPT from 192.0.2.31",
        b"Jun  1 10:00:02 x conn=1 DENIED",
        b"Jun  1 10:00:03 x conn=2 DENIED",
        b"Jun  1 10:00:04 x conn=1 DENIED")]
    assert outcomes[:2] == [Outcome.IGNORED, Outcome.IGNORED]
    assert outcomes[2] == Failure(ip("192.0.2.30"), "fail2ban:multi")
    # conn=2's ACCEPT was skipped over, not consumed: it still pairs with its DENIED.
    assert outcomes[3] == Failure(ip("192.0.2.31"), "fail2ban:multi")
    assert outcomes[4] is Outcome.IGNORED          # conn=1's ACCEPT was consumed


def test_multi_line_with_a_prefregex_is_refused_with_the_reason(filter_dir):
    write(filter_dir, "multi.conf", "[Definition]\nprefregex = ^<F-CONTENT>.+</F-CONTENT>$\n"
          "failregex = ^a <HOST>\nmaxlines = 3\n")
    with pytest.raises(InputError, match="maxlines = 3 together with a prefregex"):
        load("multi", filter_dir=str(filter_dir))


def test_hostile_bytes_are_malformed(filter_dir):
    flt = load("demo", filter_dir=str(filter_dir), clock=lambda: NOW)
    for line in (b"Jun  1 10:00:00 demod[1]: bad password for x from 192.0.2.7\x00",
                 b"Jun  1 10:00:00 demod[1]: bad password for \xff from 192.0.2.7",
                 b"Jun  1 10:00:00 demod[1]: bad password for x" + b"y" * 70000 + b" from 192.0.2.7"):
        assert flt.classify(line) is Outcome.MALFORMED


@installed
def test_sshd_user_names_cannot_move_the_address():
    sshd = load_filter("fail2ban:sshd")
    forged = [
        # A user name that carries a whole "from ADDR port N ssh2" tail.
        "Jun  1 10:00:00 box sshd[7]: Failed password for invalid user x from 198.51.100.66 "
        "port 22 ssh2 from 203.0.113.9 port 5000 ssh2",
        "Jun  1 10:00:00 box sshd[7]: Failed password for x from 198.51.100.66 port 22 ssh2"
        " from 203.0.113.9 port 5000 ssh2",
        "Jun  1 10:00:00 box sshd[7]: Invalid user a from 198.51.100.66 from 203.0.113.9 port 5000",
    ]
    for line in forged:
        outcome = sshd.classify(line.encode())
        assert not (isinstance(outcome, Failure) and outcome.host == ip("198.51.100.66")), line


@installed
def test_sshd_bans_from_lines_without_an_address_through_the_connection_cache():
    sshd = load_filter("fail2ban:sshd", mode="aggressive")
    first = sshd.classify(b"Jun  1 10:00:00 box sshd[9]: Connection from 192.0.2.44 port 4 on 10.0.0.1 port 22")
    assert first is Outcome.IGNORED
    later = sshd.classify(b"Jun  1 10:00:01 box sshd[9]: Unable to negotiate a key exchange method")
    assert later == Failure(ip("192.0.2.44"), "fail2ban:sshd")
    other_connection = sshd.classify(b"Jun  1 10:00:02 box sshd[10]: Unable to negotiate a key exchange method")
    assert other_connection is Outcome.IGNORED


@installed
def test_test_filter_counts_like_native_filters(tmp_path):
    log = tmp_path / "auth.log"
    log.write_text("".join(
        f"Jun  1 10:00:0{i} box sshd[7{i}]: Failed password for root from 192.0.2.{i} port 22 ssh2\n"
        for i in range(5)) + "Jun  1 10:00:09 box CRON[1]: session opened\n" + "garbage \xff\n")
    result = scan(load_filter("fail2ban:sshd"), log).to_json()
    assert (result["lines"], result["matched"]) == (7, 5)
    assert result["hosts"] == {f"192.0.2.{i}": 1 for i in range(5)}
    assert result["filter"] == "fail2ban:sshd"


def test_a_failure_carries_its_lines_time_for_the_window(filter_dir):
    flt = load("demo", filter_dir=str(filter_dir), clock=lambda: NOW)
    failure = flt.classify(b"2026-05-01 10:00:00 demod[1]: bad password for x from 192.0.2.7")
    assert failure == Failure(ip("192.0.2.7"), "fail2ban:demo")
    assert failure.time == flt.classify_timed(
        b"2026-05-01 10:00:00 demod[1]: bad password for x from 192.0.2.7")[1]


@installed
@pytest.mark.parametrize("entry, words", [
    ("{path: /var/log/auth.log, filter: 'fail2ban:sshd', mode: bogus}", "mode 'bogus'"),
    ("{path: /var/log/auth.log, filter: 'fail2ban:nosuch'}", "no fail2ban filter"),
])
def test_check_refuses_a_fail2ban_filter_the_daemon_could_not_run(tmp_path, entry, words):
    from click.testing import CliRunner
    from policyd.operator.cli import main
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nservices:\n  p: {ports: [80], allow: any}\n"
                      f"bans:\n  logs:\n    - {entry}\n")
    result = CliRunner().invoke(main, ["check", str(policy)])
    assert result.exit_code == 2
    assert "bans.logs[0].filter" in result.output and words in result.output


def test_a_failregex_without_an_address_is_refused(filter_dir):
    write(filter_dir, "noaddr.conf", "[Definition]\nfailregex = ^login failed for \\S+$\n")
    with pytest.raises(InputError, match="names no address"):
        load("noaddr", filter_dir=str(filter_dir))


def test_the_multi_line_window_stays_small_whatever_the_line_lengths(filter_dir):
    from policyd.logs.fail2ban.multiline import MAX_WINDOW_CHARS
    write(filter_dir, "multi.conf", "[Definition]\nfailregex = ^a <HOST>\\nb$\nmaxlines = 20\n")
    flt = load("multi", filter_dir=str(filter_dir), clock=lambda: NOW)
    for _ in range(20):
        flt.classify(b"x" * 60000)
    assert sum(map(len, flt.window.lines)) <= MAX_WINDOW_CHARS
    assert flt.classify(b"a 192.0.2.40") is Outcome.IGNORED
    assert flt.classify(b"b") == Failure(ip("192.0.2.40"), "fail2ban:multi")
