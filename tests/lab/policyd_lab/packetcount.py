"""Counting an allowed client's packets in the kernel while policyd changes the
ruleset under it: a client that connects in a loop, and counters either side
of policyd's chains that say exactly how many of its packets were dropped.
"""
import contextlib
import json
import socket
import threading

# Counts the packets to `port` at the input hook before policyd's chains run
# (priority -100) and after them (100): an accept in one base chain lets a
# packet go on to the next, a drop ends it, so the difference is exactly what
# the chains in between dropped, whatever the timing of the machine.
PROBE = """table inet probe {{
    counter before {{}}
    counter after {{}}
    chain first {{ type filter hook input priority -100; policy accept; tcp dport {port} counter name "before"; }}
    chain last {{ type filter hook input priority 100; policy accept; tcp dport {port} counter name "after"; }}
}}
"""


def add_probe(host, port):
    host.exec("nft", "-f", "-", input=PROBE.format(port=port))


def probe_counts(host):
    """(packets before policyd's chains, packets after them) to the probed port."""
    counts = []
    for name in ("before", "after"):
        listed = json.loads(host.nft("-j", "list", "counter", "inet", "probe", name).stdout)
        counts.append(next(item["counter"]["packets"] for item in listed["nftables"] if "counter" in item))
    return tuple(counts)


def handshake(host, address, port):
    """Whether a TCP handshake completes within 5 s."""
    sock = host.socket(socket.AF_INET)
    sock.settimeout(5)
    try:
        sock.connect((address, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


@contextlib.contextmanager
def connecting(client, address, port):
    """A client connecting to address:port in a loop while the block runs; yields
    {"attempts": n, "failed": [attempt numbers]}, complete once the block is over."""
    tally, stop = {"attempts": 0, "failed": []}, threading.Event()

    def loop():
        # Paced: unpaced, thousands of handshakes a second overflow the listener's
        # accept queue while policyd's work starves it of CPU.
        while not stop.wait(0.005):
            tally["attempts"] += 1
            if not handshake(client, address, port):
                tally["failed"].append(tally["attempts"])

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield tally
    finally:
        stop.set()
        thread.join()
