"""dsv3lib.dispatch: the one kernel-or-reference policy that fp8.gemm and model.mla_decode share."""

import warnings

import pytest
import torch

from dsv3lib import dispatch
from dsv3lib.dispatch import current_backend, interpreting, use_backend, use_triton


def test_auto_serves_cpu_tensors_with_the_reference():
    assert current_backend() == "auto"
    assert not use_triton(torch.zeros(1))


def test_use_backend_forces_and_restores():
    t = torch.zeros(1)
    with use_backend("triton"):
        assert current_backend() == "triton" and use_triton(t)
        with use_backend("ref"):
            assert not use_triton(t)
        assert use_triton(t)
    assert current_backend() == "auto" and not use_triton(t)
    with pytest.raises(RuntimeError), use_backend("triton"):
        raise RuntimeError("an error inside the block")
    assert current_backend() == "auto"  # restored on the way out


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'cuda'"), use_backend("cuda"):
        pass


def test_interpreting_reads_the_environment(monkeypatch):
    for value, want in [("1", True), ("0", False), ("", False)]:
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreting() is want
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not interpreting()


def test_old_gpu_warns_once(monkeypatch):
    class FakeCuda:  # a CUDA tensor on an sm_80 GPU, without needing one
        device = torch.device("cuda", 0)

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(dispatch, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not use_triton(FakeCuda(), min_capability=(8, 9), what="FP8 tensor cores")
        assert not use_triton(FakeCuda(), min_capability=(8, 9), what="FP8 tensor cores")
        assert use_triton(FakeCuda(), what="a kernel without requirements")
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "sm_89+" in str(caught[0].message) and "sm_80" in str(caught[0].message)
