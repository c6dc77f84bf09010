"""Shared fixtures for namespace tests: a lab that always cleans up, and a world.

The world is a server with two neighbours: `trusted` on the server's lan0
(192.0.2.0/24, 2001:db8:1::/64) and `stranger` on its wan0
(198.51.100.0/24, 2001:db8:2::/64).
"""
import os
import shutil
import textwrap

import pytest

from netlab import Lab, leftover_namespaces

SERVER_V4, SERVER_V6 = "192.0.2.1", "2001:db8:1::1"
SERVER_WAN_V4, SERVER_WAN_V6 = "198.51.100.1", "2001:db8:2::1"
TRUSTED_V4, TRUSTED_V6 = "192.0.2.10", "2001:db8:1::10"
STRANGER_V4, STRANGER_V6 = "198.51.100.20", "2001:db8:2::20"


def _missing():
    if os.geteuid() != 0:
        return "namespace tests need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"namespace tests need `{tool}` (make setup installs it)"
    return None


def pytest_collection_modifyitems(items):
    reason = _missing()
    for item in items:
        if "tests/netns/" in str(item.fspath):
            item.add_marker(pytest.mark.netns)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
        assert not leftover_namespaces(lab.prefix), "namespaces left behind"


class World:
    def __init__(self, lab):
        self.lab = lab
        self.server = lab.host("srv")
        self.trusted = lab.host("trusted")
        self.stranger = lab.host("stranger")
        lab.link(self.server, self.trusted, [f"{SERVER_V4}/24", f"{SERVER_V6}/64"],
                 [f"{TRUSTED_V4}/24", f"{TRUSTED_V6}/64"], a_ifname="lan0", b_ifname="eth0")
        lab.link(self.server, self.stranger, [f"{SERVER_WAN_V4}/24", f"{SERVER_WAN_V6}/64"],
                 [f"{STRANGER_V4}/24", f"{STRANGER_V6}/64"], a_ifname="wan0", b_ifname="eth0")

    def policy(self, text, name="policy.yaml"):
        path = self.lab.tmp / name
        path.write_text(textwrap.dedent(text))
        return str(path)


@pytest.fixture
def world(lab):
    return World(lab)
