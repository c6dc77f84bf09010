"""Fixtures of the kernel-contract suite: a server and a client namespace, and
policyd's kernel adapter made inside the server's namespace.

The suite runs on the host kernel in `make test` and on Debian 12's 6.1 in
`make test-kernel` (tests/kernel/lane.sh), where POLICYD_TEST_TIME_SCALE
stretches every wait.
"""
import os
import shutil

import pytest

from kernel_lab import Pair
from netlab import Lab, leftover_namespaces


def _missing():
    if os.geteuid() != 0:
        return "kernel-contract tests need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"kernel-contract tests need `{tool}` (make setup installs it)"
    return None


def pytest_collection_modifyitems(items):
    reason = _missing()
    for item in items:
        if "tests/kernel/" in str(item.fspath):
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


@pytest.fixture
def pair(lab):
    return Pair(lab)
