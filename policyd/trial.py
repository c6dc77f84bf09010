"""Loading policies into the kernel: plain applies, trials, confirm and rollback.

Owns the committed policy and the pending trial in the state dir. The trial's
deadline lives in the kernel (a timeout element, see compile.py); the disk only
ever holds a committed policy that an operator confirmed, so a crash, a lost
session or a reboot can only fall back to it, never keep a candidate.
"""
import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from policyd import explain, preflight
from policyd import policy as policy_mod
from policyd.addr import parse_host
from policyd.compile import FAMILY, TRIAL_SET, compile_policy
from policyd.errors import InputError, KernelError, Refused

COMMITTED = "committed.yaml"
COMMITTED_META = "committed.json"
PENDING = "pending.json"
LOCK = "trial.lock"
PENDING_VERSION = 1
# Written by a daemon that found nothing committed and did not enforce the policy
# file (it would cut a connected client, or it does not load); gone at the first commit.
HELD_BACK = "held-back.json"

log = logging.getLogger(__name__)


class TrialRefused(Refused):
    """A trial step ran and said no (exit code 1); nothing was changed."""


class TrialRunning(TrialRefused):
    pass


class NoTrial(TrialRefused):
    pass


class TooLate(TrialRefused):
    pass


class LockoutRisk(TrialRefused):
    pass


