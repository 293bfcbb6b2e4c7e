"""The CPU training path's FP8 operands: E4M3 values held in FP32, rounded by arithmetic (chapter 1).

A CPU has no FP8 GEMM: the reference multiplies the *values* of the FP8 operands in FP32. ``FP8Linear`` and the
grouped experts on the CPU therefore never need the FP8 bytes themselves, only ``q.float()`` for
``q = fp8(x / s)``. :func:`round_to_e4m3_` computes those values straight from ``x / s`` in four passes over
FP32 (no cast to FP8, no table look-up back), about twice as fast as the cast and decode it replaces, and the
functions here build the GEMM operands from it. They skip the public functions' argument checks (their callers
made the tensors) but not the NaN/inf check: each group's scale is still refused if non-finite.

Each operation comes twice: a PyTorch reference (``grid_act_ref``, ``grid_weight_ref``, ``token_tiles_ref``,
``quant.gemm_blocks``, ``quant.sum_tiles``) and, under the names the callers use (``grid_act``, ``grid_weight``,
``token_tiles``, ``gemm_values``, ``wgrad_values``), a dispatcher that hands the elementwise work to the compiled
kernels of :mod:`~dsv3lib.fp8.cpu_kernels` when they are built and ``dispatch.use_backend("ref")`` is not in
force: the same bits in one or two passes instead of about ten.

:class:`Recent` keeps the last few quantisations of a layer input (``shared_act``) and of x re-tiled for Wgrad
(``x_tiles``), so sibling layers reading one unchanged tensor (MLA's ``wq_a`` and ``wkv_a``, an FFN's ``w1`` and
``w3``) quantise it once.

Every number equals the FP8 route's (tests/test_fp8_grid.py: all FP32 inputs up to 464 in magnitude, and
FP8Linear/grouped results against the old code bit for bit), with one difference that no result sees: a
negative value that rounds to zero comes out +0 where the FP8 byte decodes to -0. GEMM outputs start from an
accumulator of +0.0 (``part.add_(0.0)``), which erases that sign.
"""
from __future__ import annotations

import torch

from .formats import FP8_MAX
from . import cpu_kernels
from .quant import (_absmax, _cast, _group_scales, act_scaled, check_finite, expand_b_scales, fp8_to_float,
                    gemm_blocks, sum_tiles, weight_scaled)

__all__ = ["round_to_e4m3_", "values_of", "grid_act", "grid_act_ref", "grid_weight", "grid_weight_ref", "split_k",
           "token_tiles", "token_tiles_ref", "tile_bmm", "tile_products_fp32", "wgrad_values", "gemm_values", "Recent",
           "shared_act", "clear_caches"]

_EXP = 0x7F800000  # FP32 exponent field
_FLOOR = 121 << 23  # the exponent field of 2⁻⁶, E4M3's smallest normal: below it the grid step stays 2⁻⁹
_MAGIC = 1.5 * 2.0**20  # M = 1.5·2^(e+20) as a multiple of 2^e
_CHUNK = 1 << 16  # elements per pass: four passes over a chunk stay in a core's L2 cache
_TINY = torch.finfo(torch.float32).tiny  # smallest normal FP32: a scale below it may put x / s past 464
_SMALL_AMAX = 2 * _TINY * FP8_MAX  # an amax at least this has a normal scale amax / 448 (with room to spare)


def round_to_e4m3_(v: torch.Tensor) -> torch.Tensor:
    """Round a contiguous FP32 tensor in place onto the E4M3 grid: the values ``v.to(float8_e4m3fn).float()``
    gives, for |v| ≤ 464 (every quantiser input ``x / s`` is at most 448·(1 + 2⁻²²)). Returns ``v``.

    With e = max(⌊log₂|v|⌋, −6), M = 1.5·2^(e+20) exceeds |v| and puts v + M in the binade whose FP32 step is
    2^(e−3), E4M3's step at v (2⁻⁹ among its subnormals): FP32's own round-to-nearest-even then drops exactly
    the bits E4M3 cannot hold, ties to even, and subtracting M again is exact. M comes from v's exponent bits:
    p = 2^e is v with its sign and mantissa cleared (and raised to 2⁻⁶), and ``add_(p, alpha=1.5·2²⁰)`` adds
    M = 1.5·2²⁰·p, a product that is exact, so it rounds once whether or not the CPU fuses it (FMA).
    """
    if v.dtype != torch.float32 or not v.is_contiguous():
        raise ValueError(f"round_to_e4m3_: expected a contiguous float32 tensor, got {v.dtype}, "
                         f"contiguous={v.is_contiguous()}")
    for c in v.view(-1).split(_CHUNK):
        p = (c.view(torch.int32) & _EXP).clamp_min_(_FLOOR).view(torch.float32)  # 2^max(e, -6)
        c.add_(p, alpha=_MAGIC).sub_(p, alpha=_MAGIC)
    return v


