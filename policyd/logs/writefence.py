"""Whether a write(2) to a log is still being copied into it, asked of the kernel.

Owns the one question policyd.logs.tail cannot answer from the bytes: a read
that ends on a page boundary may have cut a write in two (the kernel grows a
file page by page while it copies a write), or may have ended between writes.
"""
import ctypes
import os
import threading

# Filesystems whose lseek(SEEK_DATA) takes the inode lock that a buffered
# write(2) holds from its first byte to its last (ext4's llseek takes it
# shared, tmpfs' exclusive): once that lseek returns, no write begun before it
# is half copied. The kernel contract suite (tests/kernel) stalls a real write
# half way to show it, on 6.1 and the host's kernel. Elsewhere (xfs, btrfs,
# overlayfs, NFS ...) nothing here says so, and a read is held as before.
FENCED_FILESYSTEMS = {
    0xEF53: "ext2/ext3/ext4",
    0x01021994: "tmpfs",
}
# How long the caller waits for the lock: a write holds it for microseconds,
# unless the writer is stalled (a slow disk, reclaim); then the caller goes on
# without an answer rather than stall with it.
FENCE_SECONDS = 0.05


def filesystem_type(fd):
    """fstatfs(2)'s f_type of the file open at `fd`, or None."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs, f_type (a long) first
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fstatfs(fd, buffer) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def is_fenced(fd):
    return filesystem_type(fd) in FENCED_FILESYSTEMS


class WriteFence:
    """For one log: after a read that ended at `offset`, is every write that had
    begun by then complete, and does the file still end at `offset`?

    The lock is waited for on a thread of its own, at most FENCE_SECONDS; a
    wait still blocked then (a stalled writer) answers no, as does every later
    question until that wait ends: at most one thread per log is ever blocked.
    """

    def __init__(self, seconds=FENCE_SECONDS):
        self.seconds = seconds
        self._waiting = None

    def ends_between_writes(self, fd, offset):
        if self._waiting is not None and self._waiting.is_alive():
            return False
        try:
            if os.fstat(fd).st_size != offset:
                return False  # more to read (a flood read in slices): no need to ask
        except OSError:
            return False
        found = {}
        own = os.dup(fd)  # the follower may close its descriptor meanwhile

        def wait():
            try:
                os.lseek(own, 0, os.SEEK_DATA)  # returns once no write holds the inode
                found["size"] = os.fstat(own).st_size
            except OSError:
                pass
            finally:
                os.close(own)

        waiting = threading.Thread(target=wait, name="policyd-write-fence", daemon=True)
        waiting.start()
        waiting.join(self.seconds)
        if waiting.is_alive():
            self._waiting = waiting
            return False
        self._waiting = None
        return found.get("size") == offset
