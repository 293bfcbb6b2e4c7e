"""dsv3lib.fp8.quant: tile/block quantisation and the block-scaled GEMM reference."""

import pytest
import torch

from dsv3lib.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    act_dequant,
    act_quant_ref,
    dequant_per_row,
    fp8_gemm,
    fp8_gemm_ref,
    quant_per_row,
    quant_per_tensor,
    weight_dequant,
    weight_quant_ref,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("K", [256, 200])
def test_act_quant_scales_and_roundtrip(K):
    x = _rand(3, 5, K)
    q, s = act_quant_ref(x)
    nk = -(-K // 128)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and s.shape == (3, 5, nk) and s.dtype == torch.float32
    tiles = torch.nn.functional.pad(x, (0, nk * 128 - K)).unflatten(-1, (nk, 128))
    assert torch.allclose(s, tiles.abs().amax(-1) / 448, rtol=1e-6)
    assert q.float().abs().amax().item() == 448.0  # each tile's max lands on 448
    err = (act_dequant(q, s) - x).abs() / x.abs().clamp(min=1e-3)
    assert err[x.abs() > s.repeat_interleave(128, -1)[..., :K] * 2**-6].max() <= 2**-4 + 1e-6  # half an E4M3 ulp


@pytest.mark.parametrize("shape", [(256, 384), (200, 130)])
def test_weight_quant_blocks(shape):
    w = _rand(*shape, seed=1)
    q, s = weight_quant_ref(w)
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert torch.allclose(s[0, 0], w[:128, :128].abs().amax() / 448)
    assert torch.allclose(s[-1, -1], w[(s.shape[0] - 1) * 128:, (s.shape[1] - 1) * 128:].abs().amax() / 448)
    rel = (weight_dequant(q, s) - w).norm() / w.norm()
    assert 1e-3 < rel < 0.05


def test_pow2_scales_and_zero_tiles():
    x = _rand(4, 256)
    x[1, :128] = 0
    q, s = act_quant_ref(x, pow2=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    assert (s >= x.abs().unflatten(-1, (2, 128)).amax(-1) / 448).all()  # never clips
    assert s[1, 0] == 1 and (q[1, :128].float() == 0).all()


def test_fine_grained_scaling_beats_per_tensor_under_outliers():
    x = _rand(64, 512, seed=2)
    x[3, 7] = 1000.0  # one activation outlier
    errs = {}
    q, s = quant_per_tensor(x)
    errs["tensor"] = (dequant_per_row(q, s) - x).norm() / x.norm()
    q, s = quant_per_row(x)
    errs["row"] = (dequant_per_row(q, s) - x).norm() / x.norm()
    q, s = act_quant_ref(x)
    errs["tile"] = (act_dequant(q, s) - x).norm() / x.norm()
    assert errs["tile"] <= errs["row"] < errs["tensor"]


@pytest.mark.parametrize("fn", [act_quant_ref, weight_quant_ref, quant_per_tensor, quant_per_row])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises(fn, bad):
    x = _rand(128, 256)
    x[5, 9] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        fn(x, name="my_tensor")


@pytest.mark.parametrize("M,N,K", [(64, 256, 384), (37, 200, 130)])
def test_fp8_gemm_ref_matches_dequantised_matmul(M, N, K):
    a, b = _rand(M, K, seed=3), _rand(N, K, seed=4)
    aq, as_ = act_quant_ref(a)
    bq, bs = weight_quant_ref(b)
    want = act_dequant(aq, as_).double() @ weight_dequant(bq, bs).double().T
    got = fp8_gemm_ref(aq, as_, bq, bs)
    assert got.shape == (M, N) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(fp8_gemm(aq, as_, bq, bs), got)  # CPU dispatch = reference
    rel = (got - a @ b.T).norm() / (a @ b.T).norm()
    assert 5e-3 < rel < 0.06  # FP8's own error, neither absent nor broken
    # b with 1×128 tile scales (the Wgrad layout) and a batched a
    bq2, bs2 = act_quant_ref(b)
    want2 = act_dequant(aq, as_).double() @ act_dequant(bq2, bs2).double().T
    assert torch.allclose(fp8_gemm_ref(aq, as_, bq2, bs2).double(), want2, rtol=1e-5, atol=1e-5)
    got3 = fp8_gemm_ref(aq.reshape(1, M, K), as_.reshape(1, M, -1), bq, bs)
    assert torch.equal(got3[0], got)


def test_fp8_gemm_ref_checks_arguments():
    aq, as_ = act_quant_ref(_rand(4, 256))
    bq, bs = weight_quant_ref(_rand(128, 256))
    with pytest.raises(ValueError, match="must be"):
        fp8_gemm_ref(aq.float(), as_, bq, bs)
    with pytest.raises(ValueError, match="a_scales"):
        fp8_gemm_ref(aq, as_[:, :1], bq, bs)
    with pytest.raises(ValueError, match="b_scales has"):
        fp8_gemm_ref(aq, as_, bq, torch.ones(3, 2))
    bq, bs = weight_quant_ref(_rand(200, 256))
    with pytest.raises(ValueError, match="b_scales has 1 rows"):
        fp8_gemm_ref(aq, as_, bq, bs[:1])  # 200 rows need 2 block rows, or 200 tile rows


def test_cpu_cast_saturates():
    # quant._cast skips its clamp on the CPU where torch's cast saturates by itself (2.13; shared/DESIGN.md);
    # anything past ±448, inf included, must become ±448 either way
    from dsv3lib.fp8.quant import _CPU_CAST_SATURATES, _cast

    x = torch.tensor([448.0, 449.0, 463.9, 464.0, 480.0, 1e30, float("inf"), -500.0, -float("inf")])
    want = torch.tensor([448.0] * 7 + [-448.0] * 2)
    assert _CPU_CAST_SATURATES == torch.equal(x.to(FP8_DTYPE).float(), want)  # the probe tells the truth
    assert torch.equal(_cast(x.clone()).float(), want)
    assert FP8_MAX == torch.finfo(FP8_DTYPE).max == 448.0
