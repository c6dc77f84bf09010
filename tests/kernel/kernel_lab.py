"""The two hosts of the kernel-contract suite, policyd's kernel adapter inside one,
and the suite's fixtures and marks.

The suite runs on the host kernel in `make test` and on Debian 12's 6.1 in
`make test-kernel` (tests/kernel/lane.sh), where POLICYD_TEST_TIME_SCALE
stretches every wait. The namespaces themselves come from the test lab
(policyd_lab.netlab), as for tests/netns.
"""
import os
import shutil
import textwrap

import pytest

from policyd_lab.fixtures import lab  # noqa: F401 (a fixture, for test_contract)
from policyd_lab.netlab import in_namespace


def _missing():
    if os.geteuid() != 0:
        return "kernel-contract tests need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"kernel-contract tests need `{tool}` (make setup installs it)"
    return None


MARKS = [pytest.mark.netns, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]

SERVER = {"v4": "198.51.100.1", "v6": "2001:db8:2::1", "range4": "203.0.113.1",
          "range6": "2001:db8:10::1"}
# The client sends from several addresses, so one host can stand for a banned
# source, its neighbour inside a banned range, and one outside it.
CLIENT = {"v4": "198.51.100.20", "v6": "2001:db8:2::20",
          "in28": "203.0.113.66", "out28": "203.0.113.130",
          "in48": "2001:db8:10:7::9", "in48b": "2001:db8:10::2", "v6b": "2001:db8:2::21"}


class Pair:
    """`server` listens on tcp 8080 (echo); `client` reaches it from many addresses."""

    def __init__(self, lab):
        self.lab = lab
        self.server = lab.host("srv")
        self.client = lab.host("cli")
        lab.link(self.server, self.client,
                 [f"{SERVER['v4']}/24", f"{SERVER['v6']}/64", f"{SERVER['range4']}/24",
                  f"{SERVER['range6']}/48"],
                 [f"{CLIENT['v4']}/24", f"{CLIENT['v6']}/64", f"{CLIENT['v6b']}/64",
                  f"{CLIENT['in28']}/24",
                  f"{CLIENT['out28']}/24", f"{CLIENT['in48']}/48", f"{CLIENT['in48b']}/48"],
                 a_ifname="wan0", b_ifname="eth0")
        self.listener = self.server.listen(8080)
        self._kernel = None

    def policy(self, text, name="policy.yaml"):
        from policyd.policy import reader as policy_mod
        path = self.lab.tmp / name
        path.write_text(textwrap.dedent(text))
        return policy_mod.load(str(path))

    def kernel(self, func, *args):
        """func(nft, *args) in the server's namespace, with one policyd.kernel.nft.Nft made
        there (libnftables may open its socket lazily, so every call runs inside)."""
        def call():
            if self._kernel is None:
                from policyd.kernel.nft import Nft
                self._kernel = Nft()
            return func(self._kernel, *args)
        return in_namespace(self.server.name, call)

    def reaches(self, source, timeout=1.0):
        """Does a TCP connection from `source` (a CLIENT key) get the greeting?"""
        dest = SERVER["v6"] if ":" in CLIENT[source] else SERVER["v4"]
        if source.startswith(("in", "out")):
            dest = SERVER["range6"] if ":" in CLIENT[source] else SERVER["range4"]
        return self.client.can_connect(dest, 8080, timeout=timeout, source=CLIENT[source])

    def ruleset(self):
        return self.server.ruleset()


@pytest.fixture
def pair(lab):
    return Pair(lab)
