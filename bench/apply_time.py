"""Apply time of 100k networks as `policyd apply` takes it, beside `nft -f`, in namespaces.

Owns throwaway namespaces and: the first apply and a re-apply of a list file of
50k IPv4 /28 and 50k IPv6 /64 (none adjacent) taking turns with `nft -f` of the
same ruleset (as `policyd show` prints it) first and again, in ROUNDS rounds;
the same networks from YAML; and CHURN_CHANGES 1% changes of the list file
followed by the running daemon (write -> kernel).
"""
import json
import resource
import socket
import struct
import time
from pathlib import Path

from policyd_lab.netlab import Lab, PolicydDaemon, in_namespace
from throughput import compile_policyd

TABLE = "policyd"
# Rounds of policyd's and nft -f's first and second load; the medians are reported.
ROUNDS = 3
# 1% changes of the list under one daemon; the median is reported.
CHURN_CHANGES = 5
APPLY_KEYS = ("first_apply_seconds", "reapply_seconds", "nft_f_first_seconds", "nft_f_again_seconds")
# Set elements only, never traffic: 10.0.0.0/8 holds 50k spaced /28s.
LIST_POLICY = """\
version: 1
services:
  proxy:
    ports: [8080]
    allow:
      - file: {path}
"""


def networks(count):
    half = count // 2
    v4 = [f"{(10 << 24 | i * 32) >> 24}.{(i * 32 >> 16) & 255}.{(i * 32 >> 8) & 255}."
          f"{i * 32 & 255}/28" for i in range(half)]
    v6 = [f"2001:db8:{(i * 2) >> 16:x}:{(i * 2) & 0xFFFF:x}::/64" for i in range(count - half)]
    return v4, v6


# CPU seconds (user + system) of the last command run by _timed or _nft_file: on
# a shared machine the wall clock waits for other jobs, the CPU time does not.
last_cpu = [0.0]


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(host, *args):
    cpu, started = _children_cpu(), time.perf_counter()
    out = host.policyd(*args, timeout=300, installed=True)
    seconds = time.perf_counter() - started
    last_cpu[0] = round(_children_cpu() - cpu, 3)
    if out.returncode != 0:
        raise RuntimeError(f"policyd {' '.join(args)} failed: {out.stderr.strip()}")
    return round(seconds, 3)


def _nft_file(host, path):
    cpu, started = _children_cpu(), time.perf_counter()
    host.exec("nft", "-f", str(path), timeout=300)
    seconds = time.perf_counter() - started
    last_cpu[0] = round(_children_cpu() - cpu, 3)
    return round(seconds, 3)


