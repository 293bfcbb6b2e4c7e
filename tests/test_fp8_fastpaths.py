"""The CPU reference path's shortcuts against the plain torch they stand for, bit for bit.

``fp8_to_float`` looks byte pairs up in a 65536-entry table, ``_absmax`` reads a large tensor twice instead of
writing ``|x|``, ``act_dequant`` multiplies its scales in place, the grouped experts keep their decoded FP8
operands from the forward: none of it may move a bit (FP8 tensors compared by their bytes, FP32 by theirs).
"""

import math

import pytest
import torch

from dsv3lib.fp8 import act_dequant, act_quant_ref, fp8_to_float
from dsv3lib.fp8.quant import _BIG, _absmax

FP8 = torch.float8_e4m3fn


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int64)


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def test_pair_table_decodes_every_byte_pair():
    codes = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8)  # every (lo, hi) pair
    q = codes.view(FP8)
    assert _same(fp8_to_float(q), q.float())  # NaN codes included: the table holds .float()'s own bits


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 130), (2, 3, 64), (1,)])
def test_decode_any_shape_and_strides(shape):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(FP8)
    assert _same(fp8_to_float(q), q.float())
    if q.dim() >= 2:
        assert _same(fp8_to_float(q.transpose(0, -1)), q.transpose(0, -1).float())  # strided
    if q.shape[-1] > 1:
        odd = q[..., 1:]  # an odd storage offset: the byte table, not the pair table
        assert _same(fp8_to_float(odd), odd.float())


@pytest.mark.parametrize("special", [None, "nan", "inf", "-inf", "zeros"])
def test_absmax_of_a_large_tensor_is_abs_amax(special):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(_BIG // 64 + 3, 4, 32, generator=g)  # over the threshold: the two-read path
    if special == "zeros":
        x[5] = 0.0
        x[6] = -0.0
    elif special is not None:
        x[7, 1, 3] = float(special)
    for dim, keep in ((-1, False), (-1, True), (1, False), ((1, 2), False)):
        got, want = _absmax(x, dim, keep), x.abs().amax(dim=dim, keepdim=keep)
        assert got.shape == want.shape
        assert torch.equal(got.nan_to_num(nan=-1.0), want.nan_to_num(nan=-1.0))  # -0.0 == 0.0 is fine here
    if special in ("nan", "inf", "-inf"):
        with pytest.raises(ValueError, match="big"):
            act_quant_ref(x.flatten(1), name="big")


@pytest.mark.parametrize("K", [64, 128, 256, 300])
def test_act_dequant_in_place_is_the_product(K):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, K, generator=g) * 10
    q, s = act_quant_ref(x)
    want = q.float() * (s if K <= 128 else s.repeat_interleave(128, dim=-1)[..., :K])
    assert _same(act_dequant(q, s), want)
    s64 = s.double()  # another dtype: torch's promotion, not an in-place FP32 multiply
    want64 = q.float() * (s64 if K <= 128 else s64.repeat_interleave(128, dim=-1)[..., :K])
    got64 = act_dequant(q, s64)
    assert got64.dtype == torch.float64 and torch.equal(got64, want64)


def test_large_act_quant_matches_small_path_semantics():
    """A tensor over the threshold quantises exactly as the |x| formula does (bytes and scales)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 256, generator=g) * torch.rand(2048, 1, generator=g)
    x[3] = 0.0  # an all-zero tile row: scale 1
    q, s = act_quant_ref(x)
    xt = x.unflatten(-1, (-1, 128))
    amax = xt.abs().amax(dim=-1)
    s_want = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q_want = (xt / s_want.unsqueeze(-1)).to(FP8).flatten(-2)
    assert torch.equal(s, s_want) and torch.equal(q.view(torch.uint8), q_want.view(torch.uint8))
    assert math.isclose(s[3, 0].item(), 1.0)
