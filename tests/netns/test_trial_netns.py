"""Trials in a real kernel: whatever kills the operator's session or the machine,
an unconfirmed policy undoes itself; confirm, rollback, and the anti-lockout lint.

Every case proves itself with connections from the stranger: they work under
the committed policy, fail under the candidate, and work again within a second
after the deadline.
"""
import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import termios
import time

import pytest

from policyd_lab.netlab import POLICYD, REPO, wait_for
from policyd_lab.world import SERVER_V4, SERVER_V6, SERVER_WAN_V4, SERVER_WAN_V6, TRUSTED_V4
from policyd.policy.store import PENDING, PolicyStore

PORT = 11434
TRIAL_SECONDS = 4

# The committed policy lets both neighbours in; the candidate shuts the stranger out.
COMMITTED = """\
    version: 1
    services:
      ollama:
        ports: [11434]
        allow: [127.0.0.0/8, "::1", 192.0.2.0/24, "2001:db8:1::/64",
                198.51.100.0/24, "2001:db8:2::/64"]
"""
CANDIDATE = """\
    version: 1
    services:
      ollama:
        ports: [11434]
        allow: [127.0.0.0/8, "::1", 192.0.2.0/24, "2001:db8:1::/64"]
"""
# Shuts out the trusted neighbour instead: for the lint's established connections.
STRANGERS_ONLY = """\
    version: 1
    services:
      ollama:
        ports: [11434]
        allow: [198.51.100.0/24, "2001:db8:2::/64"]
"""


def policyd(host, *args, env=None, **kwargs):
    """The CLI without whatever SSH_CONNECTION the test runner itself has."""
    return host.policyd(*args, env={"SSH_CONNECTION": "", **(env or {})}, **kwargs)


def policyd_env(host):
    return dict(os.environ, **host.lab.policyd_env(host), SSH_CONNECTION="")


def store(world):
    return PolicyStore(world.lab.policyd_env(world.server)["POLICYD_STATE_DIR"])


def ruleset_without_clocks(host):
    """The ruleset with the trial element's countdown taken out."""
    return re.sub(r" expires \S+", "", host.ruleset())


def stranger_reaches(world, timeout=0.5):
    return world.stranger.can_connect(SERVER_WAN_V4, PORT, timeout)


@pytest.fixture
def served(world):
    """The server listening on the guarded port with COMMITTED applied and committed."""
    world.server.listen(PORT)
    world.committed_path = world.policy(COMMITTED, "committed.yaml")
    world.candidate_path = world.policy(CANDIDATE, "candidate.yaml")
    # Without the candidate the stranger gets through: every "fails" below can fail.
    assert policyd(world.server, "apply", world.committed_path).returncode == 0
    assert stranger_reaches(world)
    assert world.stranger.can_connect(SERVER_WAN_V6, PORT)
    return world


def start_trial(world, seconds=TRIAL_SECONDS):
    result = policyd(world.server, "apply", world.candidate_path,
                     "--confirm-timeout", str(seconds))
    assert result.returncode == 0, result.stderr
    return store(world).pending().deadline


def trial_live_in_kernel(host):
    result = host.nft("list", "set", "inet", "policyd", "trial", check=False)
    return result.returncode == 0 and "expires" in result.stdout


def assert_cut_then_back_by_deadline(world, deadline):
    """The candidate holds now, and the committed policy is back <= 1 s after `deadline`."""
    assert time.time() < deadline, "the test machine was too slow to see the trial"
    assert not stranger_reaches(world)
    assert world.trusted.can_connect(SERVER_V4, PORT)
    assert wait_for(lambda: stranger_reaches(world, timeout=0.3),
                    timeout=deadline + 1.0 - time.time(), interval=0.05)
    assert world.stranger.can_connect(SERVER_WAN_V6, PORT)


def assert_committed_unchanged(world):
    committed = store(world).dir / "committed.yaml"
    assert committed.read_bytes() == open(world.committed_path, "rb").read()


def spawn_apply_wait(world, **kwargs):
    return world.server.popen(*POLICYD, "apply", world.candidate_path,
                              "--confirm-timeout", str(TRIAL_SECONDS), "--wait",
                              env=policyd_env(world.server), cwd=REPO, **kwargs)


def test_sigkilled_apply_leaves_a_trial_that_ends_itself(served):
    world = served
    proc = spawn_apply_wait(world, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert wait_for(lambda: trial_live_in_kernel(world.server), timeout=10)
    deadline = store(world).pending().deadline
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert_cut_then_back_by_deadline(world, deadline)
    assert_committed_unchanged(world)


def test_terminal_hangup_leaves_a_trial_that_ends_itself(served):
    """The SSH session drops: the kernel hangs up the apply's controlling terminal."""
    world = served
    master, slave = pty.openpty()

    def take_terminal():  # runs after setsid(): the pty becomes the controlling tty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = spawn_apply_wait(world, stdin=slave, stdout=slave, stderr=slave,
                                preexec_fn=take_terminal)
    finally:
        os.close(slave)
    shown = b""
    while b"Keep this policy?" not in shown:
        readable, _, _ = select.select([master], [], [], 10)
        assert readable, f"no prompt on the terminal, only {shown!r}"
        shown += os.read(master, 4096)
    deadline = store(world).pending().deadline
    os.close(master)  # the hang-up
    assert proc.wait(timeout=5) == -signal.SIGHUP
    assert_cut_then_back_by_deadline(world, deadline)
    assert_committed_unchanged(world)