def median(samples):
    """The middle of an odd number of samples (of (wall, cpu) pairs: by wall time)."""
    return sorted(samples)[len(samples) // 2]


def _with_cpu(result, key, seconds):
    """result[key] = wall seconds, and beside it the same command's CPU seconds."""
    result[key] = seconds
    result[key.replace("_seconds", "_cpu_seconds")] = last_cpu[0]


def _kernel_count(host, name):
    """Elements in one set, counted over policyd's own netlink dump (no nft cache)."""
    def count():
        from policyd.kernel.nfnetlink import Netlink
        return len(Netlink().set_keys(TABLE, name))
    return in_namespace(host.name, count)


def measure_apply(workdir, count=100000, churn=0.01):
    compile_policyd()  # as installed: .pyc shipped, not compiled on every command
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    v4, v6 = networks(count)
    list_path = workdir / "allow.txt"
    list_path.write_text("# bench list\n" + "\n".join(v4 + v6) + "\n")
    list_policy = workdir / "list.yaml"
    list_policy.write_text(LIST_POLICY.format(path=list_path))
    yaml_policy = workdir / "yaml.yaml"
    yaml_policy.write_text("version: 1\nservices:\n  proxy:\n    ports: [8080]\n    allow:\n"
                           + "".join(f'      - "{n}"\n' for n in v4 + v6))
    lab = Lab(workdir)
    try:
        yaml_host = lab.host("yaml")
        result = {"networks": count, "rounds": ROUNDS}
        # nft -f of what policyd loads, replacing the tables the same way.
        shown = yaml_host.policyd("show", str(list_policy), timeout=300).stdout
        nft_path = workdir / "ruleset.nft"
        nft_path.write_text("".join(f"table inet {t} {{}}\ndelete table inet {t}\n"
                                    for t in (TABLE, TABLE + "_bans")) + shown)
        # policyd and nft -f take turns, each first in every other round, in fresh
        # namespaces: this host's speed moves within minutes, and one sample of
        # each, one after the other, compared its phases as much as the tools.
        samples = {key: [] for key in APPLY_KEYS}
        for number in range(ROUNDS):
            host, reference = lab.host(f"srv{number}"), lab.host(f"nft{number}")
            turns = [(host, ("first_apply_seconds", "reapply_seconds")),
                     (reference, ("nft_f_first_seconds", "nft_f_again_seconds"))]
            for target, keys in (turns if number % 2 == 0 else turns[::-1]):
                for key in keys:
                    seconds = (_timed(target, "apply", str(list_policy), "--force") if target is host
                               else _nft_file(target, nft_path))
                    samples[key].append((seconds, last_cpu[0]))
        for key, taken in samples.items():
            result[key], result[key.replace("_seconds", "_cpu_seconds")] = median(taken)
            result[key.replace("_seconds", "_samples")] = [seconds for seconds, _cpu in taken]
        for key in ("yaml_first_seconds", "yaml_reapply_seconds"):
            _with_cpu(result, key, _timed(yaml_host, "apply", str(yaml_policy), "--force"))
        loaded = sum(_kernel_count(host, f"committed_proxy_v{v}") for v in (4, 6))
        # An interval is a start and an end element in the kernel, and each set
        # leads with nft's end element at address 0.
        if loaded != 2 * count + 2:
            raise RuntimeError(f"applied {count} networks, the kernel holds {(loaded - 2) // 2}")
        result["kernel_networks"] = (loaded - 2) // 2
        result.update(_churn(host, list_policy, list_path, v4, v6, churn))
        return result
    finally:
        lab.close()


def measure_churn(workdir, count=100000, churn=0.01):
    """Only the list churn under the daemon (for a quick look without the applies)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    v4, v6 = networks(count)
    list_path = workdir / "allow.txt"
    list_path.write_text("# bench list\n" + "\n".join(v4 + v6) + "\n")
    list_policy = workdir / "list.yaml"
    list_policy.write_text(LIST_POLICY.format(path=list_path))
    lab = Lab(workdir)
    try:
        host = lab.host("srv")
        _timed(host, "apply", str(list_policy), "--force")
        return _churn(host, list_policy, list_path, v4, v6, churn)
    finally:
        lab.close()


def _has_element(netlink, name, key):
    """One element lookup (NFT_MSG_GETSETELEM, not a dump): ~0.1 ms whatever the set's size."""
    from policyd.kernel import nfwire as nl, nlbatch
    body = (nlbatch.string(1, TABLE) + nlbatch.string(2, name)
            + nlbatch.attr(3 | nlbatch.NESTED, nlbatch.encode_element(key)))
    seq = netlink._next_seq()
    netlink._sock.send(netlink._header((nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_GETSETELEM,
                                       nl.NLM_F_REQUEST | nl.NLM_F_ACK, nl.NFPROTO_INET, 0,
                                       body, seq))
    while True:
        data = netlink._sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _flags, msg_seq, _pid = struct.unpack_from("=IHHII", data, offset)
            if msg_seq == seq and kind == nl.NLMSG_ERROR:
                return struct.unpack_from("=i", data, offset + 16)[0] == 0
            offset += (length + 3) & ~3


def _time_until_present(tmp, list_path, key, timeout=10.0):
    """Rename tmp over list_path (how cron jobs write lists), then seconds until the
    kernel's set holds `key`."""
    from policyd.kernel.nfnetlink import Netlink
    netlink = Netlink()
    started = time.perf_counter()
    tmp.replace(list_path)
    while not _has_element(netlink, "committed_proxy_v4", key):
        if time.perf_counter() - started > timeout:
            raise RuntimeError("the list change never reached the kernel")
        time.sleep(0.001)
    return time.perf_counter() - started


def _churn_network(i):
    """New /28s for the churn, in 10.200.0.0/13, apart from the list's 10.0-10.24."""
    return f"10.{200 + (i >> 12)}.{(i >> 4) & 255}.{(i & 15) * 16}/28"


def _churn(host, policy, list_path, v4, v6, churn, changes=CHURN_CHANGES):
    """Replace `churn` of the list's lines while the daemon runs, `changes` times
    (each time the lines the last change wrote); time write -> kernel of each."""
    daemon = PolicydDaemon(host, policy).start()
    taken = []
    try:
        changed = int(len(v4) * churn)
        time.sleep(1.0)  # the daemon's start-up work is over
        for number in range(changes):
            new4 = [_churn_network(number * changed + i) for i in range(changed)]
            target = new4[-1].split("/")[0]
            tmp = list_path.with_suffix(".new")
            tmp.write_text("\n".join(new4 + v4[changed:] + v6) + "\n")
            taken.append(in_namespace(host.name, _time_until_present, tmp, list_path,
                                      socket.inet_aton(target)))
            time.sleep(0.5)  # the daemon's bookkeeping after the change is over
    finally:
        log = daemon.stop_and_read()
    applied = [line for line in log.splitlines() if "list applied" in line]
    return {"churn_lines": 2 * int(len(v4) * churn), "churn_seconds": round(median(taken), 3),
            "churn_samples": [round(seconds, 3) for seconds in taken],
            "churn_daemon_log": applied[-changes:] if applied else log[-500:]}


if __name__ == "__main__":
    import sys
    print(json.dumps(measure_apply(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/apply-bench"),
                                   int(sys.argv[2]) if len(sys.argv) > 2 else 100000), indent=1))
