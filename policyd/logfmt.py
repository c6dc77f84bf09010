"""Log lines as journald and operators read them: one event per line, key=value
pairs that attacker-controlled text can never split or forge, with the
syslog priority prefix when stderr is the journal.
"""

import logging
import os
import re
import sys

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
PLAIN_VALUE = re.compile(r'[^\s"\\=]+\Z')
ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

# sd-daemon(3) prefixes: <3> err, <4> warning, <6> info, <7> debug.
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7


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
