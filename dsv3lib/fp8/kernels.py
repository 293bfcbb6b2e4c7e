"""Triton kernels for fine-grained FP8: act_quant, weight_quant and the block-scaled GEMM (chapter 1).

The same semantics as the references in ``quant.py`` (tests compare them under ``TRITON_INTERPRET=1``),
in the shape of DeepSeek-V3's ``inference/kernel.py``: each kernel is a ``@triton.jit`` function plus a
host wrapper that checks layout and divisibility and allocates outputs.

Interpreter workarounds (shared/DESIGN.md, Triton 3.9): its float32→fp8 ``.to()`` rounds some values to
half and does not saturate, so ``_round_e4m3`` first rounds onto the E4M3 grid in float32 (exponent from
the bits; round-half-even with ``libdevice.rint`` on a GPU, with the 1.5·2^23 trick in the interpreter,
which lacks rint) and clamps; the cast then only has exact values to convert. On a GPU the extra rounding
is redundant but harmless. Divisions use ``tl.div_rn`` (``/`` may compile to an approximate divide) so
the scales and quotients match torch bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..dispatch import interpreting
from .formats import FP8_DTYPE, FP8_MAX
from .quant import check_block_size, check_gemm_args

__all__ = ["act_quant", "weight_quant", "fp8_gemm", "GEMM_CONFIGS", "INTERPRET"]

INTERPRET = interpreting()  # Triton reads TRITON_INTERPRET when first imported
_USE_LIBDEVICE = tl.constexpr(not INTERPRET)  # the interpreter lacks libdevice.rint
_MAX = tl.constexpr(FP8_MAX)  # 448, the largest E4M3fn value

# Autotune candidates for the GEMM (BLOCK_K is the 128-wide scaling group and stays fixed).
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=ns, num_warps=nw)
    for bm in (64, 128) for bn in (128, 256) for ns in (3, 4) for nw in (4, 8)
    if not (bm == 128 and bn == 256 and nw == 4)
]
if INTERPRET:  # the interpreter pays per program and per loop step: few, large tiles
    GEMM_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128})]


@triton.jit
def _round_e4m3(y):
    """Round float32 ``y`` to the nearest E4M3fn value (ties to even), saturating at ±448; stays float32."""
    y = tl.minimum(tl.maximum(y, -_MAX), _MAX)
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # unbiased exponent of |y|
    e = tl.maximum(e, -6)  # E4M3 subnormals share the spacing of exponent -6
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): three mantissa bits
    inv_ulp = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3-e), so no (approximate) division
    q = tl.abs(y) * inv_ulp  # exact; q < 16
    if _USE_LIBDEVICE:
        q = libdevice.rint(q)  # round half to even
    else:
        q = (q + 12582912.0) - 12582912.0  # the same in plain float32: 1.5·2^23 pushes the fraction out
    # the sign goes back on after rounding as a bit, so -0.3·ulp gives -0 like torch (Triton 3.6 compiles -q as
    # 0 - q, which gives +0); (bits >> 31) << 31 is 0x80000000 for a negative y, else 0
    return ((q * ulp).to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    # IEEE division (``/`` may compile to an approximate one) so scales match torch's amax / 448 exactly
    s = tl.div_rn(amax, tl.full(amax.shape, _MAX, tl.float32))
    if POW2:  # next power of two ≥ s from the bits: bump the exponent unless the mantissa is already 0
        bits = s.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
    return tl.where(amax > 0, s, 1.0)


@triton.jit
def act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, POW2: tl.constexpr):
    """One program: BLOCK_M rows × one 1×BLOCK tile column of a (M, K) row-major x."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = rows[:, None] < M
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _scale(tl.max(tl.abs(x), axis=1), POW2)  # (BLOCK_M,)
    y = _round_e4m3(tl.div_rn(x, s[:, None] + tl.zeros_like(x)))
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * (K // BLOCK) + pid_k, s, mask=rows < M)


def act_quant(x: torch.Tensor, block_size: int = 128, *, pow2: bool = False):
    """1×``block_size`` tile quantisation of the last dim.

    Args:
        x: (..., K) contiguous, K a multiple of ``block_size``.
    Returns:
        (..., K) float8_e4m3fn and (..., K/block_size) float32 scales, as :func:`quant.act_quant_ref`.
    """
    check_block_size(block_size)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not x.is_contiguous() or x.shape[-1] % block_size:
        raise ValueError(f"act_quant kernel: x must be contiguous with K % {block_size} == 0, got {tuple(x.shape)}")
    K = x.shape[-1]
    M = x.numel() // K
    y = torch.empty_like(x, dtype=FP8_DTYPE)
    s = x.new_empty(*x.shape[:-1], K // block_size, dtype=torch.float32)
    block_m = 32 if INTERPRET else 16
    grid = (triton.cdiv(M, block_m), K // block_size)
    act_quant_kernel[grid](x, y, s, M, K, BLOCK_M=block_m, BLOCK=block_size, POW2=pow2)
    return y, s


@triton.jit
def weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, BLOCK: tl.constexpr, POW2: tl.constexpr):
    """One program: one BLOCK×BLOCK block of a (N, K) row-major weight (partial at the edges)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    y = _round_e4m3(tl.div_rn(w, s + tl.zeros_like(w)))
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * tl.cdiv(K, BLOCK) + pid_k, s)


def weight_quant(w: torch.Tensor, block_size: int = 128, *, pow2: bool = False):
    """``block_size``×``block_size`` quantisation of a contiguous (N, K) weight (any N, K).

    Returns:
        (N, K) float8_e4m3fn and (ceil(N/bs), ceil(K/bs)) float32 scales, as :func:`quant.weight_quant_ref`.
    """
    check_block_size(block_size)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"w: expected a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"weight_quant kernel: w must be a contiguous (N, K) matrix, got {tuple(w.shape)}")
    N, K = w.shape
    y = torch.empty_like(w, dtype=FP8_DTYPE)
    grid = (triton.cdiv(N, block_size), triton.cdiv(K, block_size))
    s = w.new_empty(*grid, dtype=torch.float32)
    weight_quant_kernel[grid](w, y, s, N, K, BLOCK=block_size, POW2=pow2)
    return y, s


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K"])
@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, GROUP_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C (M, N) = A (M, K) · B (N, K)ᵀ with A scales (M, K/BLOCK_K) and B scales (ceil(N/GROUP_N), K/BLOCK_K).

    GROUP_N = 128: B has 128×128 block scales (weights); GROUP_N = 1: 1×128 tile scales (Wgrad's xᵀ).
    Each BLOCK_K step is one tensor-core product promoted to the FP32 accumulator with its scales.
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    nk = K // BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_n[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N): Bᵀ tile
    as_ptrs = as_ptr + offs_m * nk
    bs_ptrs = bs_ptr + (offs_n // GROUP_N) * nk
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(nk):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        sa = tl.load(as_ptrs + k, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptrs + k, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]  # FP32 promotion of this 128-K partial sum
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, *,
             block_size: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ bᵀ`` for FP8 a (..., K) with 1×128 scales and b (N, K) with 128×128 block or 1×128 tile scales.

    K must be a multiple of ``block_size``; M and N are free; b and the scales may have any strides (they are
    made contiguous). Returns (..., N) in ``out_dtype``.
    """
    check_gemm_args(a, a_s, b, b_s, block_size, out_dtype)
    K = a.shape[-1]
    if K % block_size:
        raise ValueError(f"fp8_gemm kernel: K={K} must be a multiple of {block_size} (use the reference)")
    N = b.shape[0]
    if b_s.shape[0] == N:
        group_n = 1
    elif b_s.shape[0] == triton.cdiv(N, block_size):
        group_n = block_size
    else:
        raise ValueError(f"fp8_gemm kernel: b_scales rows {b_s.shape[0]} fit neither blocks nor tiles of N={N}")
    a2 = a.reshape(-1, K).contiguous()
    M = a2.shape[0]
    c = a.new_empty(M, N, dtype=out_dtype)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])

    fp8_gemm_kernel[grid](a2, b.contiguous(), c, a_s.reshape(M, -1).float().contiguous(),
                          b_s.float().contiguous(), M, N, K, GROUP_N=group_n, BLOCK_K=block_size)
    return c.reshape(*a.shape[:-1], N)
