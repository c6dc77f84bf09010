"""Journal sources over real journal files (systemd-journal-remote): unit matching on
_SYSTEMD_UNIT only, first start at the tail, restart and crash without missing or
double-counting, rotation and vacuum, and the daemon's own read path."""
import ipaddress
import json
import time

import pytest

from policyd_lab.journal_files import JournalWriter, available, entry
from policyd.banning.bans import BanManager
from policyd.daemon.core import Daemon
from policyd.logs.filters import Outcome
from policyd.logs.journal import JournalSource
from policyd.policy.model import LogSource
from policyd.banning.state import State
from fakes import FakeBanKernel, FakeClock, Settings

pytestmark = pytest.mark.skipif(not available, reason="systemd-journal-remote is not installed")
ip = ipaddress.ip_address


def caddy_401(address, user="mallory"):
    return json.dumps({
        "level": "error", "ts": time.time(), "logger": "http.log.access.log0",
        "msg": "handled request",
        "request": {"remote_ip": address, "remote_port": "40000", "proto": "HTTP/1.1",
                    "method": "GET", "host": "ollama.example.org", "uri": "/",
                    "headers": {"Authorization": ["REDACTED"]}},
        "user_id": user, "status": 401}, separators=(",", ":"))


def ssh_failure(address, user="root"):
    return f"Failed password for {user} from {address} port 50022 ssh2"


class Harness:
    """The daemon's read path (Daemon._read_logs) on real journal files and a real
    state file, with a fake kernel; restart() drops everything not yet written."""

    def __init__(self, tmp_path, logs, maxretry=3):
        self.tmp_path = tmp_path
        self.logs = tuple(logs)
        self.settings = Settings(maxretry=maxretry, logs=self.logs)
        self.clock = FakeClock(time.time())
        self.kernel = FakeBanKernel(self.clock)
        self.start()

    def start(self):
        self.state = State(self.tmp_path / "state.db")
        daemon = Daemon(self.tmp_path / "policy.yaml", self.tmp_path, self.tmp_path,
                        clock=self.clock)
        daemon.state = daemon.positions = self.state   # no state writer: synchronous writes
        daemon.bans = self.bans = BanManager(self.settings, self.state, self.kernel,
                                             clock=self.clock)
        daemon.sources = [JournalSource(c, self.state, None, self.bans.queue_position)
                          for c in self.logs]
        self.daemon = daemon

    def read(self):
        self.clock.now = time.time()
        self.daemon._read_logs()

    def housekeeping(self):
        self.bans.expire()   # what the daemon does every 0.5 s: writes queued state

    def stop(self):
        for source in self.daemon.sources:
            source.follower.commit()
            source.follower.close()
        self.bans.flush()
        self.state.close()

    def crash(self):
        for source in self.daemon.sources:
            source.follower.close()
        self.state.close()

    def banned(self):
        return {n.network_address for n in self.kernel.list_bans()}

    def source(self, index=0):
        return self.daemon.sources[index]


@pytest.fixture
def journal(tmp_path):
    writer = JournalWriter(tmp_path / "journal")
    yield writer
    writer.cleanup()


def caddy_source(journal):
    return LogSource(path=None, filter="caddy-auth", journal="caddy.service",
                     journal_dir=journal.directory)


def test_first_start_begins_at_the_tail(tmp_path, journal):
    journal.write([entry("caddy.service", caddy_401("192.0.2.1")) for _ in range(5)])
    harness = Harness(tmp_path, [caddy_source(journal)])
    harness.read()
    assert harness.source().matched == 0 and not harness.banned()
    journal.write([entry("caddy.service", caddy_401("192.0.2.1")) for _ in range(3)])
    harness.read()
    assert harness.source().matched == 3
    assert harness.banned() == {ip("192.0.2.1")}


def test_only_the_units_own_entries_count(tmp_path, journal):
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)])
    journal.write([entry("other.service", caddy_401("192.0.2.2")) for _ in range(5)]
                  + [entry("caddy.service", caddy_401("192.0.2.3")) for _ in range(3)])
    harness.read()
    assert harness.banned() == {ip("192.0.2.3")}
    assert harness.source().follower.stats["lines"] == 3


def test_a_forged_syslog_identifier_bans_nobody(tmp_path, journal):
    # `systemd-cat -t sshd` by a local user: SYSLOG_IDENTIFIER says sshd, the
    # trusted _SYSTEMD_UNIT says the user's session.
    journal.write([entry("ssh.service", "Server listening on 0.0.0.0 port 22.", "sshd")])
    source = LogSource(path=None, filter="fail2ban:sshd", journal="ssh.service",
                       journal_dir=journal.directory)
    harness = Harness(tmp_path, [source])
    journal.write([entry("session-3.scope", ssh_failure("198.51.100.9"), "sshd", pid=str(900 + i),
                         _COMM="systemd-cat")
                   for i in range(10)])
    harness.read()
    assert not harness.banned()
    assert harness.source().follower.stats["lines"] == 0
    # The real unit's failures do ban, through fail2ban's own sshd filter.
    journal.write([entry("ssh.service", ssh_failure("203.0.113.5"), "sshd", pid="77")
                   for _ in range(3)])
    harness.read()
    assert harness.banned() == {ip("203.0.113.5")}


