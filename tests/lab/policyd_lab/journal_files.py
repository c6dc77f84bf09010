"""Real journal files for tests: entries in journald's export format, written by
systemd-journal-remote (no journald needed). Appending to the same file is seen
by a reader that follows it; a new file in the directory is a journald rotation."""
import os
import shutil
import struct
import subprocess
import threading
import time

JOURNAL_REMOTE = "/usr/lib/systemd/systemd-journal-remote"
BOOT_ID = "0123456789abcdef0123456789abcdef"
available = os.access(JOURNAL_REMOTE, os.X_OK)


def _as_journald_writes(fields, monotonic, transport):
    """An entry's fields with the ones journald adds itself (its "time", if given,
    becomes the realtime stamp)."""
    fields = dict(fields)
    return {"__REALTIME_TIMESTAMP": str(int(fields.pop("time", time.time()) * 1e6)),
            "__MONOTONIC_TIMESTAMP": str(monotonic), "_BOOT_ID": BOOT_ID,
            "_HOSTNAME": "box", "_TRANSPORT": transport, **fields}


class JournalWriter:
    """Appends entries to DIR/NAME.journal; rotate() starts a new file."""

    def __init__(self, directory, name="system"):
        self.directory = str(directory)
        self.name = name
        self.generation = 0
        self.monotonic = 1_000_000
        self.tmp = os.path.join(self.directory, ".export")
        os.makedirs(self.tmp, exist_ok=True)

    @property
    def file(self):
        return os.path.join(self.directory, f"{self.name}-{self.generation}.journal")

    def rotate(self):
        self.generation += 1
        return self.file

    def write(self, entries):
        """entries: dicts of field -> str or bytes (MESSAGE with newlines goes binary)."""
        blob = bytearray()
        for fields in entries:
            self.monotonic += 1000
            for key, value in _as_journald_writes(fields, self.monotonic, "syslog").items():
                data = value.encode() if isinstance(value, str) else value
                if b"\n" in data:
                    blob += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
                else:
                    blob += key.encode() + b"=" + data + b"\n"
            blob += b"\n"
        export = os.path.join(self.tmp, f"batch-{self.monotonic}.export")
        with open(export, "wb") as stream:
            stream.write(bytes(blob))
        subprocess.run([JOURNAL_REMOTE, f"--output={self.file}", export], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        os.unlink(export)

    def vacuum(self, generation):
        os.unlink(os.path.join(self.directory, f"{self.name}-{generation}.journal"))

    def cleanup(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def entry(unit, message, identifier=None, pid="4242", when=None, **extra):
    """One entry as journald writes it for a process of `unit` (in system.slice
    unless `_SYSTEMD_SLICE` is given)."""
    fields = {"_SYSTEMD_UNIT": unit, "_SYSTEMD_SLICE": "system.slice", "MESSAGE": message,
              "_PID": pid,
              "_COMM": identifier or unit.split(".")[0],
              "SYSLOG_IDENTIFIER": identifier or unit.split(".")[0], **extra}
    if when is not None:
        fields["time"] = when
    return fields


class JournalPipe:
    """A long-running systemd-journal-remote reading export format on stdin: entries
    sent are in the journal file within a fraction of a millisecond (as with journald)."""

    def __init__(self, file):
        self.monotonic = 1_000_000
        self.lock = threading.Lock()   # one entry's fields must not interleave with another's
        self.proc = subprocess.Popen([JOURNAL_REMOTE, f"--output={file}", "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def send(self, entries):
        with self.lock:
            self._send(entries)

    def _send(self, entries):
        blob = bytearray()
        for fields in entries:
            self.monotonic += 1000
            for key, value in _as_journald_writes(fields, self.monotonic, "stdout").items():
                blob += f"{key}={value}\n".encode()
            blob += b"\n"
        self.proc.stdin.write(bytes(blob))
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
