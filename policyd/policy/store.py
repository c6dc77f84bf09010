"""The state dir's policies: the committed policy (bytes and when), the pending
trial record, the held-back note of a first policy not enforced, and the lock
that serialises their changes between the CLI and the daemon.
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

from policyd.errors import InputError

COMMITTED = "committed.yaml"
COMMITTED_META = "committed.json"
PENDING = "pending.json"
LOCK = "trial.lock"
PENDING_VERSION = 1
# Written by a daemon that found nothing committed and did not enforce the policy
# file (it would cut a connected client, or it does not load); gone at the first commit.
HELD_BACK = "held-back.json"

log = logging.getLogger(__name__)


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
        from policyd.policy import reader as policy_mod  # yaml and the model: not for `bans`, `status`
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
        from policyd.policy import reader as policy_mod  # yaml and the model: not for `bans`, `status`
        return policy_mod.load(path)

    def committed_tables(self, data, policy):
        """(table, bans_table) of the committed policy, or None if nothing was committed.

        When the committed bytes are `data` (a re-apply) they are `policy`'s: the
        tables come from the policy file alone, so 100k entries are not parsed again.
        """
        path = self.dir / COMMITTED
        try:
            if path.read_bytes() == data:
                return policy.table, policy.bans_table
        except FileNotFoundError:
            return None
        except OSError:
            pass  # unreadable: committed() below says why
        committed = self.committed()
        return None if committed is None else (committed.table, committed.bans_table)

    def meta(self):
        """The committed policy's record ({"source", "sha256", "committed_at"}), None
        if there is none or it is not a JSON object (a field may still be missing
        or of another type: policyd.kernel.trialstate.status reads it for show)."""
        try:
            record = json.loads((self.dir / COMMITTED_META).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

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
