"""One entry point per FP8 operation: Triton kernels on a CUDA GPU, the torch reference elsewhere (chapter 1).

``act_quant``, ``weight_quant`` and ``fp8_gemm`` here have the signatures of the references ``act_quant_ref``,
``weight_quant_ref`` and ``fp8_gemm_ref`` in ``quant.py``. Where :func:`dsv3lib.dispatch.use_triton` says so
(a CUDA GPU with FP8 ``tl.dot``, compute capability 8.9+) they call ``kernels.py`` when its shape conditions
hold (K a multiple of 128); otherwise, and on CPU, the reference. ``dsv3lib.dispatch.use_backend("ref")``
(or ``"triton"``) forces a path.
"""

from __future__ import annotations

import torch

from ..dispatch import use_triton
from . import quant

__all__ = ["act_quant", "weight_quant", "fp8_gemm", "wgrad"]

_NEEDS = dict(min_capability=(8, 9), what="FP8 tensor cores (tl.dot on float8_e4m3fn)")


def act_quant(x: torch.Tensor, block_size: int = 128, *, pow2: bool = False, name: str = "x"):
    """See :func:`dsv3lib.fp8.quant.act_quant_ref`."""
    quant.check_block_size(block_size)
    quant.check_tensor(x, name)
    if use_triton(x, **_NEEDS) and x.shape[-1] % block_size == 0:
        from . import kernels
        quant.check_finite(x, name)
        return kernels.act_quant(x.contiguous(), block_size, pow2=pow2)
    return quant.act_quant_ref(x, block_size, pow2=pow2, name=name)


def weight_quant(w: torch.Tensor, block_size: int = 128, *, pow2: bool = False, name: str = "weight"):
    """See :func:`dsv3lib.fp8.quant.weight_quant_ref`."""
    quant.check_block_size(block_size)
    quant.check_tensor(w, name)
    if use_triton(w, **_NEEDS) and w.dim() == 2:
        from . import kernels
        quant.check_finite(w, name)
        return kernels.weight_quant(w.contiguous(), block_size, pow2=pow2)
    return quant.weight_quant_ref(w, block_size, pow2=pow2, name=name)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, *,
             block_size: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """See :func:`dsv3lib.fp8.quant.fp8_gemm_ref` (``b`` and the scales may be transposed views)."""
    quant.check_block_size(block_size)
    if use_triton(a, **_NEEDS) and a.shape[-1] % block_size == 0:
        from . import kernels
        return kernels.fp8_gemm(a, a_s, b, b_s, block_size=block_size, out_dtype=out_dtype)
    return quant.fp8_gemm_ref(a, a_s, b, b_s, block_size=block_size, out_dtype=out_dtype)


def wgrad(tq: torch.Tensor, ts: torch.Tensor, n: int, block_size: int = 128) -> torch.Tensor:
    """dW (n, K) from a tokens-last stack [dyᵀ; xᵀ] (see :func:`dsv3lib.fp8.quant.wgrad_ref`): the Triton GEMM
    where :func:`fp8_gemm` would take it, else the reference's batched form (the same bits as its loop)."""
    if use_triton(tq, **_NEEDS):
        return fp8_gemm(tq[:n], ts[:n], tq[n:], ts[n:], block_size=block_size)
    return quant.wgrad_ref(tq, ts, n, block_size)
