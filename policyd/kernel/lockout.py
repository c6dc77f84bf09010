"""The anti-lockout lint: who the operator depends on (the SSH session, established
connections to guarded ports) and whether a policy would cut one of them, asked
of explain, which walks the ruleset as the kernel does.
"""
import os
from dataclasses import dataclass

from policyd.operator import explain
from policyd.addr import parse_host
from policyd.errors import Refused


class LockoutRisk(Refused):
    """The policy would cut a client the operator depends on (exit 1)."""


@dataclass(frozen=True)
class Peer:
    """A remote end the operator depends on: who, to which local port, and why we know."""
    address: object
    port: int
    proto: str
    origin: str


def ssh_peer(environ):
    """The SSH client from SSH_CONNECTION ("client cport server sport"), or None."""
    fields = environ.get("SSH_CONNECTION", "").split()
    if len(fields) != 4 or not fields[3].isdigit():
        return None
    address = parse_host(fields[0])
    if address is None:
        return None
    return Peer(address, int(fields[3]), "tcp", "your SSH session (SSH_CONNECTION)")


def operator_peers(policy, environ=None):
    """SSH_CONNECTION's client plus the peers of established TCP connections on
    the ports `policy` guards, as this host's sockets show them now."""
    from policyd.operator import netdiag
    peers = []
    ssh = ssh_peer(os.environ if environ is None else environ)
    if ssh is not None:
        peers.append(ssh)
    ports = [port for proto, port in policy.guarded() if proto == "tcp"]
    if ports:
        try:
            connections = netdiag.established_peers(ports)
        except OSError as exc:
            raise LockoutRisk(f"cannot list established connections to check them ({exc}); "
                              "use --force to apply without this check") from None
        for conn in connections:
            peers.append(Peer(conn.peer_address, conn.local_port, "tcp",
                              "an established connection"))
    return peers


def lockout_cuts(policy, peers, iface_of=lambda address: None):
    """(peer, Decision) for every peer that `policy` would drop or reject.

    `iface_of(address)` names the interface the peer's packets arrive on, asked
    only when an address rule alone would refuse the peer.
    """
    cuts, seen = [], set()
    explainer = explain.Explainer(policy)  # compiled once, asked for every peer
    for peer in peers:
        key = (peer.address, peer.port, peer.proto)
        if key in seen:
            continue
        seen.add(key)
        decision = explainer.decide(peer.address, peer.port, peer.proto)
        if decision.verdict in ("drop", "reject"):
            decision = explainer.decide(peer.address, peer.port, peer.proto, iface_of(peer.address))
        if decision.verdict in ("drop", "reject"):
            cuts.append((peer, decision))
    return cuts


def route_iface(address):
    from policyd.operator import netdiag
    return netdiag.interface_towards(address)


def refuse_cuts(policy, peers, iface_of):
    cuts = lockout_cuts(policy, peers(policy), iface_of)
    if not cuts:
        return
    peer, decision = cuts[0]
    more = f" (and {len(cuts) - 1} more)" if len(cuts) > 1 else ""
    raise LockoutRisk(
        f"refusing: {peer.address} on {peer.proto} port {peer.port} ({peer.origin}) "
        f"would be cut by {decision.rule}{more}; fix the policy or use --force")


def lint_in_child(policy, peers=operator_peers, iface_of=route_iface):
    """refuse_cuts in a forked child, for the daemon's first start: whatever the
    queries load or leave behind stays out of a long-running daemon.
    Raises LockoutRisk as refuse_cuts does; any other failure of the child is a LockoutRisk
    too (it could not prove that nobody is cut)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no threads run here yet (the daemon forks before any)
        code = 0
        try:
            os.close(read_end)
            try:
                refuse_cuts(policy, peers, iface_of)
                answer = b""
            except LockoutRisk as exc:
                answer = str(exc).encode()
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                answer = f"the lint could not run ({exc}); use `policyd apply`".encode()
            with os.fdopen(write_end, "wb") as out:
                out.write(answer)
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer_pipe:
        answer = answer_pipe.read()
    _pid, status = os.waitpid(pid, 0)
    if status != 0:
        raise LockoutRisk("the lint could not run; use `policyd apply`")
    if answer:
        raise LockoutRisk(answer.decode("utf-8", "replace"))
