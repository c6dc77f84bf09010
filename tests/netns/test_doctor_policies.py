"""`policyd doctor` is a health check: on a host set up as a shipped policy
(policies/*.yaml) expects, with the daemon running it, it finds nothing and exits 0."""
import os
import socket

import pytest

from policyd_lab.netlab import REPO, PolicydDaemon

NGINX_ACCESS_LOG = "/var/log/nginx/access.log"


def listen(host, family, address, port):
    sock = host.socket(family)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(8)
    return sock


def _localhost(host):
    return [listen(host, socket.AF_INET, "127.0.0.1", 11434)]


def _lan(host):
    # The policy's own comment: OLLAMA_HOST=0.0.0.0, so the LAN and loopback reach it.
    return [listen(host, socket.AF_INET, "0.0.0.0", 11434)]


def _tailscale(host):
    # A veth pair stands in for the tunnel device (every kernel has veth; not dummy).
    host.ip("link", "add", "tailscale0", "type", "veth", "peer", "name", "ts-peer")
    host.ip("link", "set", "tailscale0", "up")
    return [listen(host, socket.AF_INET, "0.0.0.0", 11434)]


def _behind_proxy(host):
    if not os.access(NGINX_ACCESS_LOG, os.R_OK):
        pytest.skip(f"{NGINX_ACCESS_LOG} is missing (make setup installs nginx-light)")
    # Ollama on loopback; nginx on every address for 8080 and 8443.
    return [listen(host, socket.AF_INET, "127.0.0.1", 11434),
            listen(host, socket.AF_INET, "0.0.0.0", 8080),
            listen(host, socket.AF_INET6, "::", 8080),
            listen(host, socket.AF_INET, "0.0.0.0", 8443)]


SET_UPS = {
    "ollama-localhost.yaml": _localhost,
    "ollama-lan.yaml": _lan,
    "ollama-tailscale.yaml": _tailscale,
    "ollama-behind-proxy.yaml": _behind_proxy,
}


def test_every_shipped_policy_has_a_set_up_here():
    assert sorted(SET_UPS) == sorted(p.name for p in (REPO / "policies").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(SET_UPS))
def test_doctor_exits_0_on_a_host_set_up_as_the_shipped_policy_expects(lab, name):
    host = lab.host("srv")
    policy = REPO / "policies" / name
    sockets = SET_UPS[name](host)
    daemon = PolicydDaemon(host, policy).start()
    try:
        result = host.policyd("doctor", str(policy))
    finally:
        daemon.stop_and_read()
        for sock in sockets:
            sock.close()
    lines = result.stdout.splitlines()
    # Only the machine's own systemd (outside the namespace) may warn: nftables.service.
    attention = [l for l in lines if not l.startswith("ok ")]
    host_service = [l for l in attention if l.startswith("warn nftables-service:")]
    assert attention == host_service, result.stdout + result.stderr
    assert result.returncode == (1 if host_service else 0)
    assert any(l.startswith("ok   daemon:") for l in lines)
    assert any(l.startswith("ok   drift:") for l in lines)
