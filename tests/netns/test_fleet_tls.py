"""The fleet over TLS (rediss://) with a CA made by openssl here, and the password file's rules."""
import os
import shutil

import pytest

from policyd_lab.fleetlab import ATTACKER_EXTRA, FleetLab, make_tls_files
from policyd_lab.netlab import wait_for
from policyd_lab.webclient import syn_answered

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("openssl") is None,
                                reason="needs redis-server and openssl")


@pytest.fixture
def tls_fleet(lab):
    world = FleetLab(lab, count=2, tls=True)
    world.start_redis()
    for host in world.nodes:
        host.listen(8080)
    try:
        yield world
    finally:
        world.stop_all()


def test_bans_travel_over_tls_checked_against_the_ca_file(tls_fleet):
    n1, n2 = tls_fleet.nodes
    policies = {host: tls_fleet.policy(host) for host in tls_fleet.nodes}
    tls_fleet.start_daemons(policies)
    source = ATTACKER_EXTRA[0]
    assert n1.policyd("ban", source, "--for", "10m").returncode == 0
    assert wait_for(lambda: source in tls_fleet.kernel_bans(n2), 10)
    assert not syn_answered(tls_fleet.attacker, n2.address, 8080, 0.3, source=source)
    assert tls_fleet.status(n2)["fleet"]["redis"].startswith("rediss://n2@")
    doctor = n2.policyd("doctor", str(policies[n2]))
    assert "fail fleet" not in doctor.stdout and "ok   fleet: Redis at" in doctor.stdout


def test_a_server_certificate_from_another_ca_is_refused_and_local_bans_go_on(tls_fleet, lab):
    n1, _n2 = tls_fleet.nodes
    stranger_ca = make_tls_files(lab.tmp / "other-ca", "192.0.2.100")
    policy = tls_fleet.policy(n1)
    policy.write_text(policy.read_text().replace(str(tls_fleet.ca_file), str(stranger_ca)))
    tls_fleet.start_daemon(n1, policy)
    source = ATTACKER_EXTRA[1]
    assert n1.policyd("ban", source, "--for", "10m").returncode == 0
    assert source in tls_fleet.kernel_bans(n1)
    fleet = tls_fleet.status(n1)["fleet"]
    assert not fleet["connected"] and "certificate" in (fleet["last_error"] or "").lower()
    assert fleet["outbox"] == 1
    doctor = n1.policyd("doctor", str(policy))
    assert "fail fleet: Redis at" in doctor.stdout and doctor.returncode == 1


def test_a_password_file_others_can_read_is_refused(tls_fleet):
    n1, _n2 = tls_fleet.nodes
    policy = tls_fleet.policy(n1)
    secret = tls_fleet.tmp / "n1.secret"
    os.chmod(secret, 0o644)
    tls_fleet.start_daemon(n1, policy)  # the daemon runs: local banning matters more
    fleet = tls_fleet.status(n1)["fleet"]
    assert not fleet["connected"]
    assert "fleet.password_file" in fleet["last_error"] and "chmod 600" in fleet["last_error"]
    doctor = n1.policyd("doctor", str(policy))
    assert "fail fleet: the fleet password cannot be used" in doctor.stdout
