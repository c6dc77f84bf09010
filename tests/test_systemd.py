"""systemd glue (sd_notify datagrams, the watchdog period) and the journald-friendly
log lines of policyd.logfmt."""

import io
import sys
import logging
import os
import socket
import uuid

import pytest

from policyd import systemd
from policyd.logfmt import JournalFormatter, event, kv, setup_logging, stderr_is_journal
from policyd.systemd import notify, watchdog_interval


@pytest.fixture
def notify_receiver(tmp_path, monkeypatch):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    receiver.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    yield receiver
    receiver.close()


@pytest.fixture(autouse=True)
def fresh_warning_state(monkeypatch):
    monkeypatch.setattr(systemd, "_warned_notify_failure", False)


def test_notify_sends_one_datagram(notify_receiver):
    assert notify("READY=1", "STATUS=following 3 logs") is True
    assert notify_receiver.recv(4096) == b"READY=1\nSTATUS=following 3 logs"
    assert notify("WATCHDOG=1") is True
    assert notify_receiver.recv(4096) == b"WATCHDOG=1"


def test_notify_to_abstract_socket(monkeypatch):
    name = f"policyd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1") is True
        assert receiver.recv(4096) == b"STOPPING=1"


def test_newline_inside_a_message_cannot_forge_an_assignment(notify_receiver):
    assert notify("STATUS=banned x\nREADY=1") is True
    assert notify_receiver.recv(4096) == b"STATUS=banned x READY=1"


def test_notify_without_systemd_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_notify_failure_warns_once_and_never_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="policyd.systemd"):
        assert notify("READY=1") is False
        assert notify("WATCHDOG=1") is False
    warnings = [record for record in caplog.records if record.name == "policyd.systemd"]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0].getMessage()


def test_notify_refuses_unknown_socket_kinds(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify("READY=1") is False


@pytest.mark.parametrize("usec, pid, expected", [
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),
    ("30000000", "junk", None),
    ("0", None, None),
    ("", None, None),
    ("-5", None, None),
    ("10s", None, None),
    (None, "self", None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert watchdog_interval() == expected


def test_kv_plain_values_stay_plain():
    assert event("ban", addr="203.0.113.9", filter="nginx-auth", failures=5, duration="3600s") == \
        "ban addr=203.0.113.9 filter=nginx-auth failures=5 duration=3600s"
    assert kv(ipv6="2001:db8::/64", manual=True, note=None) == 'ipv6=2001:db8::/64 manual=true note=""'


@pytest.mark.parametrize("value, rendered", [
    ("two words", '"two words"'),
    ('say "hi"', r'"say \"hi\""'),
    ("back\\slash", r'"back\\slash"'),
    ("a=b", '"a=b"'),
    ("", '""'),
    ("line\nban addr=192.0.2.1 filter=x", r'"line\nban addr=192.0.2.1 filter=x"'),
    ("cr\rtab\t", r'"cr\rtab\t"'),
    ("bell\x07", r'"bell\x07"'),
    ("sep\u2028next\x85", r'"sep\u2028next\x85"'),
    (b"raw\xff", r'"raw\\xff"'),
])
def test_kv_quotes_and_escapes(value, rendered):
    text = kv(user=value)
    assert text == f"user={rendered}"
    assert len(text.splitlines()) == 1


def test_kv_refuses_bad_keys():
    with pytest.raises(ValueError):
        kv(**{"a b": 1})


def record(level, message, *args):
    return logging.LogRecord("policyd", level, __file__, 1, message, args, None)


def test_formatter_for_the_journal():
    formatter = JournalFormatter(journal=True)
    assert formatter.format(record(logging.WARNING, "ban %s", "addr=203.0.113.9")) == "<4>ban addr=203.0.113.9"
    assert formatter.format(record(logging.INFO, "ready")) == "<6>ready"
    assert formatter.format(record(logging.ERROR, "x")) == "<3>x"
    assert formatter.format(record(logging.CRITICAL, "x")) == "<2>x"
    assert formatter.format(record(logging.DEBUG, "x")) == "<7>x"


def test_formatter_for_a_terminal():
    formatter = JournalFormatter(journal=False)
    assert formatter.format(record(logging.WARNING, "ban addr=203.0.113.9")) == "WARNING ban addr=203.0.113.9"
    assert formatter.format(record(logging.INFO, "ready")) == "INFO ready"


def test_formatter_keeps_every_event_on_one_line():
    formatter = JournalFormatter(journal=True)
    assert formatter.format(record(logging.INFO, "user %s", "x\n<3>ban addr=192.0.2.1")) == \
        r"<6>user x\n<3>ban addr=192.0.2.1"


def test_formatter_prefixes_every_traceback_line():
    formatter = JournalFormatter(journal=True)
    try:
        raise RuntimeError("kernel said no")
    except RuntimeError:
        failed = logging.LogRecord("policyd", logging.ERROR, __file__, 1, "apply failed", (),
                                   sys.exc_info())
    lines = formatter.format(failed).splitlines()
    assert lines[0] == "<3>apply failed"
    assert len(lines) > 2
    assert all(line.startswith("<3>  ") for line in lines[1:])
    assert lines[-1] == "<3>  RuntimeError: kernel said no"


def test_journal_detected_only_when_stderr_is_that_stream(tmp_path, monkeypatch):
    with open(tmp_path / "stderr", "w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert stderr_is_journal(stream) is True
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
        assert stderr_is_journal(stream) is False
        monkeypatch.setenv("JOURNAL_STREAM", "junk")
        assert stderr_is_journal(stream) is False
        monkeypatch.delenv("JOURNAL_STREAM")
        assert stderr_is_journal(stream) is False


def test_setup_logging_with_and_without_journal(tmp_path, monkeypatch):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        with open(tmp_path / "journal", "w+") as stream:
            info = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
            setup_logging(logging.INFO, stream)
            logging.getLogger("policyd.daemon.core").warning(event("ban", addr="203.0.113.9", failures=5))
            logging.getLogger("policyd.daemon.core").debug("hidden below INFO")
            stream.seek(0)
            assert stream.read() == "<4>ban addr=203.0.113.9 failures=5\n"
        monkeypatch.delenv("JOURNAL_STREAM")
        terminal = io.StringIO()
        setup_logging(logging.DEBUG, terminal)
        logging.getLogger("policyd.daemon.core").debug("tail: opened error.log")
        assert terminal.getvalue() == "DEBUG tail: opened error.log\n"
        assert len(root.handlers) == 1
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