def test_restart_neither_misses_nor_double_counts(tmp_path, journal):
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)])
    journal.write([entry("caddy.service", caddy_401("192.0.2.4")) for _ in range(2)])
    harness.read()
    harness.stop()
    # Written while the daemon was down: read after the restart, not lost.
    journal.write([entry("caddy.service", caddy_401("192.0.2.5"))])
    harness.start()
    harness.read()
    assert harness.source().matched == 1       # the two old entries are not read again
    assert not harness.banned()                # 2 + 0 re-read: below maxretry
    journal.write([entry("caddy.service", caddy_401("192.0.2.4"))])
    harness.read()
    assert harness.banned() == {ip("192.0.2.4")}


def test_a_crash_before_the_write_rereads_exactly_the_unwritten_entries(tmp_path, journal):
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)])
    journal.write([entry("caddy.service", caddy_401("192.0.2.6")) for _ in range(2)])
    harness.read()
    harness.housekeeping()                     # cursor and the 2 failures, one transaction
    journal.write([entry("caddy.service", caddy_401("192.0.2.6"))])
    harness.read()                             # counted in memory only ...
    harness.crash()                            # ... and lost with its cursor
    harness.start()
    harness.read()
    assert harness.source().matched == 1       # read again, exactly once
    assert harness.banned() == {ip("192.0.2.6")}


def test_rotation_and_vacuum_lose_nothing_across_restarts(tmp_path, journal):
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)], maxretry=4)
    journal.write([entry("caddy.service", caddy_401("192.0.2.7"))])
    journal.rotate()                           # journald starts a new file
    journal.write([entry("caddy.service", caddy_401("192.0.2.7"))])
    harness.read()
    assert harness.source().matched == 2
    harness.stop()
    journal.write([entry("caddy.service", caddy_401("192.0.2.7"))])
    journal.rotate()
    journal.write([entry("caddy.service", caddy_401("192.0.2.8"))])
    journal.vacuum(0)                          # the oldest file is removed while down
    harness.start()
    harness.read()
    assert harness.source().matched == 2       # one in file 1, one in file 2
    assert not harness.banned()
    journal.vacuum(1)
    journal.write([entry("caddy.service", caddy_401("192.0.2.7"))])
    harness.read()
    assert harness.banned() == {ip("192.0.2.7")}


def test_the_failure_window_uses_each_entrys_own_time(tmp_path, journal):
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)])
    old = time.time() - 3600                   # older than findtime (600 s)
    journal.write([entry("caddy.service", caddy_401("192.0.2.9"), when=old) for _ in range(5)])
    harness.read()
    assert harness.source().matched == 5
    assert not harness.banned()


def test_an_entry_with_embedded_newlines_is_malformed_never_a_failure(tmp_path, journal):
    journal.write([entry("ssh.service", "Server listening", "sshd")])
    source = LogSource(path=None, filter="fail2ban:sshd", journal="ssh.service",
                       journal_dir=journal.directory)
    harness = Harness(tmp_path, [source])
    forged = "Connection from 203.0.113.50\n" + ssh_failure("192.0.2.66")
    journal.write([entry("ssh.service", forged, "sshd", pid=str(500 + i)) for i in range(5)])
    harness.read()
    assert not harness.banned()
    assert harness.source().malformed == 5


def test_status_names_the_unit_and_its_cursor(tmp_path, journal):
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)])
    stats = harness.source().stats()
    assert stats["path"] == "journal:caddy.service"
    assert stats["journal"] == "caddy.service" and stats["cursor"]
    assert stats["filter"] == "caddy-auth"
    assert Outcome.IGNORED  # the enum the daemon's loop dispatches on


class DoctorEnv:
    def now(self):
        return time.time()


def test_doctor_says_journal_or_file_and_whether_each_is_readable(tmp_path, journal):
    from policyd.operator import doctor_host
    from policyd.policy.reader import loads
    journal.write([entry("caddy.service", "started")])
    log = tmp_path / "access.log"
    log.write_text("")
    policy = loads(f"""
version: 1
services:
  proxy: {{ports: [8080], allow: any}}
bans:
  logs:
    - {{journal: caddy.service, journal_dir: {journal.directory}, filter: caddy-auth}}
    - {{journal: ssh.service, journal_dir: {journal.directory}, filter: "fail2ban:sshd"}}
    - {{journal: nginx.service, journal_dir: {tmp_path / 'nowhere'}, filter: nginx-access}}
""")
    findings = doctor_host.check_logs(policy, DoctorEnv())
    assert [f.level for f in findings] == ["ok", "warn", "fail"]
    assert findings[0].message.startswith("journal caddy.service in ")
    assert "readable" in findings[0].message
    assert "no entry of that unit" in findings[1].message and "ssh.service" in findings[1].fix
    assert "cannot be read" in findings[2].message and "journal_dir" in findings[2].fix


