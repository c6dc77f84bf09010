"""Loading a policy into the kernel and keeping the committed one on disk.

The committed policy is the one a reboot restores; it is written only by a
plain apply (and, with trials, by confirm), atomically, so a crash never
leaves half a file.
"""
import json
import os
import tempfile
import time
from pathlib import Path

from policyd import policy as policy_mod
from policyd.compile import compile_policy

COMMITTED = "committed.yaml"
COMMITTED_META = "committed.json"


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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class PolicyStore:
    """The committed policy in the state dir: its exact bytes and when it was committed."""

    def __init__(self, state_dir):
        self.dir = Path(state_dir)

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

    def commit(self, data, policy):
        atomic_write(self.dir / COMMITTED, data)
        atomic_write(self.dir / COMMITTED_META, json.dumps({
            "source": policy.source, "sha256": policy.digest, "committed_at": time.time(),
        }).encode())


def apply(nft, store, path):
    """Load the policy at `path` in one transaction and make it the committed one."""
    data, policy = policy_mod.read(path)
    nft.load(compile_policy(policy))
    store.commit(data, policy)
    return policy
