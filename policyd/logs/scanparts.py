"""Splitting `policyd test-filter`'s scan of a big log between processes.

Owns cutting a file into parts at line starts, one per process, forking a child
for each part after the first, and adding each child's counts to the parent's
(the failures per host in a HostTally); a child that fails has its part scanned
by the parent.
"""
import os
from collections import Counter, _count_elements   # the latter: Counter's own C loop, into any dict

from policyd.logs.filters import _HOST_CACHE, MAX_LINE_BYTES, _cached_parse_host


class ScanCounts:
    """A child's counts (policyd.logs.scan.ScanResult's fields it adds to)."""

    def __init__(self):
        self.lines = self.matched = self.ignored = self.malformed = self.forged = 0


class HostTally:
    """Failures per host while a log is scanned, counted three ways so that no
    path hashes an ipaddress object (slow Python code): by the address object's
    id (the per-line paths), by host text at C speed (the bulk path, texts
    filters' host cache holds as good), and by final text (a child's counts)."""

    def __init__(self):
        self._by_id = {}        # id(address): [address, count]; the list keeps the id's object alive
        self._by_raw = {}       # host text as the log has it: count
        self._by_text = {}      # str(address): count

    def add(self, address, count):
        entry = self._by_id.get(id(address))
        if entry is None:
            self._by_id[id(address)] = [address, count]
        else:
            entry[1] += count

    def add_all(self, addresses):
        """Count each of `addresses` (cached address objects, so one object per
        host) once, by id at C speed."""
        by_id = dict(zip(map(id, addresses), addresses))
        for key, count in Counter(map(id, addresses)).items():
            self.add(by_id[key], count)

    def add_raw(self, raws):
        """Count host texts the bulk path found good (in filters' host cache)."""
        _count_elements(self._by_raw, raws)

    def add_text(self, text, count):
        self._by_text[text] = self._by_text.get(text, 0) + count

    def counts(self):
        """{address as text: failures}."""
        counts = dict(self._by_text)
        for address, count in self._by_id.values():
            counts[str(address)] = counts.get(str(address), 0) + count
        for raw, count in self._by_raw.items():
            # Parsed again only if the cache was cleared meanwhile (it holds 131k hosts).
            text = str(_HOST_CACHE.get(raw) or _cached_parse_host(raw))
            counts[text] = counts.get(text, 0) + count
        return counts


def scan(scan_part, parts, result, hosts):
    """scan_part(first, stop, result, hosts) for each (first, stop) of `parts`, the
    first in this process, each other in a child; everything added to result and
    hosts (a HostTally)."""
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
        part, hosts = scan_part(first, stop, ScanCounts(), HostTally())
        data = marshal.dumps((part.lines, part.matched, part.ignored, part.malformed, part.forged,
                              list(hosts.counts().items())))
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
    for text, count in counted:
        hosts.add_text(text, count)
    return True


def _reap(children):
    for child in children:
        if child:   # not merged: an error in the parent
            pid, readable = child
            os.close(readable)
            os.kill(pid, 9)
            os.waitpid(pid, 0)
