"""The daemon's control socket, the side every command uses: the wire (one JSON
line in, one JSON line out), its errors, and the client the CLI asks with.

The server (root-only socket, bounded threads) lives in policyd.control_server
and is reachable here by name; importing it costs a CLI command nothing.
"""

import json
import socket
import struct
from pathlib import Path
from typing import Any

from policyd.errors import PolicydError

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 64 * 1024
CONNECTION_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
PERMISSION_DENIED = "permission denied: the control socket is root's"

CODE_REFUSED = 1
CODE_BAD_INPUT = 2


class DaemonUnavailable(Exception):
    """No daemon answers on the control socket; the CLI works without it."""


class ControlError(PolicydError):
    """The daemon answered with an error; `code` is the CLI's exit code.

    A handler may raise it too, to refuse with a chosen code and message.
    """

    def __init__(self, message: str, code: int = CODE_REFUSED):
        super().__init__(message)
        self.code = self.exit_code = code


def socket_path(run_dir) -> Path:
    return Path(run_dir) / SOCKET_NAME


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(run_dir, command: str, timeout: float = CONNECTION_TIMEOUT, **args) -> Any:
    """Send one command to the daemon and return its result.

    Raises DaemonUnavailable when no daemon listens, ControlError when it
    refuses (code 1) or calls the input wrong (code 2).
    """
    path = socket_path(run_dir)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout)
    try:
        try:
            conn.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise DaemonUnavailable(f"no policyd daemon at {path}") from exc
        except PermissionError as exc:
            raise ControlError(PERMISSION_DENIED, CODE_REFUSED) from exc
        except socket.timeout as exc:
            raise ControlError(f"the daemon did not answer within {timeout:g}s", CODE_REFUSED) from exc
        try:
            conn.sendall(encode({"command": command, "args": args}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a refusal may already be waiting to be read
        except socket.timeout as exc:
            raise ControlError(f"the daemon did not answer within {timeout:g}s", CODE_REFUSED) from exc
        line = read_line(conn, timeout)
    finally:
        conn.close()
    try:
        response = json.loads(line)
        if response.get("ok") is True:
            return response.get("result")
        code = response.get("code")
        if code not in (CODE_REFUSED, CODE_BAD_INPUT):
            code = CODE_REFUSED
        raise ControlError(one_line(response["error"]), code)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ControlError("the daemon sent an unreadable answer", CODE_REFUSED) from exc


def read_line(conn: socket.socket, timeout: float) -> bytes:
    chunks = []
    try:
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\n" in chunk:
                break
    except socket.timeout as exc:
        raise ControlError(f"the daemon did not answer within {timeout:g}s", CODE_REFUSED) from exc
    except ConnectionResetError:
        pass
    data = b"".join(chunks)
    if b"\n" not in data:
        raise ControlError("the daemon closed the connection without answering", CODE_REFUSED)
    return data.split(b"\n", 1)[0]


_SERVER_NAMES = ("ControlServer", "MainLoopCall", "Handler")


def __getattr__(name):
    """control.ControlServer and friends, imported when first asked for."""
    if name in _SERVER_NAMES:
        from policyd import control_server
        return getattr(control_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