def atomic_write(path, data):
    """Write `data` to `path` so that readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory):
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class Pending:
    """A candidate on trial: its exact bytes and when the kernel drops it."""
    data: bytes
    source: str
    sha256: str
    started_at: float
    deadline: float  # wall clock, seconds since the epoch
    seconds: int
    previous_sha256: str | None

    def policy(self):
        return policy_mod.loads(self.data, self.source)

    def to_json(self):
        return json.dumps({
            "version": PENDING_VERSION, "source": self.source, "sha256": self.sha256,
            "policy": base64.b64encode(self.data).decode("ascii"),
            "started_at": self.started_at, "deadline": self.deadline,
            "seconds": self.seconds, "previous_sha256": self.previous_sha256,
        }, indent=1).encode()

    @classmethod
    def from_json(cls, raw):
        """Parse a pending record; ValueError if any part of it is wrong."""
        record = json.loads(raw)
        if not isinstance(record, dict) or record.get("version") != PENDING_VERSION:
            raise ValueError("unknown record version")
        try:
            data = base64.b64decode(record["policy"], validate=True)
            pending = cls(data=data, source=str(record["source"]), sha256=record["sha256"],
                          started_at=float(record["started_at"]),
                          deadline=float(record["deadline"]), seconds=int(record["seconds"]),
                          previous_sha256=record["previous_sha256"])
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"missing or malformed field ({exc})") from None
        if hashlib.sha256(data).hexdigest() != pending.sha256:
            raise ValueError("the policy does not match its sha256")
        return pending


class PolicyStore:
    """The state dir's committed policy (bytes + when) and the pending trial record."""

    def __init__(self, state_dir):
        self.dir = Path(state_dir)
        self._validated = set()  # sha256 of trial records whose policy parsed

    def committed(self):
        """The committed Policy, or None if nothing was ever committed."""
        path = self.dir / COMMITTED
        if not path.exists():
            return None
        return policy_mod.load(path)

    def meta(self):
        try:
            return json.loads((self.dir / COMMITTED_META).read_text())
        except (OSError, ValueError):
            return None

    def commit(self, data, policy, now=None):
        atomic_write(self.dir / COMMITTED, data)
        atomic_write(self.dir / COMMITTED_META, json.dumps({
            "source": policy.source, "sha256": policy.digest,
            "committed_at": time.time() if now is None else now,
        }).encode())
        (self.dir / HELD_BACK).unlink(missing_ok=True)

    def hold_back(self, source, reason, now):
        """Record that the first policy was not enforced, and why (status, doctor)."""
        atomic_write(self.dir / HELD_BACK, json.dumps(
            {"source": str(source), "reason": reason, "at": now}).encode())

    def held_back(self):
        """{"source", "reason", "at"} while nothing is enforced for that reason, else None."""
        try:
            record = json.loads((self.dir / HELD_BACK).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or (self.dir / COMMITTED).exists():
            return None
        return {key: record.get(key) for key in ("source", "reason", "at")}

    def pending(self):
        """The trial on record, or None. A damaged record counts as no trial.

        Damage is possible only from outside (the record is written atomically);
        treating it as "no trial" is the safe reading: the kernel's timer still
        ends the candidate, and nothing can confirm a candidate we cannot read.
        """
        path = self.dir / PENDING
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: unreadable trial record (%s); treating it as no trial", path, exc)
            return None
        try:
            pending = Pending.from_json(raw)
            # Validated once per candidate: the daemon looks twice a second, and
            # parsing a 100k-network policy each time would cost it seconds.
            if pending.sha256 not in self._validated:
                pending.policy()
                self._validated.add(pending.sha256)
        except (ValueError, InputError) as exc:
            log.warning("%s: damaged trial record (%s); treating it as no trial", path, exc)
            return None
        return pending

    def set_pending(self, pending):
        atomic_write(self.dir / PENDING, pending.to_json())

    def clear_pending(self):
        path = self.dir / PENDING
        if path.exists() or path.is_symlink():
            path.unlink()
            _fsync_dir(self.dir)

    @contextlib.contextmanager
    def locked(self, wait=True):
        """Serialise state changes between the CLI and the daemon.

        An flock dies with its process, so a killed apply never leaves it held.
        With wait=False it yields False at once when someone else holds it.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def empty_policy(table):
    """A policy that guards nothing: what "committed" means before the first commit.

    Only for the trial's fallback slot; operators cannot write one (loads()
    requires a service), so nothing else should build it.
    """
    return policy_mod.Policy(table=table, services=(),
                             bans=policy_mod.BanSettings(ports=()),
                             source="<nothing committed>", digest="")


# --- the anti-lockout lint -------------------------------------------------

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
    from policyd import netdiag  # pyroute2 only where the host is asked
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
    for peer in peers:
        key = (peer.address, peer.port, peer.proto)
        if key in seen:
            continue
        seen.add(key)
        decision = explain.decide(policy, peer.address, peer.port, peer.proto)
        if decision.verdict in ("drop", "reject"):
            decision = explain.decide(policy, peer.address, peer.port, peer.proto,
                                      iface_of(peer.address))
        if decision.verdict in ("drop", "reject"):
            cuts.append((peer, decision))
    return cuts


def _route_iface(address):
    from policyd import netdiag
    return netdiag.interface_towards(address)


def _lint(policy, peers, iface_of):
    cuts = lockout_cuts(policy, peers(policy), iface_of)
    if not cuts:
        return
    peer, decision = cuts[0]
    more = f" (and {len(cuts) - 1} more)" if len(cuts) > 1 else ""
    raise LockoutRisk(
        f"refusing: {peer.address} on {peer.proto} port {peer.port} ({peer.origin}) "
        f"would be cut by {decision.rule}{more}; fix the policy or use --force")


def lint_in_child(policy, peers=operator_peers, iface_of=_route_iface):
    """_lint in a forked child, for the daemon's first start: the sock_diag queries
    load pyroute2 (~11 MB), which must not stay resident in a long-running daemon.
    Raises LockoutRisk as _lint does; any other failure of the child is a LockoutRisk
    too (it could not prove that nobody is cut)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no threads run here yet (the daemon forks before any)
        code = 0
        try:
            os.close(read_end)
            try:
                _lint(policy, peers, iface_of)
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


# --- the state machine ------------------------------------------------------

def _refuse_if_running(store, now):
    pending = store.pending()
    if pending is not None and now < pending.deadline:
        raise TrialRunning(
            f"a trial of {pending.source} is running until {format_time(pending.deadline)}; "
            "end it first with `policyd confirm` or `policyd rollback`")
    return pending


def _fallback(store, table):
    return store.committed() or empty_policy(table)


def read_candidate(path):
    """(bytes, Policy) of the file an operator applies, proven loadable by the daemon.

    The path is made absolute first: the state dir records where a policy came
    from, and "policy.yaml" means nothing to a later reader in another directory.
    """
    data, policy = policy_mod.read(os.path.abspath(path))
    preflight.check_log_sources(policy)
    return data, policy


