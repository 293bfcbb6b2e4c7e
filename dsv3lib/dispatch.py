"""Which implementation runs: a Triton kernel or its torch reference (chapters 1 and 2).

Every operation that has a Triton kernel — FP8 quantisation and the block-scaled GEMM (:mod:`dsv3lib.fp8.gemm`),
the absorbed-MLA decode step (:mod:`dsv3lib.model.mla_decode`) — asks :func:`use_triton` here, so the policy
lives in one place:

* ``with use_backend("ref"):`` or ``with use_backend("triton"):`` forces one path inside the block (process-wide,
  every thread). "triton" with ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors in Triton's interpreter,
  which is how the tests check them.
* Otherwise ("auto") a kernel serves CUDA tensors when Triton is installed, the interpreter is off and the GPU
  has the compute capability the kernel needs; everything else runs the reference. A GPU below that capability
  gets one ``RuntimeWarning`` saying so.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["BACKENDS", "triton_available", "interpreting", "current_backend", "use_backend", "use_triton"]

BACKENDS = ("auto", "ref", "triton")
_backend = "auto"
_warned: set[str] = set()


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (found without importing it: importing Triton takes a while)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set: Triton then runs kernels in Python on CPU tensors. It must be set
    before Triton is first imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def current_backend() -> str:
    """The forced backend ("ref" or "triton"), or "auto"."""
    return _backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the reference (``"ref"``) or the Triton kernels (``"triton"``) inside the block; ``"auto"`` restores
    the default policy. The previous setting comes back on exit."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    prev, _backend = _backend, name
    try:
        yield
    finally:
        _backend = prev


def use_triton(t: torch.Tensor, *, min_capability: tuple[int, int] = (0, 0), what: str = "this kernel") -> bool:
    """Whether the Triton kernel should serve an operation on ``t``'s device.

    Args:
        t: a tensor the operation reads (its device decides).
        min_capability: the CUDA compute capability the kernel needs, e.g. (8, 9) for FP8 ``tl.dot``.
        what: what needs it, for the warning.
    """
    if _backend != "auto":
        return _backend == "triton"
    if t.device.type != "cuda" or interpreting() or not triton_available():
        return False
    cap = torch.cuda.get_device_capability(t.device)
    if cap < min_capability:
        msg = (f"dsv3lib: {what} needs compute capability sm_{min_capability[0]}{min_capability[1]}+, this GPU is "
               f"sm_{cap[0]}{cap[1]}; using the torch reference")
        if msg not in _warned:
            _warned.add(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return False
    return True
