"""A small lab of network namespaces for integration tests: hosts, links, listeners.

Every namespace and process it makes is recorded and removed by close(), which
the fixtures call also when a test fails. Addresses come from the
documentation ranges only, and nothing here touches the root namespace's rules.
"""
import contextlib
import ctypes
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000
# This file is tests/lab/policyd_lab/netlab.py in the checkout.
REPO = Path(__file__).resolve().parents[3]
POLICYD = [sys.executable, "-m", "policyd"]
# The CLI as the Debian package runs it: /usr/bin/policyd, a /usr/bin/python3
# console script (a copy here; the checkout must be on PYTHONPATH). Without this
# checkout's venv, whose editable-install finder every start imports (10-14 ms),
# and without runpy (`-m`), neither of which an operator's command pays.
INSTALLED_POLICYD = ["/usr/bin/python3", str(REPO / "tests" / "lab" / "installed" / "policyd")]
ECHO_SERVER = Path(__file__).with_name("echo_server.py")
_libc = ctypes.CDLL(None, use_errno=True)
# The kernel lane (tests/kernel/lane.sh) runs tests under emulation, many times
# slower: every wait for something to happen is scaled by this, never shortened.
TIME_SCALE = max(1.0, float(os.environ.get("POLICYD_TEST_TIME_SCALE") or 1))
_counter = itertools.count()


def run(*args, check=True, **kwargs):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kwargs)