def apply(nft, store, path, *, force=False, peers=operator_peers, iface_of=_route_iface,
          now=None, lint=None):
    """Load the policy at `path` in one transaction and make it the committed one.

    `lint(policy)` replaces the anti-lockout lint (the daemon runs it in a child)."""
    now = time.time() if now is None else now
    data, policy = read_candidate(path)
    if lint is not None and not force:
        lint(policy)
    elif not force:
        _lint(policy, peers, iface_of)
    with store.locked():
        _refuse_if_running(store, now)
        previous = store.committed()
        document = compile_policy(policy)
        if previous is not None and previous.table != policy.table:
            # The old guard table goes in the same transaction: left loaded it
            # would go on dropping what the new policy allows. The old ban table
            # stays until its bans are in the new one (move_bans), so no ban
            # lapses meanwhile.
            document["nftables"] += _delete_table(previous.table)
        nft.load(document)
        store.commit(data, policy, now)
        store.clear_pending()  # an expired trial's record, if one was left
    return policy


def _delete_table(name):
    # `add` first makes `delete` safe when the table is gone already.
    return [{"add": {"table": {"family": FAMILY, "name": name}}},
            {"delete": {"table": {"family": FAMILY, "name": name}}}]


def retire_table(nft, name):
    """Delete one of policyd's former tables (a policy moved to another `table:`)."""
    nft.load({"nftables": [{"metainfo": {"json_schema_version": 1}}, *_delete_table(name)]})


def start_trial(nft, store, path, seconds, *, force=False, peers=operator_peers,
                iface_of=_route_iface, now=None):
    """Load the policy at `path` on trial for `seconds`; return its Pending record.

    The record is on disk before the kernel sees the candidate, so the daemon's
    second guard knows the deadline even if this process dies mid-way; the
    committed policy on disk is not touched.
    """
    if seconds < 1:
        raise InputError("must be at least 1 second", key="--confirm-timeout")
    now = time.time() if now is None else now
    data, candidate = read_candidate(path)
    if not force:
        _lint(candidate, peers, iface_of)
    with store.locked():
        _refuse_if_running(store, now)
        committed = store.committed()
        if committed is not None and committed.table != candidate.table:
            raise InputError(f"a trial cannot move the policy from table {committed.table!r} "
                             f"to {candidate.table!r}; apply it without --confirm-timeout",
                             path, key="table")
        pending = Pending(data=data, source=candidate.source, sha256=candidate.digest,
                          started_at=now, deadline=now + seconds, seconds=seconds,
                          previous_sha256=committed.digest if committed else None)
        store.set_pending(pending)
        try:
            nft.load(compile_policy(committed or empty_policy(candidate.table),
                                    candidate, seconds))
        except BaseException:
            store.clear_pending()
            raise
    return pending


def _trial_elements(nft, table):
    try:
        return [value for value, _timeout, _expires in nft.set_elements(table, TRIAL_SET)]
    except KernelError:
        return []  # no trial set: no trial in the kernel


def _end_expired(nft, store, pending):
    """The kernel already runs the committed chains; drop the stale candidate."""
    nft.load(compile_policy(_fallback(store, pending.policy().table)))
    store.clear_pending()


def confirm(nft, store, now=None):
    """Make the candidate on trial the committed policy; return it.

    One transaction deletes the trial element and loads the candidate as the
    committed policy. After the deadline the element is gone, the delete fails
    and so does the whole transaction: TooLate, and the candidate never returns.
    """
    if store.pending() is None:
        # Before the lock: saying no must not create a state dir or lock file.
        raise NoTrial("no trial to confirm")
    with store.locked():
        now = time.time() if now is None else now
        pending = store.pending()
        if pending is None:
            raise NoTrial("no trial to confirm")
        candidate = pending.policy()
        too_late = TooLate(f"too late: the trial of {pending.source} ended at "
                           f"{format_time(pending.deadline)}; the committed policy stays")
        if now >= pending.deadline:
            _end_expired(nft, store, pending)
            raise too_late
        elements = _trial_elements(nft, candidate.table)
        if not elements:
            _end_expired(nft, store, pending)
            raise too_late
        document = compile_policy(candidate)
        # Before the table is replaced: the delete is what proves the trial is alive.
        document["nftables"].insert(1, {"delete": {"element": {
            "family": FAMILY, "table": candidate.table, "name": TRIAL_SET,
            "elem": elements}}})
        try:
            nft.load(document)
        except KernelError:
            if _trial_elements(nft, candidate.table):
                raise
            _end_expired(nft, store, pending)
            raise too_late from None
        store.commit(pending.data, candidate, now)
        store.clear_pending()
    return candidate


