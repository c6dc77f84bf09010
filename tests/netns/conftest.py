"""Namespace tests: marked `netns` (skipped without root, ip or nft), and the two
fixtures they share (policyd_lab.fixtures): a lab that always cleans up, and the
world (a server with a trusted and a stranger neighbour).
"""
import os
import shutil

import pytest

from policyd_lab.fixtures import lab, world  # noqa: F401 (fixtures)


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