def in_namespace(name, func, *args):
    """Run func(*args) in a thread that has joined namespace `name`; return its result.

    Sockets keep the namespace they were created in, so a socket made here can
    be used from any thread afterwards.
    """
    result = {}

    def target():
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)
        try:
            result["value"] = func(*args)
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class Host:
    def __init__(self, lab, role):
        self.lab = lab
        self.name = f"{lab.prefix}-{role}"
        self.role = role
        self.addresses = {}

    def ip(self, *args, check=True):
        return run("ip", "-n", self.name, *args, check=check)

    def exec(self, *args, check=True, **kwargs):
        return run("ip", "netns", "exec", self.name, *args, check=check, **kwargs)

    def popen(self, *args, **kwargs):
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args],
                                start_new_session=True, **kwargs)
        self.lab.processes.append(proc)
        return proc

    def policyd(self, *args, check=False, env=None, input=None, timeout=60 * TIME_SCALE,
                installed=False):
        """Run the real CLI inside this namespace with the lab's own state dirs;
        installed: as the package runs it (INSTALLED_POLICYD), for timing it."""
        full_env = dict(os.environ, **self.lab.policyd_env(self), **(env or {}))
        command = INSTALLED_POLICYD if installed else POLICYD
        return subprocess.run(["ip", "netns", "exec", self.name, *command, *args],
                              capture_output=True, text=True, check=check, env=full_env,
                              input=input, timeout=timeout, cwd=REPO)

    def nft(self, *args, check=True):
        return self.exec("nft", *args, check=check)

    @contextlib.contextmanager
    def transactions(self):
        """`nft monitor` in this namespace while the block runs: yields a list that
        holds, once the block is over, the lines of each transaction committed
        meanwhile. A marker table made before and after the block tells when the
        monitor listens and when it has printed everything."""
        lines = []
        proc = self.popen("nft", "monitor", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        reader = threading.Thread(target=lambda: lines.extend(
            line.decode().rstrip("\n") for line in proc.stdout), daemon=True)
        reader.start()

        def mark(name):
            """Make marker tables until the monitor prints one (it may not listen
            yet); the first line of the one it printed."""
            deadline = time.monotonic() + 10 * TIME_SCALE
            for number in itertools.count():
                table = f"{name}_{number}"
                self.nft("add", "table", "inet", table)
                self.nft("delete", "table", "inet", table)
                if wait_for(lambda: f"add table inet {table}" in lines, 0.5 * TIME_SCALE):
                    return f"add table inet {table}"
                if time.monotonic() > deadline:
                    raise RuntimeError("nft monitor printed none of its marker tables")

        found = []
        try:
            first = mark("lab_monitor_start")
            yield found
            mark("lab_monitor_end")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        current = []
        for line in lines[lines.index(first):]:
            if line.startswith("# new generation"):
                found.append(current)
                current = []
            else:
                current.append(line)
        found[:] = [t for t in found if not any("lab_monitor_" in line for line in t)]

    def ruleset(self):
        return self.nft("list", "ruleset").stdout

    def listen(self, port, proto="tcp"):
        """Start an echo listener on every address of this host, `port`."""
        proc = self.popen(sys.executable, str(ECHO_SERVER), str(port), proto,
                          stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"listener on {self.name}:{port} did not start")
        return proc

    def socket(self, family, kind=socket.SOCK_STREAM):
        return in_namespace(self.name, socket.socket, family, kind)

    def connect(self, address, port, timeout=None, source=None):
        """A connected TCP socket to address:port, or None if nothing answered in time.

        "Answered" means the echo server's greeting arrived, not only the SYN-ACK.
        `source`: the local address to send from. The default timeout (1 s) is
        scaled; a short explicit one (expecting a drop) is kept as given.
        """
        timeout = 1.0 * TIME_SCALE if timeout is None else timeout
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = self.socket(family)
        sock.settimeout(timeout)
        try:
            if source is not None:
                sock.bind((source, 0))
            sock.connect((address, port))
            if sock.recv(16) != b"hello\n":
                raise OSError("no greeting")
        except OSError:
            sock.close()
            return None
        return sock

    def can_connect(self, address, port, timeout=None, source=None):
        sock = self.connect(address, port, timeout, source)
        if sock is None:
            return False
        sock.close()
        return True

    def udp_answers(self, address, port, timeout=None, source=None):
        timeout = 1.0 * TIME_SCALE if timeout is None else timeout
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = self.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        try:
            if source is not None:
                sock.bind((source, 0))
            sock.sendto(b"ping", (address, port))
            return sock.recv(16) == b"ping"
        except OSError:
            return False
        finally:
            sock.close()


class Lab:
    """Namespaces joined by veth pairs; `close()` removes all of it."""

    def __init__(self, tmp_path):
        self.prefix = f"pd{os.getpid() % 100000}x{next(_counter)}"
        self.tmp = Path(tmp_path)
        self.hosts = []
        self.processes = []
        self.links = itertools.count()

    def policyd_env(self, host):
        base = self.tmp / host.role
        return {"POLICYD_STATE_DIR": str(base / "state"), "POLICYD_RUN_DIR": str(base / "run"),
                "PYTHONPATH": str(REPO)}

    def host(self, role):
        host = Host(self, role)
        run("ip", "netns", "add", host.name)
        self.hosts.append(host)
        host.ip("link", "set", "lo", "up")
        return host

    def link(self, a, b, a_addrs, b_addrs, a_ifname=None, b_ifname=None):
        """A veth pair between hosts a and b with the given addresses (CIDR strings)."""
        n = next(self.links)
        a_if = a_ifname or f"v{n}{b.role[:6]}"
        b_if = b_ifname or f"v{n}{a.role[:6]}"
        tmp_a, tmp_b = f"{self.prefix}a{n}"[:15], f"{self.prefix}b{n}"[:15]
        run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        run("ip", "link", "set", tmp_a, "netns", a.name)
        run("ip", "link", "set", tmp_b, "netns", b.name)
        for host, tmp, name, addrs in ((a, tmp_a, a_if, a_addrs), (b, tmp_b, b_if, b_addrs)):
            host.ip("link", "set", tmp, "name", name)
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                host.ip("addr", "add", addr, "dev", name, *extra)
                host.addresses.setdefault(name, []).append(addr.split("/")[0])
            host.ip("link", "set", name, "up")
        return a_if, b_if

    def close(self):
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for host in self.hosts:
            # Processes started by other means (daemons that forked) die with a kill
            # of every pid in the namespace.
            pids = run("ip", "netns", "pids", host.name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", host.name, check=False)


class PolicydDaemon:
    """`policyd run POLICY` in a host's namespace; stop_and_read() ends it (SIGTERM)."""

    def __init__(self, host, policy_path, *args, env=None):
        self.host = host
        self.command = [*POLICYD, "run", str(policy_path), *args]
        self.env = dict(os.environ, **host.lab.policyd_env(host), **(env or {}))
        self.proc = None

    def start(self, ready=True):
        self.proc = self.host.popen(*self.command, env=self.env, stderr=subprocess.PIPE,
                                    text=True, cwd=REPO)
        if ready and not wait_for(self._up, timeout=15):
            raise RuntimeError("policyd run did not come up:\n" + self.stop_and_read())
        return self

    def _up(self):
        if self.proc.poll() is not None:
            return True  # died: start() reports its stderr
        status = self.host.policyd("status", "--json")
        return status.returncode == 0 and json.loads(status.stdout).get("daemon") is not None

    def stop_and_read(self, sig=signal.SIGTERM):
        """Stop it (if it runs) and return everything it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        return err


def wait_for(predicate, timeout=5.0, interval=0.02):
    """Poll `predicate` until it is true or `timeout` (scaled) passes; return its last value."""
    deadline = time.monotonic() + timeout * TIME_SCALE
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def leftover_namespaces(prefix):
    names = run("ip", "netns", "list", check=False).stdout.split("\n")
    return [n.split()[0] for n in names if n.startswith(prefix)]


@contextlib.contextmanager
def open_lab(tmp_path):
    """A Lab that is closed, and checked to leave no namespace behind, however the block ends."""
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
        assert not leftover_namespaces(lab.prefix), "namespaces left behind"
