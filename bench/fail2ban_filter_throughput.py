#!/usr/bin/env python3
"""Throughput of an imported fail2ban filter: `policyd test-filter fail2ban:NAME LOG`
against `fail2ban-regex LOG NAME` with the same filter.d file on the same log, one run.

Usage: bench/fail2ban_filter_throughput.py [--lines 200000] [--filter sshd]
Generates a syslog-format auth.log (sshd failures from many sources, sshd
successes and disconnects, CRON, sudo, systemd-logind), times both tools with
their start-up included, checks that both count the same failures, prints the
ratio. Target (issue 16): policyd >= 10x fail2ban-regex.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_auth_log(path, lines, seed=16):
    rng = random.Random(seed)
    start = time.mktime((2026, 3, 1, 0, 0, 0, 0, 0, -1))
    kinds = [
        (0.25, "sshd[{pid}]: Failed password for {user} from {addr} port {port} ssh2"),
        (0.05, "sshd[{pid}]: Failed password for invalid user {user} from {addr} port {port} ssh2"),
        (0.05, "sshd[{pid}]: Invalid user {user} from {addr} port {port}"),
        (0.05, "sshd[{pid}]: Accepted publickey for deploy from {addr} port {port} ssh2: ED25519 SHA256:abc"),
        (0.10, "sshd[{pid}]: Connection closed by {addr} port {port} [preauth]"),
        (0.05, "sshd[{pid}]: pam_unix(sshd:session): session opened for user deploy(uid=1000) by (uid=0)"),
        (0.25, "CRON[{pid}]: pam_unix(cron:session): session opened for user root(uid=0) by (uid=0)"),
        (0.10, "sudo:   deploy : TTY=pts/0 ; PWD=/home/deploy ; USER=root ; COMMAND=/usr/bin/apt update"),
        (0.10, "systemd-logind[{pid}]: New session {pid} of user deploy."),
    ]
    weights = [k[0] for k in kinds]
    users = ["root", "admin", "test", "oracle", "ubuntu", "pi", "git"]
    with open(path, "w") as stream:
        for i in range(lines):
            template = rng.choices(kinds, weights)[0][1]
            stamp = time.strftime("%b %d %H:%M:%S", time.localtime(start + i * 0.05))
            text = template.format(
                pid=rng.randrange(1000, 60000), user=rng.choice(users),
                addr=f"198.51.100.{rng.randrange(1, 255)}" if rng.random() < .5
                else f"203.0.113.{rng.randrange(1, 255)}", port=rng.randrange(1024, 65535))
            stream.write(f"{stamp} gpu1 {text}\n")


def timed(command):
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200000)
    parser.add_argument("--filter", default="sshd")
    parser.add_argument("--log", help="an existing log instead of the generated auth.log")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = args.log or os.path.join(tmp, "auth.log")
        if not args.log:
            make_auth_log(log, args.lines)
        lines = sum(1 for _ in open(log, "rb"))
        policyd = [sys.executable, "-m", "policyd", "test-filter", f"fail2ban:{args.filter}",
                   log, "--json"]
        ours, out = timed(policyd)
        matched = json.loads(out)["matched"]
        theirs, out = timed(["fail2ban-regex", log, f"/etc/fail2ban/filter.d/{args.filter}.conf"])
        found = re.search(r"^Failregex: (\d+) total", out, re.M)
        reference = int(found.group(1)) if found else None
    ratio = theirs / ours
    print(f"fail2ban filter {args.filter}, {lines} lines")
    print(f"  policyd test-filter : {ours:7.2f} s  {lines / ours:9.0f} lines/s  {matched} failures")
    print(f"  fail2ban-regex      : {theirs:7.2f} s  {lines / theirs:9.0f} lines/s  {reference} failures")
    print(f"  ratio {ratio:.1f}x (target >= 10x): {'met' if ratio >= 10 else 'MISSED'}")
    if reference is not None and reference != matched:
        print(f"  note: failure counts differ ({matched} vs {reference})")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    main()
