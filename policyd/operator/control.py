"""The daemon's control socket, the side every command uses: the wire (one JSON
line in, one JSON line out), its errors, and the client the CLI asks with.

The server (root-only socket, bounded threads) lives in policyd.operator.control_server
and is reachable here by name; importing it costs a CLI command nothing.
"""

import json
import socket
import struct
from pathlib import Path
from collections import namedtuple

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


# A streamed part with bytes (head: dict, data: bytes): sent as {"part": head,
# "bytes": len(data)} and then the bytes as they are, not JSON-escaped (megabytes
# of them for 100k bans). A namedtuple: typing costs every command 4 ms to import.
RawPart = namedtuple("RawPart", "head data")


# The most bytes one raw part may announce; a client refuses more.
MAX_RAW_PART_BYTES = 1 << 28


class Stream:
    """A handler's answer sent in parts, each its own JSON line as soon as it is
    made, between a first line ({"ok": true, "stream": true, "result": head}) and
    a last one ({"end": true}). A client prints part k while the daemon makes
    part k+1; one that stops early only closes the connection."""

    def __init__(self, parts, head=None):
        self.parts = parts
        self.head = head if head is not None else {}


def request(run_dir, command: str, timeout: float = CONNECTION_TIMEOUT, **args):
    """Send one command to the daemon and return its result.

    Raises DaemonUnavailable when no daemon listens, ControlError when it
    refuses (code 1) or calls the input wrong (code 2).
    """
    conn = _send(run_dir, command, timeout, args)
    try:
        line = read_line(conn, timeout)
    finally:
        conn.close()
    return _result(line)[0]


def request_parts(run_dir, command: str, timeout: float = CONNECTION_TIMEOUT, **args):
    """(result, parts) of a command the daemon may answer as a Stream: `result` is
    its head and `parts` an iterator of the parts (which raises ControlError if
    the daemon stops before the end), or `result` is the whole answer and `parts`
    None. Raises as request() does before anything is read."""
    conn = _send(run_dir, command, timeout, args)
    lines = conn.makefile("rb")
    try:
        result, streamed = _result(_next_line(lines, timeout))
    except BaseException:
        lines.close()
        conn.close()
        raise
    if not streamed:
        lines.close()
        conn.close()
        return result, None
    return result, _parts(conn, lines, timeout)


def _parts(conn, lines, timeout):
    try:
        while True:
            message = _decoded(_next_line(lines, timeout))
            if message.get("end") is True:
                return
            if "part" not in message:
                raise ControlError("the daemon sent an unreadable answer", CODE_REFUSED)
            if "bytes" not in message:
                yield message["part"]
                continue
            size = message["bytes"]
            if not isinstance(size, int) or not 0 <= size <= MAX_RAW_PART_BYTES:
                raise ControlError("the daemon sent an unreadable answer", CODE_REFUSED)
            yield RawPart(message["part"], _read_exactly(lines, size, timeout))
    finally:
        lines.close()
        conn.close()


def _read_exactly(lines, size, timeout) -> bytes:
    try:
        data = lines.read(size)
    except socket.timeout as exc:
        raise ControlError(f"the daemon did not answer within {timeout:g}s", CODE_REFUSED) from exc
    except ConnectionResetError:
        data = b""
    if len(data) != size:
        raise ControlError("the daemon closed the connection without answering", CODE_REFUSED)
    return data


def _send(run_dir, command, timeout, args) -> socket.socket:
    """A connection with the request sent (a refusal may already wait to be read)."""
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
        try:
            conn.sendall(encode({"command": command, "args": args}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a refusal may already be waiting to be read
    except socket.timeout as exc:
        conn.close()
        raise ControlError(f"the daemon did not answer within {timeout:g}s", CODE_REFUSED) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _decoded(line):
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ControlError("the daemon sent an unreadable answer", CODE_REFUSED) from exc
    if not isinstance(message, dict):
        raise ControlError("the daemon sent an unreadable answer", CODE_REFUSED)
    return message


def _result(line):
    """(result, whether parts follow) of the daemon's first line, or its refusal."""
    response = _decoded(line)
    if response.get("ok") is True:
        return response.get("result"), response.get("stream") is True
    code = response.get("code")
    if code not in (CODE_REFUSED, CODE_BAD_INPUT):
        code = CODE_REFUSED
    error = response.get("error")
    if not isinstance(error, str):
        raise ControlError("the daemon sent an unreadable answer", CODE_REFUSED)
    raise ControlError(one_line(error), code)


def _next_line(lines, timeout) -> bytes:
    try:
        line = lines.readline()
    except socket.timeout as exc:
        raise ControlError(f"the daemon did not answer within {timeout:g}s", CODE_REFUSED) from exc
    except ConnectionResetError:
        line = b""
    if not line.endswith(b"\n"):
        raise ControlError("the daemon closed the connection without answering", CODE_REFUSED)
    return line


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
    end = data.find(b"\n")
    if end < 0:
        raise ControlError("the daemon closed the connection without answering", CODE_REFUSED)
    return data[:end]
