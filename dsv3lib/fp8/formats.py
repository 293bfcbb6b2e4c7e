"""Small floating-point formats from their bits: E4M3, E5M2, the paper's E5M6, FP16, BF16 (chapter 1).

A format is (exponent bits, mantissa bits, bias, how it spends its top codes on inf/NaN, what happens on
overflow). ``encode`` maps real numbers to codes with round-to-nearest-even written out step by step;
``decode`` maps codes back. Both are vectorised torch code (float64 inside, exact for every format here)
and agree bit for bit with torch's own ``float8_e4m3fn`` / ``float8_e5m2`` / ``float16`` / ``bfloat16``
casts (tests/test_fp8_formats.py). DeepSeek-V3 uses E4M3 for every FP8 GEMM operand (V3 §3.3.2) and
a custom E5M6 to cache some activations (§3.3.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FloatFormat", "E4M3", "E5M2", "E5M6", "FP16", "BF16", "FORMATS", "FP8_DTYPE", "FP8_MAX", "encode", "decode",
           "round_to_format", "all_values"]


@dataclass(frozen=True)
class FloatFormat:
    """A sign bit, ``exp_bits`` exponent bits (biased by ``bias``) and ``man_bits`` stored mantissa bits.

    ``special``: ``"ieee"`` — the all-ones exponent holds ±inf (mantissa 0) and NaN (mantissa ≠ 0);
    ``"fn"`` ("finite, NaN") — no infinities, only the all-ones code S.1…1.1…1 is NaN, so E4M3fn gains
    the exponent-15 binade and reaches 448 instead of 240.
    ``overflow``: ``"inf"`` — values that round past the largest finite number become ±inf (IEEE; torch's
    e5m2/fp16/bf16 casts); ``"saturate"`` — they clamp to ±max (torch's e4m3fn cast, inf included).
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    special: str = "ieee"
    overflow: str = "inf"

    def __post_init__(self):
        if self.special not in ("ieee", "fn"):
            raise ValueError(f"FloatFormat.special must be 'ieee' or 'fn', got {self.special!r}")
        if self.overflow not in ("inf", "saturate"):
            raise ValueError(f"FloatFormat.overflow must be 'inf' or 'saturate', got {self.overflow!r}")
        if self.special == "fn" and self.overflow == "inf":
            raise ValueError(f"FloatFormat {self.name}: an 'fn' format has no inf to overflow to")

    @property
    def n_bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emax(self) -> int:
        """Largest unbiased exponent of a finite number."""
        top = 2**self.exp_bits - 1  # all-ones exponent field
        return top - self.bias if self.special == "fn" else top - 1 - self.bias

    @property
    def emin(self) -> int:
        """Smallest normal exponent (subnormals share it, without the implicit 1)."""
        return 1 - self.bias

    @property
    def max(self) -> float:
        top_man = 2**self.man_bits - (2 if self.special == "fn" else 1)  # fn: all-ones mantissa is NaN
        return (1 + top_man / 2**self.man_bits) * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def nan_code(self) -> int:
        """The positive NaN code torch produces (all exponent and mantissa bits set)."""
        return 2 ** (self.exp_bits + self.man_bits) - 1

    @property
    def inf_code(self) -> int | None:
        return None if self.special == "fn" else (2**self.exp_bits - 1) << self.man_bits


E4M3 = FloatFormat("e4m3fn", 4, 3, 7, special="fn", overflow="saturate")  # max 448, no inf
E5M2 = FloatFormat("e5m2", 5, 2, 15)  # max 57344, IEEE-like
E5M6 = FloatFormat("e5m6", 5, 6, 15)  # the paper's custom cache format (§3.3.3), assumed IEEE-like
FP16 = FloatFormat("fp16", 5, 10, 15)
BF16 = FloatFormat("bf16", 8, 7, 127)
FORMATS = {f.name: f for f in (E4M3, E5M2, E5M6, FP16, BF16)}

# The one FP8 format of every GEMM operand (V3 §3.3.2), as torch names it, and its largest finite value (448):
# quantisers map each group's amax to it (``fp8.quant``, ``fp8.kernels``).
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = E4M3.max


def round_to_format(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` (ties to even), applying its overflow rule (float64)."""
    x = x.double()
    a = x.abs()
    # 1. the binade: a = m·2^e with 0.5 <= m < 1 ⇒ leading bit at 2^(e-1); below the normal range the grid
    #    spacing stops shrinking (subnormals), so clamp the exponent at emin.
    _, e = torch.frexp(a)
    e = torch.clamp(e - 1, min=fmt.emin)
    # 2. the grid spacing in that binade: man_bits fraction bits after the leading bit
    ulp = torch.ldexp(torch.ones_like(a), e - fmt.man_bits)
    # 3. round-to-nearest-even of a/ulp (exact: division by a power of two); torch.round is half-to-even
    r = torch.round(a / ulp) * ulp
    # 4. overflow: anything that rounds above max (the next step up would be 2^(emax+1)·… ) saturates or is inf
    over = r > fmt.max
    if fmt.overflow == "saturate":
        r = torch.where(over | torch.isinf(a), torch.full_like(r, fmt.max), r)
    else:
        r = torch.where(over, torch.full_like(r, float("inf")), r)
    r = torch.where(torch.isnan(x), x, r)
    return torch.copysign(r, x)


def encode(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The ``fmt`` bit pattern (int64 codes, sign in bit n_bits-1) of each element of ``x``, rounded RNE."""
    r = round_to_format(x, fmt)
    sign = torch.signbit(r).long() << (fmt.exp_bits + fmt.man_bits)
    a = r.abs()
    _, e = torch.frexp(a)
    e = e - 1
    normal = a >= fmt.min_normal
    # normal: exponent field e+bias, mantissa a/2^(e-M) - 2^M; subnormal: exponent field 0, mantissa a/2^(emin-M)
    e_field = torch.where(normal, e + fmt.bias, torch.zeros_like(e))
    scale_e = torch.where(normal, e, torch.full_like(e, fmt.emin)) - fmt.man_bits
    m = torch.ldexp(a, -scale_e)
    m = torch.where(normal, m - 2**fmt.man_bits, m)
    mag = (e_field << fmt.man_bits) | torch.nan_to_num(m, nan=0.0, posinf=0.0).long()
    if fmt.inf_code is not None:
        mag = torch.where(torch.isinf(a), torch.full_like(mag, fmt.inf_code), mag)
    mag = torch.where(torch.isnan(a), torch.full_like(mag, fmt.nan_code), mag)
    return sign | mag


def decode(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The float64 value of each ``fmt`` code (integers in [0, 2^n_bits))."""
    c = codes.long()
    s = (c >> (fmt.exp_bits + fmt.man_bits)) & 1
    e_field = (c >> fmt.man_bits) & (2**fmt.exp_bits - 1)
    m = (c & (2**fmt.man_bits - 1)).double()
    normal = e_field > 0
    frac = torch.where(normal, 1 + m / 2**fmt.man_bits, m / 2**fmt.man_bits)
    e = torch.where(normal, e_field - fmt.bias, torch.full_like(e_field, fmt.emin))
    v = torch.ldexp(frac, e)
    top = e_field == 2**fmt.exp_bits - 1
    if fmt.special == "ieee":
        v = torch.where(top & (m == 0), torch.full_like(v, float("inf")), v)
        v = torch.where(top & (m != 0), torch.full_like(v, float("nan")), v)
    else:
        v = torch.where(top & (m == 2**fmt.man_bits - 1), torch.full_like(v, float("nan")), v)
    return torch.where(s.bool(), -v, v)


def all_values(fmt: FloatFormat, *, finite_only: bool = True, nonnegative: bool = False) -> torch.Tensor:
    """Every value ``fmt`` can represent, sorted (float64). Only for formats of at most 16 bits."""
    if fmt.n_bits > 16:
        raise ValueError(f"all_values: {fmt.name} has {fmt.n_bits} bits; enumerate at most 16")
    v = decode(torch.arange(2**fmt.n_bits), fmt)
    if finite_only:
        v = v[torch.isfinite(v)]
    if nonnegative:
        v = v[~torch.signbit(v)]
    return torch.unique(v)  # sorted; merges +0 and -0
