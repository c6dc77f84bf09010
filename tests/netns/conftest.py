"""Namespace tests: marked `netns` (skipped without root, ip or nft), and the two
fixtures they share: a lab that always cleans up, and the world of
policyd_lab.world (a server with a trusted and a stranger neighbour).
"""
import os
import shutil

import pytest

from policyd_lab.netlab import open_lab
from policyd_lab.world import World


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
    with open_lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def world(lab):
    return World(lab)
