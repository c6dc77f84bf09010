"""The pytest fixtures the namespace and kernel suites share; a conftest imports them.

`lab`: a Lab in the test's tmp_path, closed (and checked to leave no namespace
behind) however the test ends. `world`: policyd_lab.world's server and neighbours.
"""
import pytest

from policyd_lab.netlab import open_lab
from policyd_lab.world import World


@pytest.fixture
def lab(tmp_path):
    with open_lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def world(lab):
    return World(lab)
