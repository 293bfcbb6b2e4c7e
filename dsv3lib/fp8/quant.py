"""Reference FP8 quantisation and the block-scaled GEMM, in plain torch on any device (chapter 1).

Scaling groups from V3 §3.3.2: activations in 1×128 tiles (one scale per token per 128 channels),
weights in 128×128 blocks. Scale ``s = amax / 448`` from the current group (online, no amax history),
``q = fp8(x / s)``, dequantise ``q · s``. The same semantics as DeepSeek's ``inference/kernel.py``
(``act_quant``, ``weight_quant``/``weight_dequant``, ``fp8_gemm``), which the Triton kernels in
``kernels.py`` implement on a GPU; ``gemm.py`` picks one.

Shapes need not be multiples of the block: the last group is partial (its amax is taken over the
elements that exist) and scale tensors have ``ceil(K/128)`` columns. An all-zero group gets scale 1.
NaN or inf in a quantiser's input raises ``ValueError`` naming the tensor: saturating them silently
would turn a diverged step into plausible numbers.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FP8_DTYPE", "FP8_MAX", "check_finite", "compute_scale", "quant_per_tensor", "quant_per_row",
           "dequant_per_row", "act_quant", "act_dequant", "weight_quant", "weight_dequant", "expand_b_scales",
           "fp8_gemm_ref"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3fn value


def check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf; refusing to quantise it to FP8 (it would saturate)")


def compute_scale(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """FP32 scale mapping ``amax`` to 448 (to the next power of two ≥ that if ``pow2``); 1 where amax is 0."""
    s = amax.float() / FP8_MAX
    if pow2:  # a power of two makes x/s and q·s exact: only the FP8 rounding remains (V3 §3.3.3)
        m, e = torch.frexp(s)  # s = m·2^e, 0.5 <= m < 1: s is a power of two iff m == 0.5
        s = torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))
    return torch.where(amax > 0, s, torch.ones_like(s))


def _cast(x: torch.Tensor) -> torch.Tensor:
    # torch's CPU/GPU cast rounds to nearest even and saturates to ±448
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


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
    return x_fp8.float() * s


def _pad_to(x: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    pad = -x.shape[dim] % block
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def act_quant(x: torch.Tensor, block_size: int = 128, *, pow2: bool = False, name: str = "x"):
    """Quantise the last dim of ``x`` in 1×``block_size`` tiles.

    Args:
        x: (..., K) activations, any float dtype.
        block_size: tile width along K.
        pow2: round each scale up to a power of two.
        name: the tensor's name in error messages.
    Returns:
        x_fp8: (..., K) float8_e4m3fn;  scales: (..., ceil(K/block_size)) float32 (amax/448 per tile).
    """
    K = x.shape[-1]
    xt = _pad_to(x.float(), -1, block_size).unflatten(-1, (-1, block_size))  # (..., nk, bs)
    amax = xt.abs().amax(dim=-1)  # (..., nk)
    check_finite(amax, name)  # amax is NaN/inf iff its tile has one: a cheap check of all of x
    s = compute_scale(amax, pow2)
    q = _cast(xt / s.unsqueeze(-1)).flatten(-2)[..., :K]
    return q, s


def act_dequant(x_fp8: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """Inverse of :func:`act_quant` (FP32)."""
    K = x_fp8.shape[-1]
    return (x_fp8.float() * s.repeat_interleave(block_size, dim=-1)[..., :K])


def weight_quant(w: torch.Tensor, block_size: int = 128, *, pow2: bool = False, name: str = "weight"):
    """Quantise a (N, K) weight in ``block_size``×``block_size`` blocks.

    Returns:
        w_fp8: (N, K) float8_e4m3fn;  scales: (ceil(N/bs), ceil(K/bs)) float32.
    """
    if w.dim() != 2:
        raise ValueError(f"weight_quant: {name} must be 2-D (N, K), got shape {tuple(w.shape)}")
    N, K = w.shape
    wb = _pad_to(_pad_to(w.float(), 0, block_size), 1, block_size)
    wb = wb.unflatten(0, (-1, block_size)).unflatten(2, (-1, block_size))  # (nn, bs, nk, bs)
    amax = wb.abs().amax(dim=(1, 3))  # (nn, nk)
    check_finite(amax, name)  # NaN/inf in a block make its amax NaN/inf
    s = compute_scale(amax, pow2)
    q = _cast(wb / s[:, None, :, None]).flatten(2).flatten(0, 1)[:N, :K]
    return q, s


def weight_dequant(w_fp8: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """Inverse of :func:`weight_quant` (FP32, (N, K))."""
    N, K = w_fp8.shape
    full = s.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:N, :K]
    return w_fp8.float() * full


def expand_b_scales(b_s: torch.Tensor, N: int, block_size: int = 128) -> torch.Tensor:
    """(N, nk) per-row scales of B from either 128×128 block scales (ceil(N/bs), nk) or 1×128 tile scales (N, nk)."""
    nb = math.ceil(N / block_size)
    if b_s.shape[0] == N:
        return b_s
    if b_s.shape[0] == nb:
        return b_s.repeat_interleave(block_size, 0)[:N]
    raise ValueError(f"fp8_gemm: b_scales has {b_s.shape[0]} rows; expected {nb} (128×128 blocks) or {N} (1×128 tiles)")


def _check_gemm_args(a, a_s, b, b_s, block_size):
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm: a and b must be {FP8_DTYPE}, got {a.dtype} and {b.dtype}")
    if b.dim() != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"fp8_gemm: a (..., K) and b (N, K) must share K; got {tuple(a.shape)} and {tuple(b.shape)}")
    nk = math.ceil(a.shape[-1] / block_size)
    if a_s.shape != (*a.shape[:-1], nk):
        raise ValueError(f"fp8_gemm: a_scales must have shape {(*a.shape[:-1], nk)}, got {tuple(a_s.shape)}")
    if b_s.dim() != 2 or b_s.shape[1] != nk:
        raise ValueError(f"fp8_gemm: b_scales must have {nk} columns (one per {block_size} K), got {tuple(b_s.shape)}")


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, *,
                 block_size: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ bᵀ`` from block-scaled FP8 operands, promoting to FP32 every ``block_size`` K-elements.

    Args:
        a: (..., K) float8_e4m3fn with 1×128 tile scales ``a_s`` (..., ceil(K/128)).
        b: (N, K) float8_e4m3fn with 128×128 block scales ``b_s`` (ceil(N/128), ceil(K/128)),
           or 1×128 tile scales (N, ceil(K/128)) (used by Wgrad, where both operands are activations).
    Returns:
        (..., N) in ``out_dtype``. Each K block's partial product is exact FP32 (FP8×FP8 fits) and is
        multiplied by its two scales before joining the FP32 accumulator — what the GPU does after
        each N_C = 128 promotion (V3 §3.3.2, Fig. 7b).
    """
    _check_gemm_args(a, a_s, b, b_s, block_size)
    lead, K = a.shape[:-1], a.shape[-1]
    M = math.prod(lead)
    a2, as2 = a.reshape(M, K), a_s.reshape(M, a_s.shape[-1]).float()
    N = b.shape[0]
    bs_rows = expand_b_scales(b_s, N, block_size).float()  # (N, nk)
    acc = torch.zeros(a2.shape[0], N, dtype=torch.float32, device=a.device)
    for i, k0 in enumerate(range(0, K, block_size)):
        part = a2[:, k0:k0 + block_size].float() @ b[:, k0:k0 + block_size].float().T  # (M, N)
        acc += part * as2[:, i:i + 1] * bs_rows[:, i]
    return acc.to(out_dtype).reshape(*lead, N)
