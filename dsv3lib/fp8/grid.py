"""The CPU training path's FP8 operands: E4M3 values held in FP32, rounded by arithmetic (chapter 1).

A CPU has no FP8 GEMM: the reference multiplies the *values* of the FP8 operands in FP32. ``FP8Linear`` and the
grouped experts on the CPU therefore never need the FP8 bytes themselves, only ``q.float()`` for
``q = fp8(x / s)``. :func:`round_to_e4m3_` computes those values straight from ``x / s`` in four passes over
FP32 (no cast to FP8, no table look-up back), about twice as fast as the cast and decode it replaces, and the
functions here build the GEMM operands from it. They skip the public functions' argument checks (their callers
made the tensors) but not the NaN/inf check: each group's scale is still refused if non-finite.

Every number equals the FP8 route's (tests/test_fp8_grid.py: all FP32 inputs up to 464 in magnitude, and
FP8Linear/grouped results against the old code bit for bit), with one difference that no result sees: a
negative value that rounds to zero comes out +0 where the FP8 byte decodes to -0. GEMM outputs start from an
accumulator of +0.0 (``part.add_(0.0)``), which erases that sign.
"""

from __future__ import annotations

import torch

from .quant import _absmax, _cast, _group_scales, act_scaled, fp8_to_float, weight_scaled

__all__ = ["round_to_e4m3_", "values_of", "grid_act", "grid_weight", "split_k", "tile_products_fp32"]

_EXP = 0x7F800000  # FP32 exponent field
_FLOOR = 121 << 23  # the exponent field of 2⁻⁶, E4M3's smallest normal: below it the grid step stays 2⁻⁹
_MAGIC = (20 << 23) | 0x400000  # added to an exponent field: ×2²⁰, with mantissa 1.5
_CHUNK = 1 << 16  # elements per pass: four passes over a chunk stay in a core's L2 cache
_TINY = torch.finfo(torch.float32).tiny  # smallest normal FP32: a scale below it may put x / s past 464


def round_to_e4m3_(v: torch.Tensor) -> torch.Tensor:
    """Round a contiguous FP32 tensor in place onto the E4M3 grid: the values ``v.to(float8_e4m3fn).float()``
    gives, for |v| ≤ 464 (every quantiser input ``x / s`` is at most 448·(1 + 2⁻²²)). Returns ``v``.

    With e = max(⌊log₂|v|⌋, −6), M = 1.5·2^(e+20) exceeds |v| and puts v + M in the binade whose FP32 step is
    2^(e−3), E4M3's step at v (2⁻⁹ among its subnormals): FP32's own round-to-nearest-even then drops exactly
    the bits E4M3 cannot hold, ties to even, and subtracting M again is exact. M comes from v's exponent bits.
    """
    if v.dtype != torch.float32 or not v.is_contiguous():
        raise ValueError(f"round_to_e4m3_: expected a contiguous float32 tensor, got {v.dtype}, "
                         f"contiguous={v.is_contiguous()}")
    for c in v.view(-1).split(_CHUNK):
        m = (c.view(torch.int32) & _EXP).clamp_min_(_FLOOR).add_(_MAGIC).view(torch.float32)
        c.add_(m).sub_(m)
    return v


def values_of(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The E4M3 values of ``v = x / s`` as a contiguous FP32 tensor: :func:`round_to_e4m3_`, or the cast and
    decode where a scale is subnormal (an amax below ~5e-36), since only a normal ``s`` bounds |v| by 464."""
    v = v if v.is_contiguous() else v.contiguous()
    if s.numel() and s.amin().item() < _TINY:
        return fp8_to_float(_cast(v))
    return round_to_e4m3_(v)


def grid_act(x: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8_to_float(q), s)`` for ``q, s = act_quant_ref(x, block_size)`` of a (M, K) matrix, K ≥ 1, as a
    contiguous (M, K) FP32 tensor and the (M, ceil(K/bs)) tile scales, without making ``q``."""
    v, s = act_scaled(x, block_size, False, name)
    return values_of(v, s), s


def grid_weight(w: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8_to_float(q), s)`` for ``q, s = weight_quant_ref(w, block_size)`` of a non-empty (N, K) weight:
    a contiguous (N, K) FP32 tensor and the (ceil(N/bs), ceil(K/bs)) block scales."""
    v, s = weight_scaled(w, block_size, False, name)
    return values_of(v, s), s


def split_k(g: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """The contiguous FP32 blocks ``g[:, k0:k0 + block_size]`` of a (R, K) matrix (any strides): what
    ``quant._k_blocks`` decodes from the FP8 matrix whose values ``g`` holds."""
    K = g.shape[1]
    if K <= block_size:
        return [g if g.is_contiguous() else g.contiguous()]
    whole = K // block_size * block_size
    blocks = list(g[:, :whole].unflatten(1, (-1, block_size)).transpose(0, 1).contiguous().unbind(0))
    if whole < K:
        blocks.append(g[:, whole:].contiguous())
    return blocks


def tile_products_fp32(p: torch.Tensor, n: int, block_size: int, name: str) -> torch.Tensor:
    """Wgrad's tile products from a token-major FP32 stack ``p`` = [dy | x] (Mp, n + K), Mp a multiple of the
    block (zero rows for padded tokens): quantised along tokens in 128×1 tiles, as ``act_quant_ref`` quantises
    the tokens-last stack ``pᵀ``, then :func:`~dsv3lib.fp8.quant.tile_products` of that: (tiles, n, K), the same
    bits. ``p`` is left as it was."""
    mp, cols = p.shape
    pt = p.view(mp // block_size, block_size, cols)  # (tiles, bs, n + K)
    ts = _group_scales(_absmax(pt, 1), False, name)  # (tiles, n + K): each column's amax over a tile's tokens
    full = p.new_empty(mp // block_size, cols, block_size)  # tile-major tokens-last, as tile_products decodes it
    torch.div(pt.transpose(1, 2), ts.unsqueeze(-1), out=full)  # divide and transpose in one pass
    full = values_of(full, ts)
    parts = torch.bmm(full[:, :n], full[:, n:].transpose(1, 2))  # (tiles, n, K)
    return parts.mul_(ts[:, :n].unsqueeze(-1)).mul_(ts[:, n:].unsqueeze(1))
