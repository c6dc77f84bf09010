"""Fixtures every unit test may use: the fake clock and the two fake kernels (the
ruleset, the ban table), all on that one clock. The fakes live in tests/fakes.py."""
import pytest

from fakes import FakeBanKernel, FakeClock, FakeNft

try:
    import policyd_lab  # noqa: F401 (the namespace tests' lab, installed by make setup)
except ImportError:
    raise pytest.UsageError("the test lab policyd_lab is not installed: run `make setup` "
                            "(or `.venv/bin/python -m pip install --no-build-isolation --no-deps -e tests/lab`)")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def nft(clock):
    """nftables' rulesets (policyd.kernel.nft.Nft), replayed by the ruleset model."""
    return FakeNft(clock)


@pytest.fixture
def ban_kernel(clock):
    """The kernel's ban sets (policyd.kernel.nft.BanTable)."""
    return FakeBanKernel(clock)
