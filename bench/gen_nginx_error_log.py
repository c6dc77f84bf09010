#!/usr/bin/env python3
"""Generate a deterministic nginx error.log for filter benchmarks.

Mostly non-matching lines (upstream errors, credential-less first requests,
missing files), with auth_basic failures from a few hundred documentation-range
hosts; the same seed and count always give the same bytes.
"""
import argparse
import random

HOSTS_V4 = [f"{net}.{i}" for net in ("192.0.2", "198.51.100", "203.0.113") for i in range(1, 101)]
HOSTS_V6 = [f"2001:db8::{i:x}" for i in range(1, 51)]


# The default mix: 5% password mismatch, 3% unknown user, the rest no failure.
DEFAULT_FAILURES = 0.08


def lines(count, seed=11434, failures=None):
    """`failures`: the share of failure lines (0 to 1); None is the default 8%
    with the same bytes as ever. 0 gives a log with no candidate line at all."""
    rng = random.Random(seed)
    hosts = HOSTS_V4 + HOSTS_V6
    for n in range(count):
        stamp = f"2024/05/{1 + n // 100000 % 28:02d} {n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}"
        pid = 1000 + n % 4
        conn = 100000 + n
        client = rng.choice(hosts)
        tail = f'client: {client}, server: ollama.example.org, request: "POST /api/chat HTTP/1.1", host: "ollama.example.org"'
        kind = rng.random()
        if failures is not None:
            # Failures first (5:3 as by default), then the other kinds in their proportions.
            kind = (kind * DEFAULT_FAILURES / failures if kind < failures
                    else DEFAULT_FAILURES + (kind - failures) * (1 - DEFAULT_FAILURES) / (1 - failures))
        if kind < 0.05:
            yield f'{stamp} [error] {pid}#{pid}: *{conn} user "user{rng.randrange(50)}": password mismatch, {tail}'
        elif kind < 0.08:
            yield f'{stamp} [error] {pid}#{pid}: *{conn} user "admin{rng.randrange(9)}" was not found in "/etc/nginx/.htpasswd", {tail}'
        elif kind < 0.30:
            yield f"{stamp} [info] {pid}#{pid}: *{conn} no user/password was provided for basic authentication, {tail}"
        elif kind < 0.60:
            yield (f"{stamp} [error] {pid}#{pid}: *{conn} upstream prematurely closed connection while reading "
                   f'response header from upstream, {tail}, upstream: "http://127.0.0.1:11434/api/chat"')
        elif kind < 0.80:
            yield f'{stamp} [error] {pid}#{pid}: *{conn} open() "/var/www/html/favicon.ico" failed (2: No such file or directory), {tail}'
        else:
            yield f"{stamp} [info] {pid}#{pid}: *{conn} client {client} closed keepalive connection"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--lines", type=int, default=200000)
    parser.add_argument("--seed", type=int, default=11434)
    parser.add_argument("--failures", type=float, default=None,
                        help="share of failure lines, 0 to 1 (default: 0.08)")
    args = parser.parse_args()
    with open(args.path, "w", encoding="ascii") as out:
        for line in lines(args.lines, args.seed, args.failures):
            out.write(line + "\n")


if __name__ == "__main__":
    main()
