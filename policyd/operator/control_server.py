"""The daemon's control socket, served: root only (mode 0600 from birth plus an
SO_PEERCRED uid check), bounded serving on background threads, and the
hand-over of each request to the daemon's main loop (MainLoopCall).
"""

import concurrent.futures
import json
import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policyd.operator.control import (CODE_BAD_INPUT, CODE_REFUSED, CONNECTION_TIMEOUT,
                             MAX_CONNECTIONS, MAX_REQUEST_BYTES, PERMISSION_DENIED,
                             ControlError, RawPart, Stream, encode, one_line, peer_credentials)
from policyd.errors import HostError, PolicydError

log = logging.getLogger(__name__)

Handler = Callable[[str, dict], Any]


class ControlServer:
    """Serves `handler(command, args) -> result` on a root-only Unix socket.

    The handler runs on a server thread, one per connection and possibly
    several at once: the daemon must make it thread-safe, typically by wrapping
    its real handler in MainLoopCall. It raises InputError for bad arguments
    (answered with code 2), ControlError to refuse with its own code, and any
    other exception is answered with code 1 and logged; the server keeps going.
    One request per connection.
    """

    def __init__(self, path, handler: Handler, *, max_connections: int = MAX_CONNECTIONS,
                 timeout: float = CONNECTION_TIMEOUT):
        self.path = Path(path)
        self.handler = handler
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener: socket.socket | None = None
        self._bound_inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._connections: set[threading.Thread] = set()
        self._connections_lock = threading.Lock()

    def start(self) -> None:
        self._listener = self._bind()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._thread = None
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._unlink_own_socket()
        # Requests in flight get one connection timeout in total to finish.
        deadline = time.monotonic() + self.timeout
        with self._connections_lock:
            pending = list(self._connections)
        for thread in pending:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _bind(self) -> socket.socket:
        run_dir = self.path.parent
        if not run_dir.exists():
            run_dir.mkdir(mode=0o700, parents=True)
            os.chmod(run_dir, 0o700)  # mkdir's mode is filtered by the umask
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # Linux creates the socket file with the socket inode's mode minus
            # the umask, so this makes it 0600 from birth without touching the
            # process-wide umask that other threads rely on.
            os.fchmod(listener.fileno(), 0o600)
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(MAX_CONNECTIONS)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise HostError(f"cannot listen: {exc.strerror or exc}", file=self.path) from exc
        info = os.stat(self.path)
        self._bound_inode = (info.st_dev, info.st_ino)
        return listener

    def _remove_stale_socket(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise HostError("exists and is not a socket; refusing to replace it", file=self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)
            return
        except OSError:
            pass  # not provably stale: refuse below rather than steal a live daemon's socket
        finally:
            probe.close()
        raise HostError("another policyd is listening on this control socket", file=self.path)

    def _unlink_own_socket(self) -> None:
        # Only our own inode: a newer daemon may already have replaced the file.
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._bound_inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fd for key, _ in selector.select()}
                if self._wake_r in ready:
                    return
                try:
                    conn, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    # EMFILE and friends: wait a little instead of spinning.
                    log.warning("control socket: accept failed: %s", exc)
                    time.sleep(0.1)
                    continue
                self._dispatch(conn)

    def _dispatch(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(self.timeout)
        if not self._slots.acquire(blocking=False):
            self._answer_and_close(conn, {"ok": False, "error": "too many control connections; try again",
                                          "code": CODE_REFUSED})
            return
        thread = threading.Thread(target=self._serve_connection, args=(conn,),
                                  name="control-conn", daemon=True)
        with self._connections_lock:
            self._connections.add(thread)
        thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            _, uid, _ = peer_credentials(conn)
            if uid != 0:
                response = {"ok": False, "error": PERMISSION_DENIED, "code": CODE_REFUSED}
            else:
                try:
                    response = self._execute(*self._read_request(conn))
                except ControlError as exc:
                    response = {"ok": False, "error": exc.message, "code": exc.code}
            self._answer_and_close(conn, response)
        except OSError as exc:
            log.debug("control socket: connection dropped: %s", exc)
            conn.close()
        except Exception:
            log.exception("control socket: connection failed")
            conn.close()
        finally:
            self._slots.release()
            with self._connections_lock:
                self._connections.discard(threading.current_thread())

    def _read_request(self, conn: socket.socket) -> tuple[str, dict]:
        deadline = time.monotonic() + self.timeout
        data = b""
        while b"\n" not in data and len(data) <= MAX_REQUEST_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request not received in time")
            conn.settimeout(remaining)
            chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
        line = data.split(b"\n", 1)[0]
        if len(line) > MAX_REQUEST_BYTES:
            raise ControlError(f"request larger than {MAX_REQUEST_BYTES} bytes", CODE_BAD_INPUT)
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            request = None
        if not isinstance(request, dict):
            raise ControlError("request is not a JSON object", CODE_BAD_INPUT)
        command, args = request.get("command"), request.get("args", {})
        if not isinstance(command, str) or not command:
            raise ControlError("request has no command", CODE_BAD_INPUT)
        if not isinstance(args, dict):
            raise ControlError("request args is not an object", CODE_BAD_INPUT)
        return command, args

    def _execute(self, command: str, args: dict) -> bytes | Stream:
        """The encoded answer: encoded once, here, so an unencodable result is
        refused before anything is written (and 100k bans are not encoded twice).
        A Stream is left to _answer_and_close, which sends its parts as made."""
        try:
            result = self.handler(command, args)
            if isinstance(result, Stream):
                return result
            return encode({"ok": True, "result": result})
        except ControlError as exc:
            response = {"ok": False, "error": one_line(exc.message), "code": exc.code}
        except PolicydError as exc:  # input (2), host or kernel trouble (1): its own code
            response = {"ok": False, "error": one_line(exc.for_operator()), "code": exc.exit_code}
        except Exception as exc:  # the server outlives any handler bug
            log.error("control command %s failed", command, exc_info=True)
            response = {"ok": False, "error": one_line(f"{command}: {exc}" if str(exc) else
                                                       f"{command}: {type(exc).__name__}"),
                        "code": CODE_REFUSED}
        return encode(response)

    def _answer_and_close(self, conn: socket.socket, response: dict | bytes | Stream) -> None:
        try:
            if isinstance(response, Stream):
                self._stream(conn, response)
            else:
                conn.sendall(response if isinstance(response, bytes) else encode(response))
        except OSError as exc:
            log.debug("control socket: answer not delivered: %s", exc)
        finally:
            conn.close()

    @staticmethod
    def _stream(conn: socket.socket, stream: Stream) -> None:
        """Head, parts, end. A part that fails ends the answer without its last
        line, which the client reports; what it already printed stays printed."""
        conn.sendall(encode({"ok": True, "stream": True, "result": stream.head}))
        try:
            for part in stream.parts:
                if isinstance(part, RawPart):
                    conn.sendall(encode({"part": part.head, "bytes": len(part.data)}))
                    conn.sendall(part.data)
                else:
                    conn.sendall(encode({"part": part}))
        except OSError:
            raise
        except Exception:
            log.error("control socket: a streamed answer failed", exc_info=True)
            return
        conn.sendall(encode({"end": True}))


class MainLoopCall:
    """Runs control commands on the daemon's main loop instead of a server thread.

    Use an instance as ControlServer's handler: each call is queued, `wake()`
    (if given) nudges the main loop, and the server thread waits for the
    answer. The main loop calls `run_pending()` whenever it wakes up.
    """

    def __init__(self, handler: Handler, *, wake: Callable[[], None] | None = None,
                 timeout: float = CONNECTION_TIMEOUT - 1.0):
        self.handler = handler
        self.wake = wake
        self.timeout = timeout
        self._calls: queue.Queue = queue.Queue()

    def __call__(self, command: str, args: dict) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, command, args))
        if self.wake is not None:
            self.wake()
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise ControlError(f"{command}: the daemon is busy; nothing was done") from None
            # Already running on the main loop: its effect will happen, so wait for it.
            return future.result()

    def run_pending(self) -> int:
        """Run every queued command on the calling (main) thread; how many ran."""
        ran = 0
        while True:
            try:
                future, command, args = self._calls.get_nowait()
            except queue.Empty:
                return ran
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.handler(command, args))
            except BaseException as exc:  # handed to the waiting server thread
                future.set_exception(exc)
            ran += 1
