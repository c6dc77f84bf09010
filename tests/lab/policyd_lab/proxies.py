"""Real reverse proxies in front of a stand-in Ollama, inside lab namespaces.

Owns the servers the ban-engine tests, the benchmarks and the demo share: a
stand-in Ollama on 127.0.0.1:11434 (ollama_standin.py), nginx (auth_basic) and
Caddy (basicauth) configured to write only into a work directory. What clients
send them is in webclient.py.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from policyd_lab.netlab import wait_for

OLLAMA_PORT = 11434
DEFAULT_USERS = {"ollama": "secret"}
START_TIMEOUT = 10.0
OLLAMA_STANDIN = Path(__file__).with_name("ollama_standin.py")


class ProxyUnavailable(RuntimeError):
    """The proxy binary is missing or cannot run here; tests skip with this reason."""


def start_ollama_standin(host, port=OLLAMA_PORT):
    """A stand-in Ollama answering GET /api/tags on 127.0.0.1:port in `host`'s namespace."""
    proc = host.popen(sys.executable, str(OLLAMA_STANDIN), str(port),
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


# Both configurations start alike: one worker, everything written into {work}.
_NGINX_HEAD = """\
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
"""

NGINX_CONF = """\
# Written by policyd_lab/proxies.py: everything nginx writes stays in {work}.
""" + _NGINX_HEAD + """\
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


def _nginx_workdir(workdir, users):
    """The work directory with tmp/ and an htpasswd for `users`; ProxyUnavailable without the tools."""
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
    return work


def _run_nginx(host, work, conf_text, listen_port, *more_ports):
    conf = work / "nginx.conf"
    conf.write_text(conf_text)
    # -e: nginx opens its error log before reading the config; keep even that in work.
    with open(work / "stderr.log", "wb") as stderr:
        proc = host.popen("nginx", "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf),
                          "-g", "daemon off;", stdout=subprocess.DEVNULL, stderr=stderr)
    for port in (listen_port, *more_ports):
        _wait_listening(host, proc, port, "nginx", work / "stderr.log")
    return Nginx(host, work, conf, proc, listen_port)


def start_nginx(host, workdir, listen_port=8080, users=None, upstream_port=OLLAMA_PORT,
                error_log_level="info"):
    """nginx with auth_basic on listen_port (IPv4 and IPv6) proxying to 127.0.0.1:upstream_port.

    error_log_level "info" also logs the credential-less first request (which is
    not a failure); "error" is Debian's default and logs only the failures.
    """
    work = _nginx_workdir(workdir, users)
    return _run_nginx(host, work, NGINX_CONF.format(work=work, port=listen_port, upstream=upstream_port,
                                                    level=error_log_level), listen_port)


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
# Written by policyd_lab/proxies.py: everything Caddy writes stays in {work}.
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


# --- nginx as Debian leaves it: a static site and the auth proxy share error.log ---

SHARED_LOG_CONF = """\
# Written by policyd_lab/proxies.py: Debian's default site (a static root on port
# {static_port}) and the Ollama auth proxy, both writing the one error.log at
# Debian's default level. No try_files: with it nginx logs no 404 at all, without
# it every 404 is an `open() "..." failed` entry holding the decoded path.
""" + _NGINX_HEAD + """\

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
    work = _nginx_workdir(workdir, users)
    (work / "html").mkdir(exist_ok=True)
    (work / "html" / "index.html").write_text("<h1>Welcome to nginx!</h1>\n")
    conf = SHARED_LOG_CONF.format(work=work, port=listen_port, static_port=static_port,
                                  upstream=upstream_port, level="error")  # Debian's default level
    return _run_nginx(host, work, conf, listen_port, static_port)
