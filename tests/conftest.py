"""Test-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test tensors are tiny: one intra-op thread is as fast, gives run-to-run identical float sums,
    and avoids OpenMP spin-waiting (50x slow-downs measured) when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
