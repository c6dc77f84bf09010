"""Control socket: round trips, error codes, bounds, and root-only access."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from policyd.operator import control
from policyd.operator.control import ControlError, DaemonUnavailable, request, socket_path
from policyd.operator.control_server import ControlServer, MainLoopCall
from policyd.errors import HostError, InputError, KernelError

NOBODY = 65534


def echo_handler(command, args):
    if command == "echo":
        return {"command": command, "args": args}
    if command == "bad":
        raise InputError("not an address", key="addr")
    if command == "refuse":
        raise ControlError("not banned", 1)
    if command == "crash":
        raise RuntimeError("boom\nsecond line")
    if command == "host":
        raise HostError("cannot read state database: disk I/O error", file="/var/lib/policyd/state.db")
    if command == "kernel":
        raise KernelError("Could not process rule: No such file or directory")
    raise InputError(f"unknown command {command}")


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture
def server(run_dir):
    with ControlServer(socket_path(run_dir), echo_handler) as served:
        yield served


def raw_exchange(path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(path))
        try:
            conn.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return json.loads(control.read_line(conn, 5))


def test_round_trip(server, run_dir):
    assert request(run_dir, "echo", addr="192.0.2.7", seconds=60) == {
        "command": "echo", "args": {"addr": "192.0.2.7", "seconds": 60}}


def test_run_dir_created_private_and_socket_0600(server, run_dir):
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    info = os.stat(socket_path(run_dir))
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600


def test_socket_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        with ControlServer(tmp_path / "control.sock", echo_handler):
            assert stat.S_IMODE(os.stat(tmp_path / "control.sock").st_mode) == 0o600
    finally:
        os.umask(old)


def test_input_error_is_code_2(server, run_dir):
    with pytest.raises(ControlError) as caught:
        request(run_dir, "bad")
    assert caught.value.code == 2
    assert str(caught.value) == "addr: not an address"


def test_handler_control_error_keeps_its_code(server, run_dir):
    with pytest.raises(ControlError) as caught:
        request(run_dir, "refuse")
    assert (caught.value.code, caught.value.message) == (1, "not banned")


@pytest.mark.parametrize("command, said", [
    ("host", "/var/lib/policyd/state.db: cannot read state database: disk I/O error"),
    ("kernel", "the kernel refused: Could not process rule: No such file or directory"),
])
def test_host_and_kernel_errors_are_code_1_with_their_own_words(server, run_dir, command, said):
    with pytest.raises(ControlError) as caught:
        request(run_dir, command)
    assert (caught.value.code, caught.value.message) == (1, said)


def test_handler_crash_is_code_1_one_line_and_server_keeps_serving(server, run_dir):
    with pytest.raises(ControlError) as caught:
        request(run_dir, "crash")
    assert caught.value.code == 1
    assert caught.value.message == "crash: boom second line"
    assert request(run_dir, "echo") == {"command": "echo", "args": {}}


def test_unserializable_result_is_an_error_not_a_broken_answer(run_dir):
    with ControlServer(socket_path(run_dir), lambda command, args: {1, 2}):
        with pytest.raises(ControlError) as caught:
            request(run_dir, "anything")
    assert caught.value.code == 1


def test_oversize_request_refused(server, run_dir):
    payload = b'{"command": "echo", "args": {"pad": "' + b"x" * (control.MAX_REQUEST_BYTES + 10) + b'"}}\n'
    answer = raw_exchange(socket_path(run_dir), payload)
    assert answer == {"ok": False, "error": f"request larger than {control.MAX_REQUEST_BYTES} bytes",
                      "code": 2}
    assert request(run_dir, "echo") == {"command": "echo", "args": {}}


@pytest.mark.parametrize("payload, error", [
    (b"not json\n", "request is not a JSON object"),
    (b"[1, 2]\n", "request is not a JSON object"),
    (b'{"args": {}}\n', "request has no command"),
    (b'{"command": "echo", "args": [1]}\n', "request args is not an object"),
])
def test_malformed_requests_are_code_2(server, run_dir, payload, error):
    assert raw_exchange(socket_path(run_dir), payload) == {"ok": False, "error": error, "code": 2}


def test_silent_client_times_out_and_frees_its_slot(run_dir):
    path = socket_path(run_dir)
    with ControlServer(path, echo_handler, max_connections=1, timeout=0.2):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.settimeout(5)
            silent.connect(str(path))
            assert silent.recv(100) == b""  # the server gave up on it and closed
        assert request(run_dir, "echo") == {"command": "echo", "args": {}}


def test_connection_cap_refuses_extra_clients(run_dir):
    path = socket_path(run_dir)
    release = threading.Event()
    entered = threading.Event()

    def blocking_handler(command, args):
        entered.set()
        release.wait(5)
        return "done"

    with ControlServer(path, blocking_handler, max_connections=1):
        first = {}
        worker = threading.Thread(target=lambda: first.update(result=request(run_dir, "slow")))
        worker.start()
        assert entered.wait(5)
        with pytest.raises(ControlError) as caught:
            request(run_dir, "echo")
        release.set()
        worker.join(5)
    assert caught.value.message == "too many control connections; try again"
    assert first == {"result": "done"}


def test_stale_socket_file_replaced(run_dir):
    path = socket_path(run_dir)
    run_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, nobody listens
    with ControlServer(path, echo_handler):
        assert request(run_dir, "echo") == {"command": "echo", "args": {}}
    assert not path.exists()


def test_live_socket_is_not_stolen(server, run_dir):
    with pytest.raises(HostError, match="another policyd is listening"):
        ControlServer(socket_path(run_dir), echo_handler).start()
    assert request(run_dir, "echo") == {"command": "echo", "args": {}}


def test_regular_file_in_the_way_is_refused(run_dir):
    run_dir.mkdir()
    socket_path(run_dir).write_text("precious")
    with pytest.raises(HostError, match="not a socket"):
        ControlServer(socket_path(run_dir), echo_handler).start()
    assert socket_path(run_dir).read_text() == "precious"


def test_daemon_unavailable_when_nothing_listens(run_dir):
    with pytest.raises(DaemonUnavailable):
        request(run_dir, "status")
    run_dir.mkdir()
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(socket_path(run_dir)))
    leftover.close()
    with pytest.raises(DaemonUnavailable):
        request(run_dir, "status")


def test_stop_unlinks_the_socket(run_dir):
    server = ControlServer(socket_path(run_dir), echo_handler)
    server.start()
    server.stop()
    assert not socket_path(run_dir).exists()
    with pytest.raises(DaemonUnavailable):
        request(run_dir, "echo")


def test_main_loop_call_runs_on_the_main_thread(run_dir):
    ran_on = []

    def handler(command, args):
        ran_on.append(threading.current_thread())
        if command == "bad":
            raise InputError("bad port", key="port")
        return args["n"] * 2

    wakeups = threading.Semaphore(0)
    calls = MainLoopCall(handler, wake=wakeups.release)
    with ControlServer(socket_path(run_dir), calls):
        answers = {}
        client = threading.Thread(target=lambda: answers.update(n=request(run_dir, "double", n=21)))
        client.start()
        assert wakeups.acquire(timeout=5)
        assert calls.run_pending() == 1
        client.join(5)
        client = threading.Thread(target=lambda: answers.update(error=catch(lambda: request(run_dir, "bad"))))
        client.start()
        assert wakeups.acquire(timeout=5)
        calls.run_pending()
        client.join(5)
    assert answers["n"] == 42
    assert (answers["error"].code, answers["error"].message) == (2, "port: bad port")
    assert ran_on == [threading.main_thread()] * 2


def test_main_loop_call_gives_up_when_the_loop_never_runs():
    calls = MainLoopCall(lambda command, args: "ran", timeout=0.05)
    with pytest.raises(ControlError, match="busy"):
        calls("status", {})
    assert calls.run_pending() == 0  # the abandoned call is not run late


def catch(action):
    try:
        action()
    except ControlError as exc:
        return exc
    raise AssertionError("no ControlError")


CLIENT_AS_NOBODY = textwrap.dedent("""
    import json, sys
    from policyd.operator.control import request, ControlError, DaemonUnavailable
    try:
        request(sys.argv[1], "echo")
        print(json.dumps({"outcome": "answered"}))
    except ControlError as exc:
        print(json.dumps({"outcome": "refused", "message": exc.message, "code": exc.code}))
    except DaemonUnavailable:
        print(json.dumps({"outcome": "unavailable"}))