def rollback(nft, store):
    """Reload the committed policy now and forget the trial; return the Pending ended.

    Without a trial on record it still reloads the committed policy when the
    kernel runs a trial (its record was damaged), and returns None; with no
    trial anywhere it says no (NoTrial), as confirm does, and changes nothing.
    """
    if store.pending() is None and store.committed() is None:
        # Before the lock: saying no must not create a state dir or lock file.
        raise NoTrial("no trial to roll back")
    with store.locked():
        pending = store.pending()
        committed = store.committed()
        if pending is None and (committed is None
                                or not _trial_elements(nft, committed.table)):
            raise NoTrial("no trial to roll back; the committed policy stays")
        nft.load(compile_policy(committed or empty_policy(pending.policy().table)))
        store.clear_pending()
    return pending


def enforce(nft, store, now=None):
    """The second guard: roll back a trial whose deadline has passed; True if it did.

    The daemon calls this every second. On kernels where the trial set does its
    job this only tidies up; on kernels where it does not, this is the rollback.
    """
    with store.locked():
        now = time.time() if now is None else now
        pending = store.pending()
        if pending is None or now < pending.deadline:
            return False
        _end_expired(nft, store, pending)
    log.warning("trial of %s passed its deadline unconfirmed: rolled back", pending.source)
    return True


def restore_committed(nft, store):
    """Load only the committed policy and discard any trial (boot: a reboot is a rollback).

    Returns the committed Policy, or None when nothing was ever committed.
    """
    with store.locked():
        return restore_committed_locked(nft, store)


def restore_committed_locked(nft, store):
    """restore_committed for a caller that already holds the store's lock."""
    pending = store.pending()
    committed = store.committed()
    if committed is not None:
        nft.load(compile_policy(committed))
    elif pending is not None:
        nft.load(compile_policy(empty_policy(pending.policy().table)))
    store.clear_pending()
    return committed


def status(store, now=None, nft=None):
    """The committed policy and the trial, for `policyd status`.

    {"committed": {"sha256", "source", "committed_at"} | None,
     "trial": {"candidate_sha256", "source", "started_at", "deadline", "seconds",
               "seconds_left", "previous_sha256", ["kernel_seconds_left"]} | None,
     "ended_trial": {"candidate_sha256", "source", "deadline"} | None,
     "held_back": {"source", "reason", "at"} | None}
    `kernel_seconds_left` (only when `nft` is given) is what the kernel's timer says.
    A trial past its deadline is `ended_trial`, never `trial`: the kernel has
    already gone back to the committed policy.
    """
    now = time.time() if now is None else now
    meta = store.meta()
    committed = None
    if meta:
        committed = {key: meta.get(key) for key in ("sha256", "source", "committed_at")}
    pending = store.pending()
    trial = ended = None
    if pending is not None and now >= pending.deadline:
        # The kernel ended it at the deadline; only the record waits for a daemon
        # (or `policyd rollback`) to clear it. It is not pending any more.
        ended = {"candidate_sha256": pending.sha256, "source": pending.source,
                 "deadline": pending.deadline}
    elif pending is not None:
        trial = {"candidate_sha256": pending.sha256, "source": pending.source,
                 "started_at": pending.started_at, "deadline": pending.deadline,
                 "seconds": pending.seconds,
                 "seconds_left": max(0.0, round(pending.deadline - now, 1)),
                 "previous_sha256": pending.previous_sha256}
        if nft is not None:
            trial["kernel_seconds_left"] = _kernel_seconds_left(nft, pending)
    return {"committed": committed, "trial": trial, "ended_trial": ended,
            "held_back": store.held_back()}


def _kernel_seconds_left(nft, pending):
    try:
        elements = nft.set_elements(pending.policy().table, TRIAL_SET)
    except KernelError:
        return 0
    return max((expires or 0 for _value, _timeout, expires in elements), default=0)


def format_time(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))
