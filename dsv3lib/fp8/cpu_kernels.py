"""The CPU fast path of FP8 training: ``cpu_kernels.c``, built with the system C compiler on first use (chapter 1).

A CPU has no FP8 GEMM, so ``FP8Linear`` on the CPU multiplies the E4M3 *values* in FP32 (:mod:`~dsv3lib.fp8.grid`).
The GEMMs are ``torch.mm``; around them, each operand's quantisation (group amax, scale, divide, round) and each
GEMM's scaled accumulation are elementwise work that eager PyTorch does in about ten passes and ten dispatches
per tensor. The functions here do it in one or two passes each, with the same IEEE operations in the same order
as the PyTorch references they stand in for (same signatures; ``grid.*_ref``, ``quant.gemm_blocks``,
``quant.sum_tiles``), so every result is the same bits (tests/test_fp8_cpu_kernels.py). Same semantics, about
three to five times less time for this part of a step.

The C file is compiled once into a cache directory (``$DSV3_CACHE`` or ``~/.cache/dsv3lib``, else the temp
directory), ``-O3 -ffp-contract=off``, no fast-math and no ``-march`` (portable), and loaded through ``ctypes``.
Without a C compiler the references run (one ``RuntimeWarning`` says so) and everything is only slower; they also
run with ``DSV3_CPU_KERNELS=0`` and inside ``dispatch.use_backend("ref")``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ..dispatch import current_backend

__all__ = ["available", "serves", "act_tiles", "weight_blocks", "token_tiles", "scale_acc", "tile_sum"]

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-std=c99"]
_I64, _P = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {  # name: (argument types, return type)
    "act_tiles": ([_P, _P, _P, _I64, _I64, _I64], ctypes.c_int),
    "weight_blocks": ([_P, _P, _P, _I64, _I64, _I64, _I64], ctypes.c_int),
    "token_tiles": ([_P, _P, _P, _I64, _I64, _I64], ctypes.c_int),
    "scale_acc": ([_P, _P, _I64, _P, _I64, _I64, _P, _I64, _I64, ctypes.c_int], None),
    "tile_sum": ([_P, _P, _P, _P, _I64, _I64, _I64], None),
}


def _cache_dir() -> Path:
    home, tmp = Path.home() / ".cache" / "dsv3lib", Path(tempfile.gettempdir()) / "dsv3lib"
    for d in (os.environ.get("DSV3_CACHE"), home, tmp):
        if d:
            try:
                Path(d).mkdir(parents=True, exist_ok=True)
                if os.access(d, os.W_OK):
                    return Path(d)
            except OSError:
                continue
    raise OSError("no writable cache directory for the FP8 CPU kernels")


def _build() -> Path:
    """Compile the C file once (keyed by its text, the compiler, its flags and the platform); the library's path.
    The library is written under a temporary name and renamed: a reader never sees half of one. No ``-march``:
    a cache in a home directory shared by different machines must run on all of them."""
    if sys.platform == "win32":
        raise OSError("the build uses a Unix C compiler and a shared object; not on Windows")
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        raise OSError("no C compiler found (cc, gcc or clang; or set CC)")
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + f"{cc}|{_FLAGS}|{platform.machine()}|{sys.platform}".encode()).hexdigest()[:16]
    cache = _cache_dir()
    out = cache / f"fp8_cpu_kernels_{key}.so"
    if out.exists():
        return out
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp")
    try:
        r = subprocess.run([cc, *_FLAGS, "-o", str(tmp), str(_SOURCE)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{cc} failed: {e}") from None
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = r.stderr.strip().splitlines()
        raise OSError(f"{cc} failed: {lines[-1] if lines else f'exit {r.returncode}'}")
    os.replace(tmp, out)
    for old in cache.glob("fp8_cpu_kernels_*.so"):  # builds of earlier versions of the source
        if old != out:
            old.unlink(missing_ok=True)
    return out


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("DSV3_CPU_KERNELS", "1") in ("0", ""):
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
        for name, (args, ret) in _SIGNATURES.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = ret
        return lib
    except (OSError, AttributeError) as e:
        warnings.warn(f"dsv3lib: the FP8 CPU kernels could not be built ({e}); FP8 on the CPU runs the PyTorch "
                      "references instead: the same numbers, more slowly", RuntimeWarning, stacklevel=3)
        return None


def available() -> bool:
    """Whether the compiled kernels can be used in this process (builds them on first call)."""
    return _lib() is not None


def serves(t: torch.Tensor) -> bool:
    """Whether the kernels should do the elementwise work for CPU tensor ``t`` (not under ``use_backend("ref")``)."""
    return t.device.type == "cpu" and current_backend() != "ref" and _lib() is not None


def _ptr(t: torch.Tensor) -> int:
    """The address the C code reads or writes: only for a contiguous FP32 CPU tensor (anything else would be
    read with the wrong layout, or outside its memory)."""
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"cpu_kernels: expected a contiguous float32 CPU tensor, got {t.dtype} on {t.device}, "
                         f"shape {tuple(t.shape)}, strides {t.stride()}")
    return t.data_ptr()


def _vec_ptr(t: torch.Tensor) -> int:
    """The address of an FP32 CPU vector or matrix read through explicit strides (no contiguity needed)."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"cpu_kernels: expected a float32 CPU tensor, got {t.dtype} on {t.device}")
    return t.data_ptr()


