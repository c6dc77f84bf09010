"""Real reverse proxies in front of a stand-in Ollama, inside lab namespaces.

Owns the pieces the ban-engine tests, the benchmarks and the demo share: a
stand-in Ollama on 127.0.0.1:11434, nginx (auth_basic) and Caddy (basicauth)
configured to write only into a work directory, and a small raw HTTP/1.1
client that runs from a client namespace and can hold a keep-alive connection.
Run as a script (`proxies.py ollama-standin PORT`) it is the stand-in itself.
"""
import base64
import errno
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from netlab import wait_for

OLLAMA_PORT = 11434
DEFAULT_USERS = {"ollama": "secret"}
START_TIMEOUT = 10.0


class ProxyUnavailable(RuntimeError):
    """The proxy binary is missing or cannot run here; tests skip with this reason."""


# --- stand-in Ollama --------------------------------------------------------

class _OllamaHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 so nginx and Caddy may keep their upstream connections open.
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/api/tags":
            self._reply(200, {"models": []})
        else:
            self._reply(404, {"error": "not found"})

    def _reply(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def serve_ollama_standin(port):
    server = ThreadingHTTPServer(("127.0.0.1", port), _OllamaHandler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


def start_ollama_standin(host, port=OLLAMA_PORT):
    """A stand-in Ollama answering GET /api/tags on 127.0.0.1:port in `host`'s namespace."""
    proc = host.popen(sys.executable, str(Path(__file__).resolve()), "ollama-standin", str(port),
                      stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"stand-in Ollama on {host.name}:{port} did not start")
    return proc


# --- proxies ---------------------------------------------------------------

def _listening(host, port):
    out = host.exec("ss", "-Hltn", f"sport = :{port}", check=False).stdout
    return bool(out.strip())


def _wait_listening(host, proc, port, name, log):
    ready = wait_for(lambda: proc.poll() is not None or _listening(host, port),
                     timeout=START_TIMEOUT)
    if proc.poll() is not None or not ready:
        detail = Path(log).read_text(errors="replace")[-2000:] if Path(log).exists() else ""
        raise RuntimeError(f"{name} in {host.name} did not listen on {port} "
                           f"(exit {proc.poll()}): {detail}")


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Nginx:
    def __init__(self, host, workdir, conf, proc, listen_port):
        self.host = host
        self.workdir = workdir
        self.conf = conf
        self.proc = proc
        self.port = listen_port
        self.error_log = workdir / "error.log"
        self.access_log = workdir / "access.log"

    def _signal(self, name):
        self.host.exec("nginx", "-p", str(self.workdir), "-e", str(self.error_log),
                       "-c", str(self.conf), "-s", name)

    def reopen(self):
        """`nginx -s reopen` (logrotate's postrotate), returning once every nginx process
        writes to the new files, so a request right after cannot land in the old one."""
        self._signal("reopen")
        if not wait_for(self._logs_reopened, timeout=START_TIMEOUT):
            raise RuntimeError(f"nginx in {self.host.name} did not reopen its logs")

    def _pids(self):
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [self.proc.pid, *map(int, children.read_text().split())]

    def _logs_reopened(self):
        current = {str(self.error_log), str(self.access_log), str(self.workdir / "stderr.log")}
        for pid in self._pids():
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except FileNotFoundError:
                    continue
                if target.startswith(f"{self.workdir}/") and target not in current:
                    return False
        return True

    def stop(self):
        _stop(self.proc)


NGINX_CONF = """\
# Written by tests/netns/proxies.py: everything nginx writes stays in {work}.
user root;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log {level};

events {{
    worker_connections 1024;
}}

http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    # Long enough that a keep-alive test, not nginx, decides when a connection ends.
    keepalive_timeout 300s;
    keepalive_requests 100000;

    server {{
        listen {port};
        listen [::]:{port};
        server_name localhost;
        location / {{
            auth_basic "Ollama API Access";
            auth_basic_user_file {work}/htpasswd;
            proxy_pass http://127.0.0.1:{upstream};
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            client_max_body_size 100M;
        }}
    }}
}}
"""


def start_nginx(host, workdir, listen_port=8080, users=None, upstream_port=OLLAMA_PORT,
                error_log_level="info"):
    """nginx with auth_basic on listen_port (IPv4 and IPv6) proxying to 127.0.0.1:upstream_port.

    error_log_level "info" also logs the credential-less first request (which is
    not a failure); "error" is Debian's default and logs only the failures.
    """
    for tool in ("nginx", "htpasswd"):
        if shutil.which(tool) is None:
            raise ProxyUnavailable(f"`{tool}` is not installed (make setup installs nginx-light, apache2-utils)")
    work = Path(workdir).resolve()
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    htpasswd = work / "htpasswd"
    for n, (user, password) in enumerate((users or DEFAULT_USERS).items()):
        create = ["-c"] if n == 0 else []
        subprocess.run(["htpasswd", *create, "-B", "-b", str(htpasswd), user, password],
                       check=True, capture_output=True)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=listen_port, upstream=upstream_port,
                                      level=error_log_level))
    # -e: nginx opens its error log before reading the config; keep even that in work.
    with open(work / "stderr.log", "wb") as stderr:
        proc = host.popen("nginx", "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf),
                          "-g", "daemon off;", stdout=subprocess.DEVNULL, stderr=stderr)
    _wait_listening(host, proc, listen_port, "nginx", work / "stderr.log")
    return Nginx(host, work, conf, proc, listen_port)