def test_policy_journal_entries_are_validated():
    from policyd.errors import InputError
    from policyd.policy.reader import loads
    head = "version: 1\nservices:\n  p: {ports: [80], allow: any}\nbans:\n  logs:\n"
    ok = loads(head + "    - {journal: ssh.service, filter: 'fail2ban:sshd', mode: aggressive}\n")
    assert ok.bans.logs[0].label == "journal:ssh.service"
    for bad, words in (
            ("{journal: ssh, filter: nginx-auth}", "not a systemd unit name"),
            ("{journal: a.service, path: /x, filter: nginx-auth}", "exactly one of"),
            ("{journal: a.service, filter: nginx-auth, mode: aggressive}", "only fail2ban"),
            ("{path: /x, journal_dir: /y, filter: nginx-auth}", "only with `journal`"),
            ("{journal: a.service, journal_dir: rel, filter: nginx-auth}", "must be absolute")):
        with pytest.raises(InputError, match=words) as error:
            loads(head + f"    - {bad}\n")
        assert error.value.line == 6


def test_a_unit_with_no_entries_yet_is_read_from_its_first_entry(tmp_path, journal):
    journal.write([entry("other.service", "noise")])
    harness = Harness(tmp_path, [caddy_source(journal)])
    journal.write([entry("caddy.service", caddy_401("192.0.2.11")) for _ in range(3)])
    harness.read()
    assert harness.banned() == {ip("192.0.2.11")}


def test_an_idle_journal_writes_no_state(tmp_path, journal):
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)])
    harness.read()
    harness.housekeeping()
    for _ in range(5):
        harness.read()
        assert not harness.bans.queue.positions   # nothing new: nothing queued
    journal.write([entry("caddy.service", "GET / 200")])
    harness.read()
    assert harness.bans.queue.positions           # a new cursor, written with the next batch


def test_fail2ban_filters_on_files_put_failures_at_their_lines_time(tmp_path):
    from policyd.logs.sources import LogSource as FileSource
    log = tmp_path / "auth.log"
    log.write_text("")
    config = LogSource(path=str(log), filter="fail2ban:sshd")
    harness = Harness(tmp_path, [])
    harness.daemon.sources = [FileSource(config, harness.state)]

    def failures(at, count, address):
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(at))
        with log.open("a") as out:
            for i in range(count):
                out.write(f"{stamp} box sshd[{600 + i}]: Failed password for root from "
                          f"{address} port 22 ssh2\n")

    failures(time.time() - 3600, 5, "192.0.2.20")     # an hour old: outside findtime
    harness.read()
    assert harness.daemon.sources[0].matched == 5 and not harness.banned()
    failures(time.time(), 3, "192.0.2.20")
    harness.read()
    assert harness.banned() == {ip("192.0.2.20")}


def test_a_flood_is_read_in_bounded_batches_and_nothing_is_lost(tmp_path, journal):
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)], maxretry=1000)
    woken = []
    follower = harness.source().follower
    follower._on_change = woken.append
    journal.write([entry("caddy.service", caddy_401(f"198.51.100.{i % 200 + 1}"))
                   for i in range(250)])
    follower.batch = 100
    harness.read()
    assert harness.source().matched == 100 and woken   # the loop is asked to come back
    for _ in range(3):
        harness.read()
    assert harness.source().matched == 250


def test_a_reload_that_refollows_the_logs_does_not_read_entries_twice(tmp_path, journal):
    from types import SimpleNamespace
    journal.write([entry("caddy.service", "started")])
    harness = Harness(tmp_path, [caddy_source(journal)])
    journal.write([entry("caddy.service", caddy_401("192.0.2.12")) for _ in range(2)])
    harness.read()                         # cursor queued, not yet written
    daemon = harness.daemon
    daemon.watcher = None
    daemon._write_everything()             # what a reload with new logs does (Daemon._adopt)
    daemon._follow(SimpleNamespace(bans=harness.settings))
    try:
        harness.read()
        assert harness.source().matched == 0 and not harness.banned()
        journal.write([entry("caddy.service", caddy_401("192.0.2.12"))])
        harness.read()
        assert harness.banned() == {ip("192.0.2.12")}
    finally:
        daemon.watcher.stop()


