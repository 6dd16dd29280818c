"""Fixtures for tests/kernels (helpers live in kernels_ref.py)."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def threads():
    """Restore the thread count after a test."""
    from capibara6 import kernels
    n = kernels.get_num_threads()
    yield
    kernels.set_num_threads(n)
