"""dsv3lib.fp8.formats: bit-exact against torch's own casts (all codes, millions of random float32)."""

import pytest
import torch

from dsv3lib.fp8 import BF16, E4M3, E5M2, E5M6, FP16, all_values, decode, encode, round_to_format

TORCH_DTYPES = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2), (FP16, torch.float16), (BF16, torch.bfloat16)]


def _torch_codes(x, fmt, dtype):
    u = {8: torch.uint8, 16: torch.int16}[fmt.n_bits]
    return x.to(dtype).view(u).long() & (2**fmt.n_bits - 1)


@pytest.mark.parametrize("fmt,dtype", TORCH_DTYPES, ids=lambda v: getattr(v, "name", str(v)))
def test_decode_every_code_matches_torch(fmt, dtype):
    n = 2**fmt.n_bits
    codes = torch.arange(n)
    u = {8: torch.uint8, 16: torch.int16}[fmt.n_bits]
    ref = codes.to(torch.int32).to(u).view(dtype).double()
    mine = decode(codes, fmt)
    assert torch.equal(torch.isnan(ref), torch.isnan(mine))
    ok = ~torch.isnan(ref)
    assert torch.equal(ref[ok], mine[ok])
    # and encode ∘ decode is the identity on every non-NaN code (both zeros included)
    assert torch.equal(encode(mine[ok], fmt), codes[ok])


def _random_inputs(fmt, n=1 << 20, seed=0):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    anybits = bits.view(torch.float32)  # every exponent: huge, tiny, float32 subnormals, inf, NaN
    in_range = torch.randn(n, generator=g) * fmt.max / 8  # normals, and some overflow
    sub = torch.randn(n // 4, generator=g) * fmt.min_normal  # the format's subnormal range
    grid = decode(torch.arange(2 ** min(fmt.n_bits, 16)), fmt)
    grid = grid[torch.isfinite(grid)]
    mids = ((grid[:-1] + grid[1:]) / 2).float()  # exact ties (sorted by code, adjacent values: midpoints)
    edge = torch.tensor([fmt.max, fmt.max * (1 + 2.0**-(fmt.man_bits + 1)), fmt.max * 1.01, float("inf"),
                         -float("inf"), 0.0, -0.0, fmt.min_subnormal / 2, fmt.min_subnormal * 0.51])
    return torch.cat([anybits, in_range, sub, mids, edge.float()])


@pytest.mark.parametrize("fmt,dtype", TORCH_DTYPES, ids=lambda v: getattr(v, "name", str(v)))
def test_encode_random_float32_matches_torch_bit_for_bit(fmt, dtype):
    x = _random_inputs(fmt)
    assert x.numel() >= 10**6
    nan = torch.isnan(x)
    ref, mine = _torch_codes(x, fmt, dtype), encode(x, fmt)
    mismatches = (ref != mine)[~nan].sum().item()
    assert mismatches == 0, f"{fmt.name}: {mismatches} of {(~nan).sum().item()} codes differ from torch"
    assert torch.isnan(decode(mine[nan], fmt)).all()
    # the inputs did exercise ties, subnormals and overflow
    r = round_to_format(x[~nan], fmt).abs()
    assert ((r > 0) & (r < fmt.min_normal)).any()
    assert (r == fmt.max).any() if fmt.overflow == "saturate" else torch.isinf(r).any()


def test_known_values():
    assert (E4M3.max, E5M2.max, FP16.max) == (448.0, 57344.0, 65504.0)
    assert E4M3.min_subnormal == 2.0**-9 and E5M2.min_subnormal == 2.0**-16
    assert E5M6.max == (2 - 2**-6) * 2**15 and E5M6.min_subnormal == 2.0**-20
    # ties go to the even mantissa: 1 + 1/16 lies halfway between 1 and 1.125 -> 1; 1 + 3/16 -> 1.25
    assert round_to_format(torch.tensor([1 + 1 / 16, 1 + 3 / 16]), E4M3).tolist() == [1.0, 1.25]
    # E4M3fn saturates (inf too), E5M2 overflows to inf
    assert round_to_format(torch.tensor([1e6, float("inf")]), E4M3).tolist() == [448.0, 448.0]
    assert round_to_format(torch.tensor([61440.0]), E5M2).tolist() == [float("inf")]
    assert encode(torch.tensor([-2.0]), E4M3).item() == 0b1_1000_000


def test_all_values():
    v = all_values(E4M3)
    assert v.numel() == 253  # 256 codes - 2 NaNs - one duplicate zero
    assert v.max().item() == 448.0 and torch.all(v[1:] > v[:-1])
    assert all_values(E5M2).numel() == 256 - 6 - 2 - 1  # NaNs, ±inf, -0
    assert all_values(E5M6, nonnegative=True).numel() == 31 * 64  # exponents 0..30, 64 mantissas each
    with pytest.raises(ValueError, match="at most 16"):
        all_values(BF16.__class__("fp32", 8, 23, 127))