def ssh_instance(number, client="203.0.113.5"):
    """A connection of socket-activated sshd (ssh.socket, Accept=yes) as journald
    records it: its own instance of ssh@.service, in the template's slice."""
    return {"unit": f"ssh@{number}-192.0.2.1:22-{client}:{50000 + number}.service",
            "_SYSTEMD_SLICE": "system-ssh.slice", "identifier": "sshd", "pid": str(3000 + number)}


def template_source(journal, unit="ssh@.service"):
    return LogSource(path=None, filter="fail2ban:sshd", journal=unit,
                     journal_dir=journal.directory)


def test_a_template_follows_every_instance_of_it(tmp_path, journal):
    # Each connection to a socket-activated sshd is a new unit: naming the
    # template follows all of them, also those started after policyd.
    journal.write([entry(message="Server listening on :: port 22.", **ssh_instance(0))])
    harness = Harness(tmp_path, [template_source(journal)])
    journal.write([entry(message=ssh_failure("203.0.113.5"), **ssh_instance(n))
                   for n in range(1, 4)])
    harness.read()
    assert harness.banned() == {ip("203.0.113.5")}
    assert harness.source().follower.stats["lines"] == 3


def test_a_template_counts_only_its_own_instances(tmp_path, journal):
    journal.write([entry(message="Server listening on :: port 22.", **ssh_instance(0))])
    harness = Harness(tmp_path, [template_source(journal)])
    journal.write(
        # a user's own service named like an instance: journald files it under
        # the user's manager (user@1000.service), whatever the user calls it
        [entry("user@1000.service", ssh_failure("198.51.100.1"), "sshd",
               _SYSTEMD_USER_UNIT="ssh@9-192.0.2.1:22-198.51.100.1:1.service",
               _SYSTEMD_SLICE="user-1000.slice")] * 3
        # the plain unit, and another template's instance put in the same slice
        + [entry("ssh.service", ssh_failure("198.51.100.2"), "sshd")] * 3
        + [entry("sshx@1.service", ssh_failure("198.51.100.3"), "sshd",
                 _SYSTEMD_SLICE="system-ssh.slice")] * 3
        + [entry("ssh@.service", ssh_failure("198.51.100.4"), "sshd",
                 _SYSTEMD_SLICE="system-ssh.slice")] * 3
        # a forged identifier from a login session
        + [entry("session-3.scope", ssh_failure("198.51.100.5"), "sshd",
                 _SYSTEMD_SLICE="user-1000.slice")] * 3)
    harness.read()
    assert not harness.banned()
    assert harness.source().follower.stats["lines"] == 0


def test_a_template_resumes_after_a_restart(tmp_path, journal):
    journal.write([entry(message="Server listening on :: port 22.", **ssh_instance(0))])
    harness = Harness(tmp_path, [template_source(journal)])
    journal.write([entry(message=ssh_failure("203.0.113.6"), **ssh_instance(n, "203.0.113.6"))
                   for n in range(1, 3)])
    harness.read()
    harness.housekeeping()
    harness.stop()
    journal.write([entry(message=ssh_failure("203.0.113.6"), **ssh_instance(3, "203.0.113.6"))])
    harness.start()
    harness.read()
    assert harness.banned() == {ip("203.0.113.6")}   # 2 before the restart + 1 after


def test_a_template_instance_slice_is_named_as_systemd_names_it():
    from policyd.logs.journal import template_slice
    assert template_slice("ssh@.service") == "system-ssh.slice"
    assert template_slice("getty@.service") == "system-getty.slice"
    # '-' separates slice levels, so systemd escapes it (and '\\') once more
    assert template_slice("foo-bar@.service") == "system-foo\\x2dbar.slice"
    assert template_slice("a\\x2db@.service") == "system-a\\x5cx2db.slice"
    assert template_slice("ssh.service") is None
    assert template_slice("ssh@1.service") is None


def test_only_service_templates_are_accepted():
    from policyd.errors import InputError
    from policyd.policy.reader import loads
    head = "version: 1\nservices:\n  p: {ports: [80], allow: any}\nbans:\n  logs:\n"
    assert loads(head + "    - {journal: ssh@.service, filter: 'fail2ban:sshd'}\n")
    with pytest.raises(InputError, match="NAME@.service") as error:
        loads(head + "    - {journal: ssh@.socket, filter: 'fail2ban:sshd'}\n")
    assert error.value.line == 6


def test_doctor_finds_a_templates_instances(tmp_path, journal):
    from policyd.logs.journal import probe
    journal.write([entry("ssh.service", "Server listening on :: port 22.", "sshd")])
    assert probe("ssh@.service", journal.directory)["entries"] is False
    journal.write([entry(message=ssh_failure("203.0.113.5"), **ssh_instance(1))])
    found = probe("ssh@.service", journal.directory)
    assert found["entries"] is True and found["readable"] is True
