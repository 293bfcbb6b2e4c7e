"""Reference FP8 quantisation and the block-scaled GEMM, in plain torch on any device (chapter 1).

Scaling groups from V3 §3.3.2: activations in 1×128 tiles (one scale per token per 128 channels),
weights in 128×128 blocks. Scale ``s = amax / 448`` from the current group (online, no amax history),
``q = fp8(x / s)``, dequantise ``q · s``. The same semantics as DeepSeek's ``inference/kernel.py``
(``act_quant``, ``weight_quant``/``weight_dequant``, ``fp8_gemm``); the references here carry a ``_ref``
suffix, the Triton kernels in ``kernels.py`` implement them on a GPU and ``gemm.py`` picks one.

Shapes need not be multiples of the block: the last group is partial (its amax is taken over the
elements that exist) and scale tensors have ``ceil(K/128)`` columns. An all-zero group gets scale 1.
NaN or inf in a quantiser's input raises ``ValueError`` naming the tensor: saturating them silently
would turn a diverged step into plausible numbers.

The CPU trains through these functions, a hundred small ops per FP8Linear step, so they avoid work that
changes no number: FP8 → FP32 by table look-up, two bytes at a time (torch's CPU cast is ~10× slower), a
group's amax from two reads of a large tensor instead of a written-out |x|, no padding of a dimension that is
one group anyway, no zero-initialised accumulator to add into, scales multiplied in place.
tests/test_fp8_oracle.py and tests/test_fp8_fastpaths.py hold them to the straightforward versions bit for bit.
(``FP8Linear`` on the CPU goes one step further and skips the FP8 bytes altogether: :mod:`~dsv3lib.fp8.grid`.)
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from .formats import FP8_DTYPE, FP8_MAX

__all__ = ["check_finite", "check_block_size", "check_scales", "check_tensor", "compute_scale", "fp8_to_float",
           "quant_per_tensor", "quant_per_row", "dequant_per_row", "act_quant_ref", "act_scaled", "act_dequant",
           "weight_quant_ref", "weight_scaled",
           "weight_dequant", "expand_b_scales", "check_gemm_args", "fp8_gemm_ref", "gemm_blocks", "tile_products",
           "sum_tiles", "wgrad_ref"]

_TABLE: torch.Tensor | None = None  # the FP32 value of each of the 256 E4M3 bytes (CPU), made on first use
_LITTLE = sys.byteorder == "little"  # the pair table's layout assumes it
_PAIRS: torch.Tensor | None = None  # (65536,) int64: the two FP32 values of each byte pair, as bits (CPU)


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or inf."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf; refusing to quantise it to FP8 (it would saturate)")


def check_block_size(block_size: int) -> int:
    """Raise naming ``block_size`` unless it is a positive int (the width of a scaling group)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size: must be an int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    return block_size


def check_scales(s: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless every scale is a positive finite number (what the quantisers
    produce): a NaN, inf, zero or negative scale would give NaN, zero or sign-flipped products silently.
    Checked on the CPU only: on a GPU the test would cost a host sync per GEMM, and there the scales come from
    the quantisers, which refuse NaN and inf inputs."""
    if s.numel() and s.device.type == "cpu":
        lo, hi = torch.aminmax(s)  # NaN propagates to both
        if not (lo.item() > 0 and hi.item() < math.inf):
            raise ValueError(f"{name}: scales must be positive and finite, found min {lo.item()}, max {hi.item()}")


def check_tensor(x, name: str, *, fp8: bool = False, min_dim: int = 1) -> None:
    """Raise naming ``name`` unless ``x`` is a tensor of at least ``min_dim`` dims (and float8_e4m3fn if ``fp8``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(x.shape)}")
    if fp8 and x.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: expected {FP8_DTYPE}, got {x.dtype}")
    if not fp8 and (x.dtype == torch.bool or x.is_complex()):
        raise ValueError(f"{name}: expected real numbers, got {x.dtype}")


def compute_scale(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """FP32 scale mapping ``amax`` to 448 (to the next power of two ≥ that if ``pow2``); 1 where amax is 0."""
    s = amax.float() / FP8_MAX
    if pow2:  # a power of two makes x/s and q·s exact: only the FP8 rounding remains (V3 §3.3.3)
        m, e = torch.frexp(s)  # s = m·2^e, 0.5 <= m < 1: s is a power of two iff m == 0.5
        s = torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))
    return torch.where(amax > 0, s, 1.0)


