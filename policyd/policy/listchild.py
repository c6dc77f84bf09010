"""Parsing a changed list file in a child process, for the daemon.

Owns `python3 -m policyd.policy.listchild PATH`: it reads and parses the list
as policyd.policy.lists.read does and leaves the result in the list cache,
where the daemon then loads it in milliseconds. 100k lines parsed in the
daemon would hold its GIL, and the bans waiting for it, for hundreds of ms.
"""
import os
import select
import subprocess
import sys

# Far beyond a 100k-line parse; past it the daemon parses the list itself.
TIMEOUT_SECONDS = 60


def parse_in_child(path, cache_root):
    """Have a child parse the list file at `path` into the cache at `cache_root`;
    True if it did. The caller looks in the cache for the version it read, and
    parses itself if it is not there (a bad line, a newer version, a failure)."""
    try:
        # -P: `-m` would put the working directory first on sys.path, and a
        # daemon started from a directory others can write would run their code.
        child = subprocess.Popen([sys.executable, "-P", "-m", "policyd.policy.listchild", path],
                                 env=dict(os.environ, POLICYD_LIST_CACHE=cache_root),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    try:
        _wait(child)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return False
    return child.returncode == 0


def _wait(child):
    """Wait for the child, asleep until it exits (Popen.wait with a timeout polls,
    up to 50 ms late)."""
    try:
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        child.wait(TIMEOUT_SECONDS)
        return
    try:
        if not select.select([pidfd], [], [], TIMEOUT_SECONDS)[0]:
            raise subprocess.TimeoutExpired(child.args, TIMEOUT_SECONDS)
    finally:
        os.close(pidfd)
    child.wait()


def main(argv=None):
    from policyd.errors import InputError
    from policyd.policy import lists
    (path,) = sys.argv[1:] if argv is None else argv
    try:
        lists.read(path)
    except InputError:
        return 2  # the daemon's own parse says which line, as always
    return 0


if __name__ == "__main__":
    sys.exit(main())