def values_of(v: torch.Tensor, s: torch.Tensor, lo: float | None = None) -> torch.Tensor:
    """The E4M3 values of ``v = x / s`` as a contiguous FP32 tensor: :func:`round_to_e4m3_` (in place when ``v`` is
    contiguous), or the cast and decode where a scale may be subnormal (an amax below ~5e-36), since only a normal
    ``s`` bounds |v| by 464. ``lo``, the smallest group amax if the caller has it (``quant._group_scales``), saves
    looking at ``s``: any amax under twice the bound takes the cast, which is always right, only slower."""
    v = v if v.is_contiguous() else v.contiguous()
    if lo is not None and lo > 0:
        small = lo < _SMALL_AMAX
    else:  # a group of zeros (scale 1) hides the smallest non-zero amax: look at the scales themselves
        small = bool(s.numel()) and s.amin().item() < _TINY
    return fp8_to_float(_cast(v)) if small else round_to_e4m3_(v)


def _f32c(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _kernel_status(status: int, t: torch.Tensor, name: str, reference):
    """A compiled quantiser's result was not to be used: NaN/inf in ``t`` (raise, naming it) or a subnormal scale
    (run the ``reference``, which takes torch's cast there)."""
    if status & cpu_kernels.NONFINITE:
        check_finite(t, name)  # raises
    return reference()


def grid_act_ref(x: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8_to_float(q), s)`` for ``q, s = act_quant_ref(x, block_size)`` of a (M, K) matrix, K ≥ 1, as a
    contiguous (M, K) FP32 tensor and the (M, ceil(K/bs)) tile scales, without making ``q``."""
    v, s, lo = act_scaled(x, block_size, False, name)
    return values_of(v, s, lo), s


def grid_act(x: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grid_act_ref`, by the compiled CPU kernel where it serves (:mod:`~dsv3lib.fp8.cpu_kernels`)."""
    if not cpu_kernels.serves(x):
        return grid_act_ref(x, block_size, name)
    v, s, status = cpu_kernels.act_tiles(_f32c(x), block_size)
    return (v, s) if status == 0 else _kernel_status(status, x, name, lambda: grid_act_ref(x, block_size, name))


def grid_weight_ref(w: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8_to_float(q), s)`` for ``q, s = weight_quant_ref(w, block_size)`` of a non-empty (N, K) weight:
    a contiguous (N, K) FP32 tensor and the (ceil(N/bs), ceil(K/bs)) block scales."""
    v, s, lo = weight_scaled(w, block_size, False, name)
    return values_of(v, s, lo), s


def grid_weight(w: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grid_weight_ref`, by the compiled CPU kernel where it serves."""
    if not cpu_kernels.serves(w):
        return grid_weight_ref(w, block_size, name)
    v, s, status = cpu_kernels.weight_blocks(_f32c(w).unsqueeze(0), block_size)
    if status:
        return _kernel_status(status, w, name, lambda: grid_weight_ref(w, block_size, name))
    return v[0], s[0]


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


def token_tiles(a: torch.Tensor, block_size: int, name: str, *, inplace: bool = False):
    """:func:`token_tiles_ref`, by the compiled CPU kernel where it serves."""
    if not cpu_kernels.serves(a):
        return token_tiles_ref(a, block_size, name, inplace=inplace)
    mp, cols = a.shape
    v, s, status = cpu_kernels.token_tiles(_f32c(a), block_size)
    if status:
        return _kernel_status(status, a, name, lambda: token_tiles_ref(a, block_size, name, inplace=inplace))
    return v.view(mp // block_size, block_size, cols), s


def token_tiles_ref(a: torch.Tensor, block_size: int, name: str, *, inplace: bool = False):
    """Quantise a token-major FP32 matrix ``a`` (Mp, C), Mp a multiple of the block (zero rows for padded tokens),
    along tokens: each column's 128×1 tiles, as ``act_quant_ref`` quantises the tokens-last ``aᵀ``. Returns the
    E4M3 values token-major, (tiles, bs, C), and the (tiles, C) scales; ``inplace`` lets them overwrite ``a``."""
    mp, cols = a.shape
    at = a.reshape(mp // block_size, block_size, cols)  # a view unless ``a`` is strided (then ``inplace`` is moot)
    s, lo = _group_scales(_absmax(at, 1), False, name)  # each column's amax over a tile's tokens
    v = at.div_(s.unsqueeze(1)) if inplace else at / s.unsqueeze(1)
    return values_of(v, s, lo), s


def tile_products_fp32(dv: torch.Tensor, ds: torch.Tensor, xv: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Wgrad's tile products from dy's and x's :func:`token_tiles` (values (tiles, bs, n) and (tiles, bs, K), scales
    (tiles, n) and (tiles, K)): :func:`~dsv3lib.fp8.quant.tile_products` of the tokens-last stack [dyᵀ; xᵀ], (tiles,
    n, K), the same bits. The batched GEMM reads both token-major (tests/test_fp8_grid.py checks that the
    transposed operand changes no bit)."""
    return tile_bmm(dv, xv).mul_(ds.unsqueeze(-1)).mul_(xs.unsqueeze(1))


def tile_bmm(dv: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
    """Each token tile's unscaled product dyᵀ·x: (tiles, n, K) from token-major (tiles, bs, n) and (tiles, bs, K)."""
    return torch.bmm(dv.transpose(1, 2), xv)


def wgrad_values(dv: torch.Tensor, ds: torch.Tensor, xv: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Wgrad (n, K) in FP32 from dy's and x's :func:`token_tiles`: ``quant.sum_tiles(tile_products_fp32(...))``,
    the scale multiplies and the tile-by-tile sum done by the compiled kernel where it serves."""
    if not cpu_kernels.serves(dv):
        return sum_tiles(tile_products_fp32(dv, ds, xv, xs))
    parts = tile_bmm(dv, xv)  # (tiles, n, K)
    return cpu_kernels.tile_sum(parts, ds.contiguous(), xs.contiguous(), parts.new_empty(parts.shape[1:]))


def gemm_values(a_blocks: list[torch.Tensor], a_s: torch.Tensor, b_blocks: list[torch.Tensor], b_s: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """``quant.gemm_blocks`` (the block-scaled GEMM of E4M3 values held in FP32), each block's two scale multiplies
    and its add into the accumulator done by the compiled kernel where it serves; the mm stay ``torch.mm``."""
    if not cpu_kernels.serves(a_s):
        return gemm_blocks(a_blocks, a_s, b_blocks, b_s, block_size)
    N = b_blocks[0].shape[0]
    a_s = a_s if a_s.dtype == torch.float32 else a_s.float()
    b_s = b_s if b_s.shape[0] in (1, N) else expand_b_scales(b_s, N, block_size)  # (N or 1, nk): B's row scales
    b_s = b_s if b_s.dtype == torch.float32 else b_s.float()
    acc = None
    for i, (a_blk, b_blk) in enumerate(zip(a_blocks, b_blocks)):
        part = torch.mm(a_blk, b_blk.t())  # (M, N)
        cpu_kernels.scale_acc(part, a_s[:, i], b_s[:, i].unsqueeze(0), part if acc is None else acc, acc is None)
        acc = part if acc is None else acc
    return acc


class Recent:
    """The last few results of a function of some tensors, for the sibling layers that quantise one tensor twice
    (MLA's ``wq_a`` and ``wkv_a`` read the same x, an FFN's ``w1`` and ``w3`` too, forward and Wgrad).

    An entry is found only for the same storage, offset, shape, strides, dtype and version counter (an in-place
    change bumps the version) and the same ``extra``; it holds its tensors (detached: their memory, not their
    autograd graph), so that memory cannot be reused by another tensor while the entry lives. Inference tensors
    carry no version and are never cached. :func:`clear_caches` drops every entry."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, []

    def get(self, tensors: tuple[torch.Tensor, ...], extra, make):
        if any(t.is_inference() for t in tensors):
            return make()
        key = (extra, *((t.data_ptr(), t.shape, t.stride(), t.dtype, t._version) for t in tensors))
        for k, _, value in self.entries:
            if k == key:
                return value
        value = make()
        held = tuple(t.detach() for t in tensors)  # the memory and version counter, not the autograd graph
        self.entries = [(key, held, value)] + self.entries[:self.size - 1]
        return value

    def clear(self) -> None:
        self.entries = []


inputs = Recent()  # forward: an input's E4M3 values and tile scales
x_tiles = Recent()  # backward: x's E4M3 values re-tiled along tokens for Wgrad


def clear_caches() -> None:
    """Forget the cached quantisations (they also go as new ones push them out: a few entries each)."""
    inputs.clear()
    x_tiles.clear()


def shared_act(x: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grid_act` of a layer input, computed once for sibling layers reading the same unchanged tensor."""
    return inputs.get((x,), ("act", block_size), lambda: grid_act(x, block_size, name))