def _group_scales(amax: torch.Tensor, pow2: bool, name: str) -> tuple[torch.Tensor, float]:
    """``check_finite(amax, name)`` then ``compute_scale(amax, pow2)``, in two small ops when no group is all zero
    (the usual case): amax is NaN/inf iff its group holds one, so this checks all of the quantiser's input.
    Returns the scales and the smallest amax as a float (0.0 if a group is all zero; inf if there are none),
    which tells :mod:`~dsv3lib.fp8.grid` whether a scale can be subnormal without another look at them."""
    lo = math.inf
    if amax.numel():
        lo_t, hi = torch.aminmax(amax)  # NaN propagates to both
        if not math.isfinite(hi):
            check_finite(amax, name)  # raises
        lo = lo_t.item()
        if not pow2 and lo > 0:
            return amax / FP8_MAX, lo  # = compute_scale(amax): the "amax == 0 → 1" rule has nothing to do
    return compute_scale(amax, pow2), lo


_BIG = 1 << 17  # elements: above this an |x| temporary costs more than a second read of x


def _absmax(x: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """``x.abs().amax(dim, keepdim)``, the same numbers (NaN included): a large ``x`` is read twice (its max and
    its min) instead of written out as ``|x|`` and read back. An all-zero group may come out as -0.0, which
    every caller treats as zero (``amax > 0`` is false either way)."""
    if x.numel() < _BIG:
        return x.abs().amax(dim=dim, keepdim=keepdim)
    return torch.maximum(x.amax(dim=dim, keepdim=keepdim), x.amin(dim=dim, keepdim=keepdim).neg_())


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()  # skips a call: this module runs ~100 ops per FP8Linear


def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    """The 256-entry table and the 65536-entry table of byte pairs, made on first use (512 KiB)."""
    global _TABLE, _PAIRS
    if _TABLE is None:
        one = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
        # pair code c (a little-endian uint16) holds bytes (c & 255, c >> 8): their two floats side by side,
        # viewed as one int64 so that index_select copies 8 bytes per look-up
        _PAIRS = torch.stack([one.repeat(256), one.repeat_interleave(256)], 1).view(torch.int64).view(-1)
        _TABLE = one
    return _TABLE, _PAIRS


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """``q.float()`` for a float8_e4m3fn tensor of any strides, as a new contiguous FP32 tensor.

    On the CPU it looks the bytes up in a table of the values ``.float()`` gives (the same numbers, ~10×
    faster than torch's CPU cast): two bytes at a time where it can (one uint16 index, one 8-byte copy: half
    the look-ups of a byte table), else one. Elsewhere it is the cast.
    """
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"q: expected {FP8_DTYPE}, got {q.dtype}")
    if q.device.type != "cpu":
        return q.to(torch.float32, memory_format=torch.contiguous_format)
    table, pairs = _tables()
    codes = q.view(torch.uint8)
    if not q.is_contiguous():  # one byte copy is cheaper than a strided int conversion
        codes = codes.contiguous()
    codes = codes.view(-1)
    if codes.numel() % 2 == 0 and codes.storage_offset() % 2 == 0 and _LITTLE:
        return pairs.index_select(0, codes.view(torch.uint16).int()).view(torch.float32).view(q.shape)
    return table.index_select(0, codes.int()).view(q.shape)


def _cpu_cast_saturates() -> bool:
    """Whether this torch's CPU cast to E4M3 clamps overflow to ±448 (2.13 does; 2.11 gives NaN from ±464)."""
    return torch.tensor([1e30, -float("inf")]).to(FP8_DTYPE).float().tolist() == [FP8_MAX, -FP8_MAX]


_CPU_CAST_SATURATES = _cpu_cast_saturates()


