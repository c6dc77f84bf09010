"""Waking the daemon when a followed file may have changed: watchdog (inotify) on
each file's directory, polling for a directory that does not exist yet, and a
periodic safety net. Reading the files is policyd.logs.tail's.
"""
import os
import threading
import time
from collections.abc import Callable, Iterable

from watchdog.events import EVENT_TYPE_DELETED, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch


class LogWatcher:
    """Wakes the caller when a watched log may have changed.

    Watches each log's parent directory with watchdog (inotify), because the
    log may not exist yet and rotation puts a new inode under the same name.
    on_change(path) runs on the observer or the poll thread. A directory that
    is missing (or deleted later) is polled every missing_dir_interval seconds
    and watched once it exists; with poll_interval set, every path is also
    reported that often, as a safety net.
    """

    def __init__(
        self,
        paths: Iterable[str],
        on_change: Callable[[str], None],
        poll_interval: float | None = None,
        missing_dir_interval: float = 1.0,
    ):
        self.paths = [os.path.abspath(path) for path in paths]
        self._on_change = on_change
        self._poll_interval = poll_interval
        self._missing_dir_interval = missing_dir_interval
        self._by_directory: dict[str, list[str]] = {}
        for path in self.paths:
            self._by_directory.setdefault(os.path.dirname(path), []).append(path)
        self._handler = _DirectoryEvents(self)
        self._watches: dict[str, ObservedWatch] = {}
        self._dead_watches: list[ObservedWatch] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._observer: Observer | None = None
        self._poller: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._observer = Observer()
        self._observer.start()
        self._watch_directories()
        self._poller = threading.Thread(target=self._poll, name="policyd-log-poll", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        self._watches.clear()
        self._dead_watches.clear()

    def watching(self, directory: str) -> bool:
        return os.path.abspath(directory) in self._watches

    def _watch_directories(self) -> None:
        with self._lock:
            for watch in self._dead_watches:
                try:
                    self._observer.unschedule(watch)
                except (KeyError, OSError):
                    pass
            self._dead_watches.clear()
            newly_watched = []
            for directory in self._by_directory:
                if directory in self._watches or not os.path.isdir(directory):
                    continue
                try:
                    self._watches[directory] = self._observer.schedule(self._handler, directory)
                except OSError:
                    continue  # vanished meanwhile; the next poll retries
                newly_watched.append(directory)
        # Whatever was written before the watch existed would go unreported.
        for directory in newly_watched:
            for path in self._by_directory[directory]:
                self._on_change(path)

    def _poll(self) -> None:
        tick = self._missing_dir_interval
        if self._poll_interval is not None:
            tick = min(tick, self._poll_interval)
        last_full_poll = time.monotonic()
        while not self._stopping.wait(tick):
            self._watch_directories()
            with self._lock:
                unwatched = [d for d in self._by_directory if d not in self._watches]
            due = self._poll_interval is not None and (
                time.monotonic() - last_full_poll >= self._poll_interval
            )
            if due:
                last_full_poll = time.monotonic()
                report = self.paths
            else:
                report = [path for d in unwatched for path in self._by_directory[d]]
            for path in report:
                self._on_change(path)

    def _event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type == EVENT_TYPE_DELETED and event.src_path in self._by_directory:
                # The inotify watch died with its directory; the poll thread
                # replaces it once the directory is back.
                with self._lock:
                    watch = self._watches.pop(event.src_path, None)
                    if watch is not None:
                        self._dead_watches.append(watch)
                for path in self._by_directory[event.src_path]:
                    self._on_change(path)
            return
        touched = (event.src_path, getattr(event, "dest_path", None))
        for path in self.paths:
            if path in touched:
                self._on_change(path)


class _DirectoryEvents(FileSystemEventHandler):
    def __init__(self, watcher: LogWatcher):
        super().__init__()
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._watcher._event(event)
