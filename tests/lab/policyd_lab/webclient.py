"""A raw HTTP/1.1 client that runs from a lab host's namespace.

Owns what tests and benchmarks send to the proxies: one request per connection,
a keep-alive connection that carries many, a raw request sent byte for byte,
and a SYN probe that tells whether a source is let through at all.
"""
import base64
import errno
import select
import socket
import struct
from urllib.parse import urlsplit


def _family(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def open_connection(host, address, port, timeout=1.0, source=None):
    """A TCP socket from `host`'s namespace to address:port (optionally bound to `source`), or None."""
    sock = host.socket(_family(address))
    sock.settimeout(timeout)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect((address, port))
    except OSError:
        sock.close()
        return None
    return sock


def _request(path, hostname, auth, keep_alive):
    lines = [f"GET {path} HTTP/1.1", f"Host: {hostname}", "User-Agent: policyd-tests",
             "Accept: */*", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        lines.append(f"Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Response:
    """Reads exactly one HTTP/1.1 response so the connection can carry the next one."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed mid-response")
        self.buffer += data

    def _line(self):
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, count):
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def read(self):
        """(status, body); raises OSError/ValueError when no whole response arrives."""
        status = int(self._line().split(b" ", 2)[1])
        headers = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._exactly(size)
                self._line()
            while self._line():  # trailers
                pass
        else:
            body = self._exactly(int(headers.get(b"content-length", b"0")))
        return status, body


def _hostname(address, port):
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def http_get(host, url, auth=None, timeout=1.0, sock=None, source=None):
    """GET url from `host`'s namespace; the status code, or None if no whole response came.

    auth is (user, password) for Basic auth. With `sock` the request goes over that
    open connection and leaves it open; otherwise a new connection is made (from
    `source` if given) and closed.
    """
    parts = urlsplit(url)
    address, port = parts.hostname, parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    own = sock is None
    if own:
        sock = open_connection(host, address, port, timeout, source)
        if sock is None:
            return None
    try:
        sock.settimeout(timeout)
        sock.sendall(_request(path, _hostname(address, port), auth, keep_alive=not own))
        return _Response(sock).read()[0]
    except (OSError, ValueError, IndexError):
        return None
    finally:
        if own:
            sock.close()


class KeepAlive:
    """One TCP connection to a proxy, reused for every request (HTTP/1.1 keep-alive).

    It never reconnects: once the connection is cut, every get() returns None, so a
    test can tell that a ban ended an already-open connection.
    """

    def __init__(self, host, address, port, timeout=1.0, source=None):
        self.address, self.port, self.timeout = address, port, timeout
        self.sock = open_connection(host, address, port, timeout, source)
        if self.sock is None:
            raise ConnectionError(f"cannot connect to {address}:{port} from {host.name}")
        self.local_address = self.sock.getsockname()[0]
        self.reader = _Response(self.sock)
        self.broken = False

    def get(self, path, auth=None, timeout=None):
        if self.broken:
            return None
        try:
            self.sock.settimeout(timeout or self.timeout)
            self.sock.sendall(_request(path, _hostname(self.address, self.port), auth, True))
            return self.reader.read()[0]
        except (OSError, ValueError, IndexError):
            self.broken = True
            return None

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def syn_answered(host, address, port, timeout, source=None, sock=None):
    """Whether a SYN from `host` (from `source`) to address:port gets a SYN-ACK within timeout.

    `sock`, an unused socket made in host's namespace beforehand, saves the cost of
    entering the namespace when probing every millisecond. The socket is reset
    right after, so the server sees no request and keeps no state.
    """
    sock = sock or host.socket(_family(address))
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if source is not None:
            sock.bind((source, 0))
        if sock.connect_ex((address, port)) not in (0, errno.EINPROGRESS):
            return False
        _, writable, _ = select.select([], [sock], [], timeout)
        return bool(writable) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    finally:
        sock.close()


def raw_request(host, address, port, request, timeout=2.0, source=None):
    """Send `request` (bytes, sent as is) over a new connection; the status code or None."""
    sock = open_connection(host, address, port, timeout, source)
    if sock is None:
        return None
    try:
        sock.settimeout(timeout)
        sock.sendall(request)
        return _Response(sock).read()[0]
    except (OSError, ValueError, IndexError):
        return None
    finally:
        sock.close()