def test_reboot_brings_back_only_the_committed_policy(served):
    world = served
    start_trial(world, seconds=60)
    assert not stranger_reaches(world)
    # A reboot: the kernel starts without policyd's tables; boot runs `policyd restore`.
    world.server.nft("delete", "table", "inet", "policyd")
    world.server.nft("delete", "table", "inet", "policyd_bans")
    result = policyd(world.server, "restore")
    assert result.returncode == 0, result.stderr
    assert "committed.yaml" in result.stdout
    assert stranger_reaches(world)
    assert world.trusted.can_connect(SERVER_V4, PORT)
    ruleset = world.server.ruleset()
    assert "candidate" not in ruleset and "trial" not in ruleset
    assert "198.51.100.0/24" in ruleset  # the committed allowlist, not an empty table
    assert store(world).pending() is None
    assert policyd(world.server, "confirm").returncode == 1


def test_restore_on_a_service_restart_keeps_a_live_trial(served):
    """ExecStartPre runs `restore` on every start; only a boot (no tables) rolls back."""
    world = served
    deadline = start_trial(world)
    result = policyd(world.server, "restore")
    assert result.returncode == 0 and "kept the trial" in result.stdout
    assert store(world).pending() is not None
    assert_cut_then_back_by_deadline(world, deadline)


