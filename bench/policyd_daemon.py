"""policyd under benchmark: bench policies, `policyd run` in a lab namespace, seeded bans.

Owns what the policyd side of every benchmark shares: writing the bench policy
(optionally with a 100k-network allowlist), starting and stopping the daemon
with the lab's state dirs while its log goes to a file, its memory, and writing
many bans into a state file without a daemon or a kernel.
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path


from policyd_lab.netlab import POLICYD, REPO, wait_for  # noqa: E402

BAN_TABLE = "policyd_bans"

POLICY = """\
# Written by bench/policyd_daemon.py.
version: 1
services:
  ollama:
    ports: [11434]
    allow: [127.0.0.0/8, "::1"]
  proxy:
    ports: [8080]
    allow:
{allow}
bans:
  ports: [8080, 11434]
  maxretry: 5
  findtime: 10m
  bantime: 1h
  ipv6_prefix: 64
  logs:
    - path: {log}
      filter: nginx-auth
"""


def allowlist(count):
    """`count` distinct, non-overlapping networks from the documentation ranges only.

    The three IPv4 documentation /24s whole (the bench clients live there and
    must reach the proxy), then IPv6 /64s spread over 2001:db8::/32.
    """
    networks = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"][:count]
    # Every other /64, so no two elements are adjacent and nothing may merge them.
    networks += [f"2001:db8:{(i * 2) >> 16:x}:{(i * 2) & 0xFFFF:x}::/64" for i in range(count - len(networks))]
    return networks


def write_policy(path, log_path, allow_count=0):
    """The bench policy: nginx-auth on log_path, maxretry 5; the proxy port open to
    any source, or to an allowlist of `allow_count` networks that includes every client."""
    allow = ["any"] if allow_count == 0 else allowlist(allow_count)
    Path(path).write_text(POLICY.format(log=log_path, allow="\n".join(f'      - "{a}"' for a in allow)))
    return str(path)


def env_for(lab, host):
    return dict(os.environ, **lab.policyd_env(host))


def state_dir(lab, host):
    return Path(lab.policyd_env(host)["POLICYD_STATE_DIR"])


class TimedDaemon:
    """`policyd run POLICY` in host's namespace, logging to `log_path`, timed from spawn.

    Unlike tests' netlab.PolicydDaemon it keeps the log in a file and measures
    how long the start takes, which is what the restore benchmark needs.
    """

    def __init__(self, lab, host, policy_path, log_path):
        self.lab, self.host = lab, host
        self.policy_path = str(policy_path)
        self.log_path = Path(log_path)
        self.proc = None
        self.spawned_at = None
        self._log_offset = 0

    def spawn(self):
        """Start the process and return at once (a restore is timed from here)."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.spawned_at = time.monotonic()
            self.proc = self.host.popen(*POLICYD, "run", self.policy_path, env=env_for(self.lab, self.host),
                                        stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)
        return self.spawned_at

    def log(self):
        """What this run of the daemon logged so far."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def wait_started(self, timeout=60):
        """Seconds from spawn until the daemon logged `started` (after its restore)."""
        started = wait_for(lambda: self.proc.poll() is not None or "started " in self.log(),
                           timeout=timeout, interval=0.002)
        if self.proc.poll() is not None or not started:
            raise RuntimeError(f"policyd run did not start (exit {self.proc.poll()}):\n{self.log()[-3000:]}")
        return time.monotonic() - self.spawned_at

    def start(self, timeout=60):
        self.spawn()
        return self.wait_started(timeout)

    def status(self):
        out = self.host.policyd("status", "--json")
        if out.returncode != 0:
            raise RuntimeError(f"policyd status failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    @property
    def pid(self):
        """The python process's pid: `ip netns exec` execs its command in place."""
        return self.status()["daemon"]["pid"]

    def memory_mb(self):
        """(VmRSS, VmHWM) of the daemon in MB."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
        return round(fields["VmRSS"], 1), round(fields["VmHWM"], 1)

    def stop(self, timeout=30):
        """SIGTERM, as systemd stops it; every table and ban stays in the kernel."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise RuntimeError("policyd run did not stop within 30 s of SIGTERM")


class _NoKernel:
    """Seeding writes state only; the daemon under test pushes the bans to the kernel."""

    def add_bans(self, bans):
        pass

    def remove_bans(self, networks):
        pass

    def list_bans(self):
        return {}

    def add_ban_keys(self, items):
        pass

    def replace_ban_keys(self, items):
        pass

    def list_ban_keys(self):
        return set()


def ban_networks(count):
    """`count` distinct ban networks from the documentation ranges: IPv4 /32s of
    203.0.113.0/24 first, then IPv6 /64s of 2001:db8:8000::/33 (bans are per /64)."""
    v4 = [f"203.0.113.{i}/32" for i in range(1, 255)][:count]
    v6 = [f"2001:db8:{0x8000 + (i >> 16):x}:{i & 0xFFFF:x}::/64" for i in range(count - len(v4))]
    return v4 + v6


def seed_bans(state_path, policy_path, count, duration=7200):
    """Write `count` manual bans of `duration` seconds into the state file, as a daemon
    that made them would have; returns the networks. No daemon may run on that file."""
    from policyd.policy import reader as policy_mod
    from policyd.banning.bans import BanManager
    from policyd.banning.state import State

    settings = policy_mod.load(policy_path).bans
    networks = ban_networks(count)
    Path(state_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with State(state_path) as state:
        manager = BanManager(settings, state, _NoKernel())
        for network in networks:
            manager.ban(network, duration)
        manager.flush()
    return networks
