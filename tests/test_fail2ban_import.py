"""`policyd import-fail2ban`: enabled jails become bans.logs entries; the rest are named."""
import os
import textwrap

import pytest
import yaml
from click.testing import CliRunner

from policyd.operator.cli import main
from policyd.policy.reader import loads

pytestmark = pytest.mark.skipif(not os.path.isfile("/etc/fail2ban/filter.d/sshd.conf"),
                                reason="Debian's fail2ban is not installed")


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "filter.d").symlink_to("/etc/fail2ban/filter.d")
    (tmp_path / "jail.d").mkdir()
    log = tmp_path / "nginx-error.log"
    log.write_text("")
    (tmp_path / "jail.conf").write_text(textwrap.dedent(f"""\
        [DEFAULT]
        maxretry = 5
        findtime = 10m
        bantime = 1h
        ignoreip = 127.0.0.1/8 ::1 192.0.2.50 office.example.org
        mode = normal
        filter = %(__name__)s[mode=%(mode)s]
        backend = auto
        enabled = false

        [sshd]
        port = ssh
        logpath = /var/log/auth.log

        [nginx-http-auth]
        port = http,https
        logpath = {log}

        [mongodb-auth]
        port = 27017
        logpath = /var/log/mongodb/mongodb.log

        [recidive]
        logpath = /var/log/fail2ban-*.nothing
        filter = recidive
        """))
    (tmp_path / "jail.local").write_text(textwrap.dedent("""\
        [sshd]
        enabled = true
        backend = systemd
        mode = aggressive
        maxretry = 3

        [nginx-http-auth]
        enabled = true

        [mongodb-auth]
        enabled = true
        """))
    (tmp_path / "jail.d" / "recidive.local").write_text("[recidive]\nenabled = true\n")
    return tmp_path


def test_enabled_jails_become_policy_lines_and_the_rest_are_named(config_dir):
    result = CliRunner().invoke(main, ["import-fail2ban", "--config-dir", str(config_dir)])
    assert result.exit_code == 0, result.output
    text = result.output
    document = yaml.safe_load(text)
    logs = document["bans"]["logs"]
    assert {"journal": "ssh.service", "filter": "fail2ban:sshd", "mode": "aggressive"} in logs
    assert {"path": str(config_dir / "nginx-error.log"), "filter": "fail2ban:nginx-http-auth",
            "mode": "normal"} in logs
    assert {"path": "/var/log/mongodb/mongodb.log", "filter": "fail2ban:mongodb-auth",
            "mode": "normal"} in logs        # a multi-line filter (maxlines = 10)
    assert len(logs) == 3
    assert "/var/log/mongodb/mongodb.log does not exist here" in text
    assert document["bans"]["ignore"] == ["127.0.0.0/8", "::1/128", "192.0.2.50/32"]
    assert "office.example.org" in text and "never resolves names" in text
    assert "not imported: jail recidive" in text
    assert "jail sshd: maxretry = 3" in text
    # What it prints is a valid policy once services are added.
    head = "version: 1\nservices:\n  ssh: {ports: [22], allow: any}\n"
    policy = loads(head + text)
    assert policy.bans.maxretry == 5 and policy.bans.bantime == 3600
    assert policy.bans.logs[0].journal == "ssh.service"


def test_a_missing_config_dir_is_an_input_error(tmp_path):
    result = CliRunner().invoke(main, ["import-fail2ban", "--config-dir", str(tmp_path)])
    assert result.exit_code == 2 and "jail" in result.output