def _cast(x: torch.Tensor) -> torch.Tensor:
    """Round a temporary FP32 tensor to E4M3 (nearest even), saturating at ±448; contiguous whatever x's strides.

    torch's CPU cast saturates by itself in the pinned torch (tests/test_fp8_quant.py checks the probe); elsewhere,
    and with a torch whose CPU cast does not, clamp first, in place.
    """
    if x.device.type != "cpu" or not _CPU_CAST_SATURATES:
        x = x.clamp_(-FP8_MAX, FP8_MAX)
    return x.to(FP8_DTYPE) if x.is_contiguous() else x.to(FP8_DTYPE, memory_format=torch.contiguous_format)


def _groups(x: torch.Tensor, dim: int, block_size: int) -> tuple[torch.Tensor, int]:
    """Split ``dim`` of ``x`` into (groups, group width), zero-padding it to whole groups if it spans several;
    a dim no longer than one group is one (maybe partial) group as it is. Zeros change no amax. Returns the
    view and the padding added."""
    n = x.shape[dim]
    pad = -n % block_size if n > block_size else 0
    if pad:
        widths = [0, 0] * (x.dim() - dim % x.dim())
        widths[-1] = pad  # F.pad lists the last dim first
        x = F.pad(x, widths)
    return x.unflatten(dim, (-1, min(n, block_size))), pad


def quant_per_tensor(x: torch.Tensor, *, pow2: bool = False, name: str = "x"):
    """One scale for the whole tensor: ``(x_fp8, scale)`` with a 0-d scale."""
    check_finite(x, name)
    s = compute_scale(x.abs().amax(), pow2)
    return _cast(x.float() / s), s


def quant_per_row(x: torch.Tensor, *, pow2: bool = False, name: str = "x"):
    """One scale per row (per token): ``(x_fp8, scales)`` with scales of shape ``(..., 1)``."""
    check_finite(x, name)
    s = compute_scale(x.abs().amax(dim=-1, keepdim=True), pow2)
    return _cast(x.float() / s), s


