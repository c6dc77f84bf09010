#!/usr/bin/env python3
"""fail2ban from Debian, measured the way policyd is: ban latency, and restore after restart.

Owns running fail2ban-server with a private copy of /etc/fail2ban, its own db,
socket and log, one nginx-http-auth jail with the nftables action — and only
inside a lab namespace via `ip netns exec`, never in the root namespace, whose
firewall its action would change. Prints one JSON document.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ban_latency import measure, nginx_world
from policyd_lab.netlab import wait_for

JAIL = "nginx-http-auth"
TABLE = "f2b-table"
SET_V6 = f"addr6-set-{JAIL}"

FAIL2BAN_LOCAL = """\
[Definition]
loglevel = INFO
logtarget = {work}/fail2ban.log
socket = {work}/fail2ban.sock
pidfile = {work}/fail2ban.pid
dbfile = {work}/fail2ban.sqlite3
"""

JAIL_LOCAL = """\
[DEFAULT]
banaction = nftables-multiport
banaction_allports = nftables-allports
usedns = no

[{jail}]
enabled = true
filter = nginx-http-auth
port = {port}
logpath = {logpath}
backend = pyinotify
maxretry = 5
findtime = 600
bantime = 3600
"""


def fail2ban_version():
    out = subprocess.run(["fail2ban-server", "-V"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[0] if out.strip() else "unknown"


class Fail2ban:
    """fail2ban-server in `host`'s namespace with everything it writes under workdir."""

    def __init__(self, host, workdir, logpath, port):
        self.host = host
        self.work = Path(workdir).resolve()
        self.conf = self.work / "etc"
        self.proc = None
        shutil.copytree("/etc/fail2ban", self.conf)
        # Debian enables an sshd jail here; this bench runs exactly one jail.
        for extra in (self.conf / "jail.d").glob("*"):
            extra.unlink()
        (self.conf / "fail2ban.local").write_text(FAIL2BAN_LOCAL.format(work=self.work))
        (self.conf / "jail.local").write_text(JAIL_LOCAL.format(jail=JAIL, port=port, logpath=logpath))

    def _paths(self):
        return ["-c", str(self.conf), "-s", str(self.work / "fail2ban.sock")]

    def client(self, *args, timeout=120):
        return self.host.exec("fail2ban-client", *self._paths(), *args, timeout=timeout)

    def start(self):
        """Start the server in the foreground and return once the jail runs."""
        self.proc = self.host.popen("fail2ban-server", *self._paths(), "-p", str(self.work / "fail2ban.pid"),
                                    "--logtarget", str(self.work / "fail2ban.log"), "-f", "-x",
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = wait_for(lambda: self.proc.poll() is not None or self._jail_running(), timeout=60,
                           interval=0.05)
        if self.proc.poll() is not None or not started:
            raise RuntimeError(f"fail2ban-server did not start; see {self.work / 'fail2ban.log'}")

    def _jail_running(self):
        return self.host.exec("fail2ban-client", *self._paths(), "status", JAIL,
                              check=False).returncode == 0

    def stop(self):
        """`fail2ban-client stop`: runs actionstop, as `systemctl stop fail2ban` does."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.client("stop", timeout=120)
        self.proc.wait(timeout=120)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def set_size(host, set_name):
    """Elements in fail2ban's set in host's namespace; 0 while the set does not exist."""
    out = host.exec("nft", "-j", "list", "set", "inet", TABLE, set_name, check=False)
    if out.returncode != 0:
        return 0
    for item in json.loads(out.stdout)["nftables"]:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return 0


def restore_bench(world, fail2ban, count, limit):
    """Ban `count` addresses, restart fail2ban, time until all are back in the kernel."""
    addresses = [f"2001:db8:3::{i:x}" for i in range(1, count + 1)]
    started = time.monotonic()
    for chunk in range(0, count, 500):
        fail2ban.client("set", JAIL, "banip", *addresses[chunk:chunk + 500])
    if not wait_for(lambda: set_size(world.server, SET_V6) >= count, timeout=limit, interval=0.1):
        raise RuntimeError(f"fail2ban did not ban {count} addresses within {limit} s")
    ban_in = time.monotonic() - started

    stop_at = time.monotonic()
    fail2ban.stop()
    start_at = time.monotonic()
    fail2ban.start()
    server_ready = time.monotonic() - start_at
    samples = []
    while True:
        enforced = set_size(world.server, SET_V6)
        now = time.monotonic()
        samples.append((round(now - start_at, 2), enforced))
        if enforced >= count or now - start_at > limit:
            break
        time.sleep(0.1)
    complete = enforced >= count
    return {
        "bans": count,
        "ban_in_seconds": round(ban_in, 2),
        "stop_seconds": round(start_at - stop_at, 2),
        "server_ready_seconds": round(server_ready, 2),
        "restore_seconds": round(samples[-1][0], 2) if complete else None,
        "unenforced_window_seconds": round(samples[-1][0] + (start_at - stop_at), 2) if complete else None,
        "max_unenforced": count - min(n for _, n in samples),
        "still_unenforced_at_limit": count - enforced,
        "unenforced_after_seconds": {f"{t:.1f}": count - n for t, n in samples[::10]},
    }


def root_has_fail2ban_table():
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return TABLE in out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--family", type=int, choices=(4, 6), default=4)
    parser.add_argument("--restore-bans", type=int, default=2000, help="0 skips the restore bench")
    parser.add_argument("--restore-limit", type=float, default=120.0)
    parser.add_argument("--workdir", help="keep files here instead of a temporary directory")
    args = parser.parse_args()
    if root_has_fail2ban_table():
        sys.exit(f"the root namespace already has `{TABLE}`: a fail2ban runs here; refusing to bench")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="f2b-bench-"))
    result = {"tool": f"fail2ban {fail2ban_version()}", "backend": "pyinotify", "banaction": "nftables-multiport"}
    fail2ban = None
    try:
        with nginx_world(workdir / "world") as (world, nginx):
            fail2ban = Fail2ban(world.server, workdir / "fail2ban", nginx.error_log, nginx.port)
            fail2ban.start()

            def progress(n, s):
                print(f"trial {n}: {s * 1000:.1f} ms", file=sys.stderr)
            result["latency"] = measure(world, args.trials, port=nginx.port, family=args.family,
                                        progress=progress)
            if args.restore_bans:
                result["restore"] = restore_bench(world, fail2ban, args.restore_bans, args.restore_limit)
            fail2ban.stop()
    finally:
        if fail2ban is not None:
            fail2ban.kill()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if root_has_fail2ban_table():
        result["warning"] = f"`{TABLE}` appeared in the root namespace during the run"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
