"""Real sshd in the server namespace, its log reaching policyd only through the
journal (as on a Debian 12 box without rsyslog), read with fail2ban's own sshd
filter, unmodified: three invalid-user logins from the stranger end in a kernel
ban on the SSH port. A local user's `systemd-cat -t sshd` lines ban nobody."""
import json
import os
import shutil
import subprocess
import threading

import pytest

from policyd_lab.journal_files import JournalPipe, available
from policyd_lab.netlab import PolicydDaemon, wait_for
from policyd_lab.policies import ban_policy, journal
from policyd_lab.webclient import syn_answered
from policyd_lab.world import SERVER_V4, SERVER_WAN_V4, STRANGER_V4

SSHD = "/usr/sbin/sshd"
PORT = 2222
pytestmark = [
    pytest.mark.skipif(not available, reason="systemd-journal-remote is not installed"),
    pytest.mark.skipif(not os.access(SSHD, os.X_OK) or shutil.which("ssh") is None,
                       reason="openssh-server and openssh-client are needed (make setup)"),
    pytest.mark.skipif(not os.path.isfile("/etc/fail2ban/filter.d/sshd.conf"),
                       reason="Debian's fail2ban (filter.d) is not installed"),
]


SSHD_CONFIG = """\
Port {port}
ListenAddress 0.0.0.0
HostKey {work}/host_ed25519
PidFile {work}/sshd.pid
UsePAM no
PasswordAuthentication yes
KbdInteractiveAuthentication no
StrictModes no
LogLevel INFO
"""


class StderrToJournal:
    """What journald does with a unit's output: each line an entry of ssh.service."""

    def __init__(self, stream, pipe, pid):
        self.stream, self.pipe, self.pid = stream, pipe, str(pid)
        self.lines = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for raw in iter(self.stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append(line)
            self.pipe.send([{"_SYSTEMD_UNIT": "ssh.service", "_COMM": "sshd", "_PID": self.pid,
                             "SYSLOG_IDENTIFIER": "sshd", "MESSAGE": line}])


def start_sshd(host, work):
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host_ed25519")],
                   check=True)
    config = work / "sshd_config"
    config.write_text(SSHD_CONFIG.format(port=PORT, work=work))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege-separation dir
    proc = host.popen(SSHD, "-D", "-e", "-f", str(config), stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE)
    return proc


def invalid_login(host, user="nosuchuser"):
    return host.exec("ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                     "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
                     "-o", "PreferredAuthentications=password", "-p", str(PORT),
                     f"{user}@{SERVER_WAN_V4}", "true", check=False,
                     timeout=30)


def test_failed_ssh_logins_in_the_journal_end_in_a_ban(world, tmp_path):
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    pipe = JournalPipe(journal_dir / "system.journal")
    pipe.send([{"_SYSTEMD_UNIT": "ssh.service", "SYSLOG_IDENTIFIER": "sshd",
                "MESSAGE": "Server listening on 0.0.0.0 port 2222."}])
    sshd = start_sshd(world.server, tmp_path / "sshd")
    relay = StderrToJournal(sshd.stderr, pipe, sshd.pid)
    daemon = PolicydDaemon(world.server, world.policy(ban_policy(
        journal("ssh.service", journal_dir, "fail2ban:sshd"), service="ssh", ports=[PORT])))
    try:
        assert wait_for(lambda: syn_answered(world.stranger, SERVER_WAN_V4, PORT, 0.5), 10), \
            f"sshd did not come up: {relay.lines}"
        daemon.start()
        pipe.send([{"_SYSTEMD_UNIT": "session-4.scope", "SYSLOG_IDENTIFIER": "sshd",
                    "_COMM": "systemd-cat", "_PID": str(7000 + i),
                    "MESSAGE": "Failed password for root from 203.0.113.99 port 22 ssh2"}
                   for i in range(5)])
        for _ in range(3):
            invalid_login(world.stranger)
        assert wait_for(lambda: not syn_answered(world.stranger, SERVER_WAN_V4, PORT, 0.2),
                        timeout=15), f"not banned; sshd said: {relay.lines[-10:]}"
        assert any("Invalid user nosuchuser" in line for line in relay.lines)
        assert syn_answered(world.trusted, SERVER_V4, PORT, 1.0)
        bans = json.loads(world.server.policyd("bans", "--json").stdout)
        assert [(b["network"], b["filter"]) for b in bans] == [
            (f"{STRANGER_V4}/32", "fail2ban:sshd")]
    finally:
        err = daemon.stop_and_read() if daemon.proc else ""
        sshd.terminate()
        try:
            sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sshd.kill()
        # sshd's last words ("Received signal 15") reach the relay after the
        # stop: it ends at their EOF, and only then may the journal pipe close.
        relay.thread.join(timeout=10)
        pipe.close()
    assert f"addr={STRANGER_V4}/32" in err
