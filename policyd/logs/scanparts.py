"""Splitting `policyd test-filter`'s scan of a big log between processes.

Owns cutting a file into parts at line starts, one per process, forking a child
for each part after the first, and adding each child's counts (hosts by text)
to the parent's; a child that fails has its part scanned by the parent.
"""
import os

from policyd.logs.filters import MAX_LINE_BYTES


class ScanCounts:
    """A child's counts (policyd.logs.scan.ScanResult's fields it adds to)."""

    def __init__(self):
        self.lines = self.matched = self.ignored = self.malformed = self.forged = 0


def scan(scan_part, parts, result, hosts):
    """scan_part(first, stop, result, hosts) for each (first, stop) of `parts`, the
    first in this process, each other in a child; everything added to result and
    hosts ({key: [address or host text, count]})."""
    children = []
    try:
        for first, stop in parts[1:]:
            children.append(_fork(scan_part, first, stop))
        scan_part(*parts[0], result, hosts)
        for (first, stop), child in zip(parts[1:], children):
            if not _merge(child, result, hosts):   # it failed: its part here
                scan_part(first, stop, result, hosts)
    finally:
        _reap(children)


MAX_WORKERS = 2
PARALLEL_BYTES = 8 << 20   # a part smaller than this is scanned sooner than a process is forked


def parts(fd, workers):
    """[(first, stop)] byte ranges of the file, split at line starts, one per worker."""
    if workers is None:
        try:
            workers = min(MAX_WORKERS, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            workers = 1
    size = os.fstat(fd).st_size
    workers = min(workers, size // PARALLEL_BYTES) if workers > 1 else 1
    if workers <= 1:
        return [(0, None)]
    bounds = [0]
    for number in range(1, workers):
        at = max(bounds[-1], size * number // workers)
        piece = os.pread(fd, MAX_LINE_BYTES, at)
        cut = piece.find(b"\n")
        if cut < 0 or at + cut + 1 >= size:
            break
        bounds.append(at + cut + 1)
    return [(first, stop) for first, stop in zip(bounds, bounds[1:] + [None])]


def _fork(scan_part, first, stop):
    """[pid, pipe] of a child process scanning [first, stop) and writing its counts
    ([] if none could be started)."""
    import marshal
    try:
        readable, writable = os.pipe()
    except OSError:
        return []
    try:
        pid = os.fork()
    except OSError:
        os.close(readable)
        os.close(writable)
        return []   # no process to spare: the parent scans this part too
    if pid:
        os.close(writable)
        return [pid, readable]
    status = 1
    try:
        os.close(readable)
        part, hosts = scan_part(first, stop, ScanCounts(), {})
        data = marshal.dumps((part.lines, part.matched, part.ignored, part.malformed, part.forged,
                              [(str(address), count) for address, count in hosts.values()]))
        with os.fdopen(writable, "wb") as out:
            out.write(data)
        status = 0
    finally:
        os._exit(status)   # never the parent's cleanup, buffers or exit handlers


def _merge(child, result, hosts):
    """Add a child's counts to result and hosts; False if it did not finish."""
    import marshal
    if not child:
        return False
    pid, readable = child
    with os.fdopen(readable, "rb") as stream:
        data = stream.read()
    _pid, status = os.waitpid(pid, 0)
    child.clear()
    if status != 0:
        return False
    try:
        lines, matched, ignored, malformed, forged, counted = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return False
    result.lines += lines
    result.matched += matched
    result.ignored += ignored
    result.malformed += malformed
    result.forged += forged
    for text, count in counted:   # keyed apart from the parent's id() keys; merged by text
        tally = hosts.setdefault(("child", text), [text, 0])
        tally[1] += count
    return True


def _reap(children):
    for child in children:
        if child:   # not merged: an error in the parent
            pid, readable = child
            os.close(readable)
            os.kill(pid, 9)
            os.waitpid(pid, 0)
