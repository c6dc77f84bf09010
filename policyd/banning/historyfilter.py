"""Which networks may have a row in the state file's ban history: a Bloom filter of
their keys, so that a flood of first offenders asks SQLite nothing (one query per
slice cost ~3 us per ban, and each query hands the GIL to the state writer).
"""
import logging
import sqlite3
import threading

log = logging.getLogger(__name__)

# Bits per expected key: with two probes, about 1.5% false positives when full.
BITS_PER_KEY = 16
MIN_BITS = 1 << 21  # 256 KiB


class HistoryFilter:
    """may_have(blob) is False only for a key with no stored history. The stored keys
    are read once, on a thread of its own (~0.1 s per 100k rows); until then every
    key may have history. Every key whose history this process hands to State must
    be add()ed first: this process is the only writer of the ban history."""

    def __init__(self, path):
        self._bits = None
        self._mask = 0
        self._early = []     # keys added before the stored ones were read
        self._read = None    # (bits, mask) once the thread has read them; False: it failed
        self._thread = threading.Thread(target=self._load, args=(path,), daemon=True,
                                        name="policyd-history")
        self._thread.start()

    def _load(self, path):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT key FROM ban_history").fetchall()
            finally:
                db.close()
        except sqlite3.Error as error:
            log.warning("ban history not read ahead, each ban asks the state file: %s", error)
            self._read = False
            return
        size = MIN_BITS
        while size < len(rows) * BITS_PER_KEY * 2:  # room for as many new keys
            size <<= 1
        bits, mask = bytearray(size >> 3), size - 1
        for (blob,) in rows:
            h = hash(blob)
            first, second = h & mask, (h >> 32) & mask
            bits[first >> 3] |= 1 << (first & 7)
            bits[second >> 3] |= 1 << (second & 7)
        self._read = (bits, mask)

    def wait(self, timeout=None):
        """Until the stored keys are read (tests; the daemon never waits)."""
        self._thread.join(timeout)

    def _ready(self):
        if self._bits is None and self._read:
            self._bits, self._mask = self._read
            early, self._early = self._early, None
            for blob in early:
                self._set(blob)
        return self._bits is not None

    def _set(self, blob):
        h = hash(blob)
        first, second = h & self._mask, (h >> 32) & self._mask
        self._bits[first >> 3] |= 1 << (first & 7)
        self._bits[second >> 3] |= 1 << (second & 7)

    def add(self, blob):
        if self._ready():
            self._set(blob)
        elif self._read is None:
            self._early.append(blob)

    def may_have(self, blob):
        if not self._ready():
            return True
        h = hash(blob)
        first, second = h & self._mask, (h >> 32) & self._mask
        bits = self._bits
        return bool(bits[first >> 3] & (1 << (first & 7)) and bits[second >> 3] & (1 << (second & 7)))
