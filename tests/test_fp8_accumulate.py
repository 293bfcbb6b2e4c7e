"""dsv3lib.fp8.accumulate: the limited-precision tensor-core accumulator and FP32 promotion."""

import pytest
import torch

from dsv3lib.fp8 import accumulation_experiment, tensor_core_dot


def test_full_precision_limit_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 256, generator=g).to(torch.float8_e4m3fn).float()
    b = torch.randn(8, 256, generator=g).to(torch.float8_e4m3fn).float()
    exact = (a.double() * b.double()).sum(1)
    assert torch.allclose(tensor_core_dot(a, b, man_bits=60), exact, rtol=1e-14, atol=0)
    assert not torch.allclose(tensor_core_dot(a, b, man_bits=4), exact, rtol=1e-3, atol=0)


def test_truncation_is_toward_zero_and_grows_with_K():
    errs = [accumulation_experiment(K, M=64, promote_every=None)["max_rel"] for K in (512, 2048)]
    assert errs[1] > 2 * errs[0]


def test_promotion_every_128_fixes_the_K4096_error():
    without = accumulation_experiment(4096, M=128, promote_every=None)
    with_ = accumulation_experiment(4096, M=128, promote_every=128)
    assert 0.01 < without["max_rel"] < 0.15  # paper: "up to ~2%" (our 14-bit model: ~7%)
    assert with_["max_rel"] < 1e-3
    assert without["max_rel"] > 50 * with_["max_rel"]


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiples of group"):
        tensor_core_dot(torch.ones(2, 40), torch.ones(2, 40))
