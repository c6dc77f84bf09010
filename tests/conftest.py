"""Fixtures every unit test may use; the fakes behind them live in tests/fakes.py."""
import pytest

from fakes import FakeClock


@pytest.fixture
def clock():
    return FakeClock()