""")


def run_client_as_nobody(run_dir) -> dict:
    def drop_privileges():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    done = subprocess.run([sys.executable, "-c", CLIENT_AS_NOBODY, str(run_dir)],
                          preexec_fn=drop_privileges, capture_output=True, text=True, timeout=30,
                          cwd="/", env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def shared_run_dir():
    # pytest's tmp_path lives under a 0700 directory nobody cannot traverse.
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    path = Path(tempfile.mkdtemp(prefix="policyd-control-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_non_root_client_refused_by_file_mode(shared_run_dir):
    with ControlServer(socket_path(shared_run_dir), echo_handler):
        assert run_client_as_nobody(shared_run_dir) == {
            "outcome": "refused", "message": control.PERMISSION_DENIED, "code": 1}
        assert request(shared_run_dir, "echo") == {"command": "echo", "args": {}}


def test_non_root_client_refused_by_peer_credentials(shared_run_dir):
    handled = []

    def recording_handler(command, args):
        handled.append(command)
        return "ok"

    with ControlServer(socket_path(shared_run_dir), recording_handler):
        os.chmod(socket_path(shared_run_dir), 0o666)  # let connect() through to the uid check
        assert run_client_as_nobody(shared_run_dir) == {
            "outcome": "refused", "message": control.PERMISSION_DENIED, "code": 1}
        assert handled == []
        assert request(shared_run_dir, "echo") == "ok"
    assert handled == ["echo"]


def _streaming_handler(command, args):
    def parts(fail_after=None):
        for i in range(args.get("count", 3)):
            if i == fail_after:
                raise RuntimeError("the book went away")
            yield {"i": i, "text": "x" * args.get("size", 10)}
    if command == "stream":
        return control.Stream(parts(), {"form": "test"})
    if command == "broken":
        return control.Stream(parts(fail_after=2))
    if command == "raw":
        return control.Stream(control.RawPart({"i": i}, bytes([i]) * 10 + b"\n{\"end\": true}\n")
                              for i in range(args["count"]))
    return echo_handler(command, args)


def test_a_streamed_answer_arrives_part_by_part(run_dir):
    with ControlServer(socket_path(run_dir), _streaming_handler):
        head, parts = control.request_parts(run_dir, "stream", count=40, size=100_000)
        assert head == {"form": "test"}
        assert [part["i"] for part in parts] == list(range(40))
        # An answer that is not a stream comes whole, as request() gives it.
        assert control.request_parts(run_dir, "echo", a=1) == (
            {"command": "echo", "args": {"a": 1}}, None)
        with pytest.raises(ControlError, match="not an address") as refused:
            control.request_parts(run_dir, "bad")
        assert refused.value.code == 2


def test_raw_parts_arrive_as_sent_between_json_parts(run_dir):
    # Bytes that look like the stream's own lines are data, never read as lines.
    with ControlServer(socket_path(run_dir), _streaming_handler):
        _head, parts = control.request_parts(run_dir, "raw", count=4)
        assert list(parts) == [control.RawPart({"i": i}, bytes([i]) * 10 + b"\n{\"end\": true}\n")
                               for i in range(4)]


@pytest.mark.parametrize("announced", [b'{"part": {}, "bytes": 99}\n' + b"x" * 10,
                                       b'{"part": {}, "bytes": -1}\n',
                                       b'{"part": {}, "bytes": "9"}\n' + b"x" * 9])
def test_a_raw_part_shorter_or_odder_than_announced_is_an_error(tmp_path, announced):
    path = tmp_path / control.SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def answer():
        conn, _ = listener.accept()
        conn.recv(1000)
        conn.sendall(b'{"ok": true, "stream": true, "result": {}}\n' + announced)
        conn.close()
    thread = threading.Thread(target=answer)
    thread.start()
    try:
        _head, parts = control.request_parts(tmp_path, "raw")
        with pytest.raises(ControlError, match="answer"):
            list(parts)
    finally:
        thread.join()
        listener.close()


def test_a_stream_that_fails_midway_is_an_error_after_the_parts_it_sent(run_dir):
    with ControlServer(socket_path(run_dir), _streaming_handler):
        _head, parts = control.request_parts(run_dir, "broken", count=5)
        received = []
        with pytest.raises(ControlError, match="closed the connection"):
            for part in parts:
                received.append(part["i"])
        assert received == [0, 1]
