"""One entry point per FP8 operation: Triton kernels on a CUDA GPU, the torch reference elsewhere (chapter 1).

``act_quant``, ``weight_quant`` and ``fp8_gemm`` here have the signatures of the reference functions in
``quant.py``. On CUDA they call ``kernels.py`` when its shape conditions hold (K a multiple of 128,
contiguous last dim); otherwise, and on CPU, they call the reference. GPUs without FP8 ``tl.dot``
(compute capability < 8.9) fall back to the reference with a one-line message, once.
Set ``dsv3lib.fp8.gemm.BACKEND = "ref"`` (or ``"triton"``) to force a path.
"""

from __future__ import annotations

import sys

import torch

from . import quant

__all__ = ["BACKEND", "use_triton", "act_quant", "weight_quant", "fp8_gemm"]

BACKEND = "auto"  # "auto" | "ref" | "triton"
_warned = False


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton path serves a tensor on ``t``'s device (``BACKEND="triton"`` forces it, e.g. with
    ``TRITON_INTERPRET=1`` on a CPU)."""
    global _warned
    if BACKEND != "auto":
        return BACKEND == "triton"
    if t.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(t.device) < (8, 9):
        if not _warned:
            print("dsv3lib.fp8: this GPU has no FP8 tensor cores (needs sm_89+); using the torch reference",
                  file=sys.stderr)
            _warned = True
        return False
    return True


def act_quant(x: torch.Tensor, block_size: int = 128, *, pow2: bool = False, name: str = "x"):
    """See :func:`dsv3lib.fp8.quant.act_quant`."""
    if use_triton(x) and x.shape[-1] % block_size == 0:
        from . import kernels
        quant.check_finite(x, name)
        return kernels.act_quant(x.contiguous(), block_size, pow2=pow2)
    return quant.act_quant(x, block_size, pow2=pow2, name=name)


def weight_quant(w: torch.Tensor, block_size: int = 128, *, pow2: bool = False, name: str = "weight"):
    """See :func:`dsv3lib.fp8.quant.weight_quant`."""
    if use_triton(w) and w.dim() == 2:
        from . import kernels
        quant.check_finite(w, name)
        return kernels.weight_quant(w.contiguous(), block_size, pow2=pow2)
    return quant.weight_quant(w, block_size, pow2=pow2, name=name)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, *,
             block_size: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """See :func:`dsv3lib.fp8.quant.fp8_gemm_ref`."""
    if use_triton(a) and a.shape[-1] % block_size == 0:
        from . import kernels
        return kernels.fp8_gemm(a, a_s, b, b_s, block_size=block_size, out_dtype=out_dtype)
    return quant.fp8_gemm_ref(a, a_s, b, b_s, block_size=block_size, out_dtype=out_dtype)
