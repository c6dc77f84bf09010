"""systemd integration without a dependency: sd_notify, the watchdog period,
and journald-friendly logging where one event is one line of key=value pairs
that attacker-controlled text can never split or forge.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys

log = logging.getLogger(__name__)

_warned_notify_failure = False

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
PLAIN_VALUE = re.compile(r'[^\s"\\=]+\Z')
ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

# sd-daemon(3) prefixes: <3> err, <4> warning, <6> info, <7> debug.
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7


def notify(*messages: str) -> bool:
    """Send 'READY=1', 'STATUS=...', 'WATCHDOG=1'... as one datagram to systemd.

    Returns False and does nothing outside systemd (NOTIFY_SOCKET unset).
    Never raises: a failed send is warned about once and reported as False.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        address = "\0" + target[1:]
    elif target.startswith("/"):
        address = target
    else:
        _warn_notify_failure(f"unsupported NOTIFY_SOCKET {target!r}")
        return False
    # A newline inside one message would start a forged assignment.
    payload = "\n".join(" ".join(message.splitlines()) for message in messages).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as exc:
        _warn_notify_failure(f"sd_notify to {target} failed: {exc}")
        return False
    return True


def _warn_notify_failure(message: str) -> None:
    global _warned_notify_failure
    if not _warned_notify_failure:
        _warned_notify_failure = True
        log.warning("%s", message)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's period), or None if not asked."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


def kv(**fields) -> str:
    """key=value pairs on one line; values quoted and escaped when they need it."""
    return " ".join(f"{key}={format_field(key, value)}" for key, value in fields.items())


def event(name: str, **fields) -> str:
    """'ban addr=203.0.113.9 filter=nginx-auth ...': one log event."""
    return f"{name} {kv(**fields)}" if fields else name


def format_field(key: str, value) -> str:
    if not KEY.match(key):
        raise ValueError(f"invalid log field name {key!r}")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = "" if value is None else str(value)
    if PLAIN_VALUE.match(text) and text.isprintable():
        return text
    return '"' + "".join(escape_char(char) for char in text) + '"'


def escape_char(char: str) -> str:
    if char in ESCAPES:
        return ESCAPES[char]
    if char.isprintable():
        return char
    # Control characters and Unicode line/paragraph separators: shown, never obeyed.
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def neutralize(text: str) -> str:
    """Free text on one line: control characters and line breaks escaped, the rest kept."""
    return "".join(char if char.isprintable() or char == "\t" else escape_char(char) for char in text)


def stderr_is_journal(stream=None) -> bool:
    """True when stderr is connected to journald (systemd sets JOURNAL_STREAM=dev:ino)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = expected.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def syslog_priority(levelno: int) -> int:
    for threshold, priority in PRIORITIES:
        if levelno >= threshold:
            return priority
    return DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """'<4>message' for journald, 'WARNING message' for a terminal; one line per event.

    Newlines in the message are escaped; a traceback's lines each carry the
    record's prefix, so no line reaches the journal without its priority.
    """

    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def prefix(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>" if self.journal else f"{record.levelname} "

    def format(self, record: logging.LogRecord) -> str:
        prefix = self.prefix(record)
        lines = [prefix + neutralize(record.getMessage())]
        if record.exc_info:
            lines.extend(prefix + "  " + line for line in self.formatException(record.exc_info).splitlines())
        if record.stack_info:
            lines.extend(prefix + "  " + line for line in record.stack_info.splitlines())
        return "\n".join(lines)


def setup_logging(level=logging.INFO, stream=None) -> logging.Handler:
    """Send the root logger to stderr in the journal's or a terminal's form."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter(journal=stderr_is_journal(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
