"""Fixtures every unit test may use; the fakes behind them live in tests/fakes.py."""
import pytest

from fakes import FakeClock

try:
    import policyd_lab  # noqa: F401 (the namespace tests' lab, installed by make setup)
except ImportError:
    raise pytest.UsageError("the test lab policyd_lab is not installed: run `make setup` "
                            "(or `.venv/bin/python -m pip install --no-build-isolation --no-deps -e tests/lab`)")


@pytest.fixture
def clock():
    return FakeClock()