@pytest.mark.parametrize("damage", [lambda raw: raw[: len(raw) // 3], lambda raw: b"\0" * 64],
                         ids=["truncated", "garbage"])
def test_damaged_pending_file_is_no_trial_and_the_deadline_still_holds(served, damage):
    world = served
    deadline = start_trial(world)
    pending = store(world).dir / PENDING
    pending.write_bytes(damage(pending.read_bytes()))
    result = policyd(world.server, "confirm")
    assert result.returncode == 1
    assert "treating it as no trial" in result.stderr and "Traceback" not in result.stderr
    assert_cut_then_back_by_deadline(world, deadline)
    assert_committed_unchanged(world)
    # The next trial overwrites the damaged record.
    start_trial(world, seconds=60)
    assert policyd(world.server, "rollback").returncode == 0
    assert stranger_reaches(world)


def test_confirm_after_the_deadline_fails_and_changes_nothing(served):
    world = served
    deadline = start_trial(world, seconds=2)
    assert_cut_then_back_by_deadline(world, deadline)
    result = policyd(world.server, "confirm")
    assert result.returncode == 1
    assert "too late" in result.stderr and result.stderr.count("\n") == 1
    assert_committed_unchanged(world)
    assert stranger_reaches(world)
    assert "candidate" not in world.server.ruleset()
    assert policyd(world.server, "confirm").returncode == 1  # and nothing left to confirm


def test_confirm_in_time_keeps_the_candidate(served):
    world = served
    deadline = start_trial(world, seconds=3)
    assert not stranger_reaches(world)
    result = policyd(world.server, "confirm")
    assert result.returncode == 0, result.stderr
    time.sleep(max(0.0, deadline + 1.0 - time.time()))  # let the old deadline pass
    assert not stranger_reaches(world)
    assert world.trusted.can_connect(SERVER_V4, PORT)
    committed = store(world).dir / "committed.yaml"
    assert committed.read_bytes() == open(world.candidate_path, "rb").read()
    assert store(world).pending() is None


def test_wait_and_answer_y_confirms(served):
    world = served
    result = policyd(world.server, "apply", world.candidate_path, "--confirm-timeout", "30",
                     "--wait", input="y\n")
    assert result.returncode == 0, result.stderr
    assert "Keep this policy? [y/N]" in result.stdout
    assert not stranger_reaches(world)
    assert store(world).pending() is None


def test_wait_and_any_other_answer_rolls_back(served):
    world = served
    result = policyd(world.server, "apply", world.candidate_path, "--confirm-timeout", "30",
                     "--wait", input="n\n")
    assert result.returncode == 1
    assert "rolled back" in result.stderr
    assert stranger_reaches(world)
    assert_committed_unchanged(world)


def test_rollback_restores_the_committed_policy_now(served):
    world = served
    start_trial(world, seconds=60)
    assert not stranger_reaches(world)
    result = policyd(world.server, "rollback")
    assert result.returncode == 0, result.stderr
    assert stranger_reaches(world)
    assert store(world).pending() is None
    assert_committed_unchanged(world)


def test_second_apply_during_a_trial_is_refused(served):
    world = served
    start_trial(world, seconds=60)
    before = ruleset_without_clocks(world.server)
    for extra in (["--confirm-timeout", "30"], []):
        result = policyd(world.server, "apply", world.committed_path, *extra)
        assert result.returncode == 1
        assert "policyd confirm" in result.stderr and "policyd rollback" in result.stderr
        assert result.stderr.count("\n") == 1
    assert ruleset_without_clocks(world.server) == before
    assert store(world).pending().source == world.candidate_path


def test_bans_are_untouched_by_apply_confirm_and_rollback(served):
    world = served
    world.server.nft("add", "element", "inet", "policyd_bans", "ban4",
                     "{ 203.0.113.77 timeout 1h }")
    world.server.nft("add", "element", "inet", "policyd_bans", "ban6",
                     "{ 2001:db8:3:: timeout 1h }")
    start_trial(world, seconds=60)
    assert policyd(world.server, "confirm").returncode == 0
    start_trial(world, seconds=60)
    assert policyd(world.server, "rollback").returncode == 0
    assert policyd(world.server, "apply", world.committed_path).returncode == 0
    assert "203.0.113.77" in world.server.nft("list", "set", "inet", "policyd_bans",
                                              "ban4").stdout
    assert "2001:db8:3::" in world.server.nft("list", "set", "inet", "policyd_bans",
                                              "ban6").stdout


def test_lint_refuses_to_cut_the_ssh_client_unless_forced(served):
    world = served
    ssh = {"SSH_CONNECTION": f"198.51.100.20 50022 {SERVER_WAN_V4} {PORT}"}
    before = world.server.ruleset()
    for extra in (["--confirm-timeout", "30"], []):
        result = policyd(world.server, "apply", world.candidate_path, *extra, env=ssh)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1
        assert "198.51.100.20" in result.stderr and f"port {PORT}" in result.stderr
        assert "services.ollama.action: drop" in result.stderr
    assert world.server.ruleset() == before
    assert store(world).pending() is None
    result = policyd(world.server, "apply", world.candidate_path, "--confirm-timeout", "30",
                     "--force", env=ssh)
    assert result.returncode == 0, result.stderr
    assert not stranger_reaches(world)


def test_lint_names_an_ssh_client_the_server_has_no_route_to(served):
    world = served
    ssh = {"SSH_CONNECTION": f"203.0.113.5 50022 {SERVER_WAN_V4} {PORT}"}
    result = policyd(world.server, "apply", world.candidate_path, env=ssh)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "203.0.113.5" in result.stderr


@pytest.mark.parametrize("address", [SERVER_V4, SERVER_V6])
def test_lint_sees_an_established_connection_from_the_trusted_client(served, address):
    world = served
    conn = world.trusted.connect(address, PORT)
    assert conn is not None
    try:
        policy = world.policy(STRANGERS_ONLY, "strangers.yaml")
        result = policyd(world.server, "apply", policy, "--confirm-timeout", "30")
        assert result.returncode == 1
        expected = TRUSTED_V4 if address == SERVER_V4 else "2001:db8:1::10"
        assert expected in result.stderr and "established connection" in result.stderr
        conn.sendall(b"still here\n")
        assert conn.recv(64) == b"still here\n"
        # Forced, the lint was right: the same connection stops getting answers.
        result = policyd(world.server, "apply", policy, "--confirm-timeout", "30", "--force")
        assert result.returncode == 0, result.stderr
        conn.settimeout(0.5)
        conn.sendall(b"anyone?\n")
        with pytest.raises(OSError):
            conn.recv(64)
    finally:
        conn.close()


# --- the daemon (`policyd run`) dies or restarts mid-trial ---------------------

def daemon_missing():
    probe = subprocess.run([*POLICYD, "run", "--help"], capture_output=True, cwd=REPO)
    return probe.returncode != 0


daemon = pytest.mark.skipif(daemon_missing(), reason="`policyd run` does not exist yet")


def start_daemon(world):
    proc = world.server.popen(*POLICYD, "run", world.committed_path,
                              env=policyd_env(world.server), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: proc.poll() is not None, timeout=1.0)
    assert proc.poll() is None, "the daemon exited at start"
    return proc


@daemon
def test_sigkilled_daemon_does_not_keep_the_candidate(served):
    world = served
    proc = start_daemon(world)
    deadline = start_trial(world)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)
    assert_cut_then_back_by_deadline(world, deadline)
    assert_committed_unchanged(world)


@daemon
def test_restarted_daemon_does_not_keep_the_candidate(served):
    world = served
    proc = start_daemon(world)
    deadline = start_trial(world, seconds=6)
    assert not stranger_reaches(world)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
    start_daemon(world)
    # A restart may end the trial early (a rollback) but never keeps it past its deadline.
    assert wait_for(lambda: stranger_reaches(world, timeout=0.3),
                    timeout=deadline + 1.0 - time.time(), interval=0.05)
    time.sleep(1)
    assert stranger_reaches(world)
    assert_committed_unchanged(world)
