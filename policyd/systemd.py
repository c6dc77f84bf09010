"""systemd integration without a dependency: sd_notify and the watchdog period.

The key=value log lines journald receives are policyd.logfmt's.
"""

import logging
import os
import socket

log = logging.getLogger(__name__)

_warned_notify_failure = False


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