NONFINITE, SUBNORMAL_SCALE = 1, 2  # the quantisers' status bits (see the C file)


def act_tiles(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """1×bs tiles along K of a contiguous FP32 (M, K) matrix: its E4M3 values (M, K), the (M, ceil(K/bs)) scales
    and a status (0, or :data:`NONFINITE` | :data:`SUBNORMAL_SCALE` bits: then the values are not to be used)."""
    M, K = x.shape
    v, s = torch.empty_like(x), x.new_empty(M, -(-K // block_size))
    return v, s, _lib().act_tiles(_ptr(x), _ptr(v), _ptr(s), M, K, block_size)


def weight_blocks(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """bs×bs blocks of each matrix of a contiguous FP32 (B, N, K) stack: values (B, N, K), scales (B, nn, nk) and
    a status."""
    B, N, K = w.shape
    bs = block_size
    v, s = torch.empty_like(w), w.new_empty(B, -(-N // bs), -(-K // bs))
    return v, s, _lib().weight_blocks(_ptr(w), _ptr(v), _ptr(s), B, N, K, bs)


def token_tiles(a: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """bs×1 tiles along the rows of a contiguous FP32 (Mp, C) matrix, Mp a multiple of bs: the values (Mp, C) in
    ``a``'s layout, the (Mp/bs, C) scales and a status."""
    mp, cols = a.shape
    if mp % block_size:
        raise ValueError(f"token_tiles: {mp} rows is not a multiple of the block ({block_size})")
    v, s = torch.empty_like(a), a.new_empty(mp // block_size, cols)
    return v, s, _lib().token_tiles(_ptr(a), _ptr(v), _ptr(s), mp, cols, block_size)


def scale_acc(part: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, acc: torch.Tensor, first: bool) -> None:
    """``acc = (0 if first else acc) + (part · sa) · sb`` for a contiguous (M, N) ``part`` and ``acc`` (may be the
    same tensor), ``sa`` a length-M vector (any stride) and ``sb`` broadcastable to (M, N) as an (M or 1, N or 1)
    view (any strides): the scale multiplies and accumulation of ``quant.gemm_blocks``."""
    M, N = part.shape
    if acc.shape != part.shape or sa.shape != (M,) or sb.dim() != 2 or sb.shape[0] not in (1, M) \
            or sb.shape[1] not in (1, N):
        raise ValueError(f"scale_acc: part {tuple(part.shape)}, acc {tuple(acc.shape)}, sa {tuple(sa.shape)} and sb "
                         f"{tuple(sb.shape)} do not fit (M, N), (M, N), (M,) and (M or 1, N or 1)")
    sb_rs = sb.stride(0) if sb.shape[0] > 1 else 0
    sb_cs = sb.stride(1) if sb.shape[1] > 1 else 0
    _lib().scale_acc(_ptr(part), _vec_ptr(sa), sa.stride(0) if M > 1 else 0, _vec_ptr(sb), sb_rs, sb_cs, _ptr(acc),
                     M, N, int(first))


def tile_sum(parts: torch.Tensor, ds: torch.Tensor, xs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Wgrad's tile products (T, n, K) times their scales ``ds`` (T, n) and ``xs`` (T, K), summed tile by tile
    into ``out`` (n, K) from zero (all contiguous FP32): ``quant.sum_tiles`` of ``tile_products``' scaling."""
    T, n, K = parts.shape
    if ds.shape != (T, n) or xs.shape != (T, K) or out.shape != (n, K):
        raise ValueError(f"tile_sum: parts {tuple(parts.shape)}, ds {tuple(ds.shape)}, xs {tuple(xs.shape)} and out "
                         f"{tuple(out.shape)} do not fit (T, n, K), (T, n), (T, K) and (n, K)")
    _lib().tile_sum(_ptr(parts), _ptr(ds), _ptr(xs), _ptr(out), T, n, K)
    return out