def dequant_per_row(x_fp8: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x_fp8 · s`` in FP32; works for per-tensor (0-d) and per-row ((..., 1)) scales."""
    check_tensor(s, "s", min_dim=0)
    if s.dim() and s.shape != (*x_fp8.shape[:-1], 1):
        raise ValueError(f"s: expected a 0-d scale or shape {(*x_fp8.shape[:-1], 1)}, got {tuple(s.shape)}")
    return fp8_to_float(x_fp8) * s


def act_quant_ref(x: torch.Tensor, block_size: int = 128, *, pow2: bool = False, name: str = "x"):
    """Quantise the last dim of ``x`` in 1×``block_size`` tiles.

    Args:
        x: (..., K) activations, any float dtype.
        block_size: tile width along K.
        pow2: round each scale up to a power of two.
        name: the tensor's name in error messages.
    Returns:
        x_fp8: (..., K) float8_e4m3fn;  scales: (..., ceil(K/block_size)) float32 (amax/448 per tile).
    """
    check_tensor(x, name)
    check_block_size(block_size)
    K = x.shape[-1]
    if K == 0:
        raise ValueError(f"{name}: has no channels to quantise (shape {tuple(x.shape)})")
    y, s, _ = act_scaled(x, block_size, pow2, name)
    return _cast(y), s


def act_scaled(x: torch.Tensor, block_size: int, pow2: bool, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`act_quant_ref` up to the rounding, without its argument checks: ``(x / s, s, lo)`` in FP32 (the first
    maybe a strided view), whose E4M3 rounding is the quantised tensor; ``lo`` the smallest tile amax
    (:func:`_group_scales`). The NaN/inf check happens here."""
    K = x.shape[-1]
    xf = _f32(x)
    if K <= block_size:  # one (maybe partial) tile per row: no reshaping
        s, lo = _group_scales(_absmax(xf, -1, True), pow2, name)  # (..., 1)
        return xf / s, s, lo
    xt, pad = _groups(xf, -1, block_size)  # (..., nk, bs)
    s, lo = _group_scales(_absmax(xt, -1), pow2, name)  # (..., nk)
    y = (xt / s.unsqueeze(-1)).flatten(-2)
    return (y[..., :K] if pad else y), s, lo


def act_dequant(x_fp8: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """Inverse of :func:`act_quant_ref` (FP32)."""
    check_tensor(x_fp8, "x_fp8", fp8=True)
    check_block_size(block_size)
    check_tensor(s, "s", min_dim=0)
    K = x_fp8.shape[-1]
    want = (*x_fp8.shape[:-1], math.ceil(K / block_size))
    if s.shape != want:
        raise ValueError(f"s: expected shape {want} (one scale per 1×{block_size} tile), got {tuple(s.shape)}")
    x = fp8_to_float(x_fp8)  # a fresh FP32 tensor: the scales go in in place
    if s.dtype != torch.float32:  # another dtype: torch's type promotion decides the result's
        return x * (s if K <= block_size else s.repeat_interleave(block_size, dim=-1)[..., :K])
    if K <= block_size:  # one tile: broadcast
        return x.mul_(s)
    if K % block_size == 0:  # whole tiles: each scale over its tile, no expanded copy of the scales
        return x.view(*x.shape[:-1], -1, block_size).mul_(s.unsqueeze(-1)).view(x.shape)
    return x.mul_(s.repeat_interleave(block_size, dim=-1)[..., :K])


def weight_quant_ref(w: torch.Tensor, block_size: int = 128, *, pow2: bool = False, name: str = "weight"):
    """Quantise a (N, K) weight in ``block_size``×``block_size`` blocks (DeepSeek-V3's released FP8 layout:
    ``w_fp8`` is the checkpoint's ``weight``, the scales its ``weight_scale_inv``; ``w ≈ w_fp8 · scale``).

    Raises ``ValueError`` naming ``name`` if ``w`` holds NaN or inf (or is not a non-empty 2-D real tensor),
    and naming ``block_size`` unless that is a positive int.

    Returns:
        w_fp8: (N, K) float8_e4m3fn;  scales: (ceil(N/bs), ceil(K/bs)) float32.
    """
    check_tensor(w, name)
    check_block_size(block_size)
    if w.dim() != 2:
        raise ValueError(f"weight_quant: {name} must be 2-D (N, K), got shape {tuple(w.shape)}")
    if not w.numel():
        raise ValueError(f"{name}: is empty (shape {tuple(w.shape)}); nothing to quantise")
    y, s, _ = weight_scaled(w, block_size, pow2, name)
    return _cast(y), s


def weight_scaled(w: torch.Tensor, block_size: int, pow2: bool, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`weight_quant_ref` up to the rounding, without its argument checks: ``(w / s, s, lo)`` in FP32 (the
    first maybe a strided view) for a non-empty (N, K) ``w``, ``lo`` the smallest block amax. The NaN/inf check
    happens here."""
    N, K = w.shape
    wf = _f32(w)
    if N <= block_size and K <= block_size:  # one (maybe partial) block: no reshaping
        s, lo = _group_scales(_absmax(wf, (0, 1), True), pow2, name)  # (1, 1)
        return wf / s, s, lo
    wb, pad_n = _groups(wf, 0, block_size)
    wb, pad_k = _groups(wb, 2, block_size)  # (nn, bs, nk, bs)
    s, lo = _group_scales(_absmax(wb, (1, 3)), pow2, name)  # (nn, nk)
    y = (wb / s[:, None, :, None]).flatten(2).flatten(0, 1)
    return (y[:N, :K] if pad_n or pad_k else y), s, lo


def weight_dequant(w_fp8: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """Inverse of :func:`weight_quant_ref` (FP32, (N, K))."""
    check_tensor(w_fp8, "w_fp8", fp8=True)
    check_block_size(block_size)
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8: must be 2-D (N, K), got shape {tuple(w_fp8.shape)}")
    check_tensor(s, "s", min_dim=0)
    N, K = w_fp8.shape
    want = (math.ceil(N / block_size), math.ceil(K / block_size))
    if s.shape != want:
        raise ValueError(f"s: expected shape {want} (one scale per {block_size}×{block_size} block), "
                         f"got {tuple(s.shape)}")
    full = s.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:N, :K]
    return fp8_to_float(w_fp8) * full


def expand_b_scales(b_s: torch.Tensor, N: int, block_size: int = 128) -> torch.Tensor:
    """(N, nk) per-row scales of B from either 128×128 block scales (ceil(N/bs), nk) or 1×128 tile scales (N, nk)
    (which of the two :func:`check_gemm_args` checks)."""
    check_block_size(block_size)
    return b_s if b_s.shape[0] == N else b_s.repeat_interleave(block_size, 0)[:N]


def check_gemm_args(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, block_size: int,
                    out_dtype: torch.dtype = torch.float32) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument unless ``fp8_gemm(a, a_s, b, b_s)`` is well formed:
    shapes, dtypes, ``block_size``, ``out_dtype`` and scales that are positive and finite (:func:`check_scales`)."""
    for t, name in ((a, "a"), (a_s, "a_scales"), (b, "b"), (b_s, "b_scales")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fp8_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_block_size(block_size)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype: must be a floating-point torch.dtype, got {out_dtype!r}")
    if a.dim() < 1:
        raise ValueError("fp8_gemm: a must be (..., K), got a 0-d tensor")
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm: a and b must be {FP8_DTYPE}, got {a.dtype} and {b.dtype}")
    if b.dim() != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"fp8_gemm: a (..., K) and b (N, K) must share K; got {tuple(a.shape)} and {tuple(b.shape)}")
    nk = math.ceil(a.shape[-1] / block_size)
    if a_s.shape != (*a.shape[:-1], nk):
        raise ValueError(f"fp8_gemm: a_scales must have shape {(*a.shape[:-1], nk)}, got {tuple(a_s.shape)}")
    if b_s.dim() != 2 or b_s.shape[1] != nk:
        raise ValueError(f"fp8_gemm: b_scales must have {nk} columns (one per {block_size} K), got {tuple(b_s.shape)}")
    N, nb = b.shape[0], math.ceil(b.shape[0] / block_size)
    if b_s.shape[0] not in (nb, N):
        raise ValueError(f"fp8_gemm: b_scales has {b_s.shape[0]} rows; expected {nb} (128×128 blocks) or {N} "
                         "(1×128 tiles)")
    for t, name in ((a_s, "a_scales"), (b_s, "b_scales")):
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"fp8_gemm: {name} must be real numbers, got {t.dtype}")
        check_scales(t, f"fp8_gemm: {name}")


def _k_blocks(q: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """``[q[:, k0:k0 + block_size].float() for k0 in range(0, K, block_size)]`` for a (R, K) FP8 matrix, each
    block contiguous, decoded in one table look-up for all the whole blocks (and one for a partial last)."""
    K = q.shape[1]
    if K <= block_size:
        return [fp8_to_float(q)]
    whole = K // block_size * block_size
    blocks = list(fp8_to_float(q[:, :whole].unflatten(1, (-1, block_size)).transpose(0, 1)).unbind(0))
    if whole < K:
        blocks.append(fp8_to_float(q[:, whole:]))
    return blocks


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, *,
                 block_size: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ bᵀ`` from block-scaled FP8 operands, promoting to FP32 every ``block_size`` K-elements.

    Args:
        a: (..., K) float8_e4m3fn with 1×128 tile scales ``a_s`` (..., ceil(K/128)).
        b: (N, K) float8_e4m3fn (any strides) with 128×128 block scales ``b_s`` (ceil(N/128), ceil(K/128)),
           or 1×128 tile scales (N, ceil(K/128)) (used by Wgrad, where both operands are activations).
    Returns:
        (..., N) in ``out_dtype``. Each K block's partial product is an FP32 GEMM of the decoded FP8 values
        and is multiplied by its two scales before joining the FP32 accumulator — what the GPU does after
        each N_C = 128 promotion (V3 §3.3.2, Fig. 7b).
    """
    check_gemm_args(a, a_s, b, b_s, block_size, out_dtype)
    lead, K = a.shape[:-1], a.shape[-1]
    M, N = math.prod(lead), b.shape[0]
    if a.dim() != 2:
        a, a_s = a.reshape(M, K), a_s.reshape(M, a_s.shape[-1])
    acc = gemm_blocks(_k_blocks(a, block_size), a_s, _k_blocks(b, block_size), b_s, block_size)
    acc = acc if out_dtype == torch.float32 else acc.to(out_dtype)
    return acc if len(lead) == 1 else acc.reshape(*lead, N)


def gemm_blocks(a_blocks: list[torch.Tensor], a_s: torch.Tensor, b_blocks: list[torch.Tensor], b_s: torch.Tensor,
                block_size: int = 128) -> torch.Tensor:
    """:func:`fp8_gemm_ref`'s accumulation from operands already decoded: ``a_blocks[i]`` (M, width) and
    ``b_blocks[i]`` (N, width), contiguous FP32 K blocks; ``a_s`` (M, nk) tile scales; ``b_s`` B's scales, block
    (ceil(N/bs), nk) or tile/row (N or 1, nk). No argument checks: callers made the operands. Returns (M, N) FP32."""
    N = b_blocks[0].shape[0]
    a_s = _f32(a_s)  # (M, nk)
    b_s = _f32(b_s if b_s.shape[0] in (1, N) else expand_b_scales(b_s, N, block_size))  # (N or 1, nk): a row
    one = a_s.shape[1] == 1  # one K block: no per-block scale columns to cut out
    acc = None  # the FP32 accumulator
    for i, (a_blk, b_blk) in enumerate(zip(a_blocks, b_blocks)):
        sa, sb = (a_s, b_s.t()) if one else (a_s[:, i:i + 1], b_s[:, i])  # (M, 1) and a row over N
        part = torch.mm(a_blk, b_blk.t()).mul_(sa).mul_(sb)  # (M, N): this block's product · its two scales
        acc = part.add_(0.0) if acc is None else acc.add_(part)  # 0.0 + part: as if acc had started at zero
    return acc


def sum_tiles(parts: torch.Tensor) -> torch.Tensor:
    """Wgrad's tile products (tiles, n, K) added tile by tile into an FP32 accumulator that starts at zero."""
    acc = parts[0].add_(0.0)  # as if the accumulator had started at zero
    for i in range(1, parts.shape[0]):
        acc.add_(parts[i])
    return acc


def tile_products(tq: torch.Tensor, ts: torch.Tensor, n: int, block_size: int = 128) -> torch.Tensor:
    """Each token tile's scaled product for a tokens-last stack [dyᵀ; xᵀ] (see :func:`wgrad_ref`): (tiles, n, K),
    tile j = (dyᵀ tile j)(xᵀ tile j)ᵀ · its two scales, from one decode and one batched GEMM (the same bits as
    a separate mm per tile)."""
    full = fp8_to_float(tq.unflatten(1, (-1, block_size)).transpose(0, 1))  # (tiles, n + K, bs)
    parts = torch.bmm(full[:, :n], full[:, n:].transpose(1, 2))  # (tiles, n, K): as each tile's own mm gives
    return parts.mul_(ts[:n].t().unsqueeze(-1)).mul_(ts[n:].t().unsqueeze(1))


def wgrad_ref(tq: torch.Tensor, ts: torch.Tensor, n: int, block_size: int = 128) -> torch.Tensor:
    """Wgrad from a tokens-last stack: ``fp8_gemm_ref(tq[:n], ts[:n], tq[n:], ts[n:])``, the same bits, with one
    decode of the stack and one batched GEMM over its token tiles instead of a loop of both.

    Args:
        tq: (n + K, Mp) float8_e4m3fn, dyᵀ (n rows) over xᵀ (K rows), quantised along tokens in 1×``block_size``
            tiles; Mp a multiple of ``block_size`` (zero-padded tokens).
        ts: (n + K, Mp / block_size) its tile scales.
    Returns:
        dW (n, K) in FP32: each tile's product times its two scales, added tile by tile in FP32.
    """
    check_block_size(block_size)
    if tq.dim() != 2 or tq.shape[1] % block_size or ts.shape != (tq.shape[0], tq.shape[1] // block_size):
        raise ValueError(f"wgrad_ref: tq (rows, Mp) with Mp a multiple of {block_size} and ts (rows, Mp/"
                         f"{block_size}) expected, got {tuple(tq.shape)} and {tuple(ts.shape)}")
    return sum_tiles(tile_products(tq, ts, n, block_size))