class Caddy:
    def __init__(self, host, workdir, proc, listen_port):
        self.host = host
        self.workdir = workdir
        self.proc = proc
        self.port = listen_port
        self.access_log = workdir / "caddy-access.log"

    def stop(self):
        _stop(self.proc)


CADDYFILE = """\
# Written by tests/netns/proxies.py: everything Caddy writes stays in {work}.
{{
	admin off
	auto_https off
	storage file_system {{
		root {work}/data
	}}
}}

http://:{port} {{
	log {{
		output file {work}/caddy-access.log
		format json
	}}
	basicauth {{
{users}
	}}
	reverse_proxy 127.0.0.1:{upstream}
}}
"""


def start_caddy(host, workdir, listen_port=8081, users=None, upstream_port=OLLAMA_PORT):
    """Caddy with basicauth on listen_port proxying to 127.0.0.1:upstream_port, JSON access log."""
    if shutil.which("caddy") is None:
        raise ProxyUnavailable("`caddy` is not installed (make setup installs it)")
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(work), XDG_DATA_HOME=str(work / "data"),
               XDG_CONFIG_HOME=str(work / "config"))
    lines = []
    for user, password in (users or DEFAULT_USERS).items():
        hashed = subprocess.run(["caddy", "hash-password", "--plaintext", password], env=env,
                                check=True, capture_output=True, text=True).stdout.strip()
        lines.append(f"\t\t{user} {hashed}")
    caddyfile = work / "Caddyfile"
    caddyfile.write_text(CADDYFILE.format(work=work, port=listen_port, upstream=upstream_port,
                                          users="\n".join(lines)))
    stderr_path = work / "caddy-stderr.log"
    with open(stderr_path, "wb") as stderr:
        proc = host.popen("caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile",
                          stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=str(work))
    try:
        _wait_listening(host, proc, listen_port, "caddy", stderr_path)
    except RuntimeError as exc:
        raise ProxyUnavailable(f"caddy cannot run in a namespace here: {exc}") from exc
    return Caddy(host, work, proc, listen_port)


# --- HTTP client from a client namespace ------------------------------------

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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "ollama-standin":
        serve_ollama_standin(int(sys.argv[2]))
    else:
        sys.exit("usage: proxies.py ollama-standin PORT")


# --- nginx as Debian leaves it: a static site and the auth proxy share error.log ---

SHARED_LOG_CONF = """\
# Written by tests/netns/proxies.py: Debian's default site (a static root on port
# {static_port}) and the Ollama auth proxy, both writing the one error.log at
# Debian's default level. No try_files: with it nginx logs no 404 at all, without
# it every 404 is an `open() "..." failed` entry holding the decoded path.
user root;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log;

events {{
    worker_connections 1024;
}}

http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;

    server {{
        listen {static_port} default_server;
        listen [::]:{static_port} default_server;
        root {work}/html;
        index index.html;
        server_name _;
    }}

    server {{
        listen {port};
        listen [::]:{port};
        server_name localhost;
        location / {{
            auth_basic "Ollama API Access";
            auth_basic_user_file {work}/htpasswd;
            proxy_pass http://127.0.0.1:{upstream};
        }}
    }}
}}
"""


def start_nginx_shared_log(host, workdir, listen_port=8080, static_port=80, users=None,
                           upstream_port=OLLAMA_PORT):
    """nginx as Debian's default site leaves it: a static server on static_port and
    the auth proxy on listen_port, both logging to one error.log at level error."""
    for tool in ("nginx", "htpasswd"):
        if shutil.which(tool) is None:
            raise ProxyUnavailable(f"`{tool}` is not installed (make setup installs nginx-light, apache2-utils)")
    work = Path(workdir).resolve()
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    (work / "html").mkdir(exist_ok=True)
    (work / "html" / "index.html").write_text("<h1>Welcome to nginx!</h1>\n")
    htpasswd = work / "htpasswd"
    for n, (user, password) in enumerate((users or DEFAULT_USERS).items()):
        create = ["-c"] if n == 0 else []
        subprocess.run(["htpasswd", *create, "-B", "-b", str(htpasswd), user, password],
                       check=True, capture_output=True)
    conf = work / "nginx.conf"
    conf.write_text(SHARED_LOG_CONF.format(work=work, port=listen_port, static_port=static_port,
                                           upstream=upstream_port))
    with open(work / "stderr.log", "wb") as stderr:
        proc = host.popen("nginx", "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf),
                          "-g", "daemon off;", stdout=subprocess.DEVNULL, stderr=stderr)
    _wait_listening(host, proc, listen_port, "nginx", work / "stderr.log")
    _wait_listening(host, proc, static_port, "nginx", work / "stderr.log")
    return Nginx(host, work, conf, proc, listen_port)


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
