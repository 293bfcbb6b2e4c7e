"""The absorbed-MLA decode step (dsv3lib.model.mla_decode; chapter 2): the torch reference against
attention written out per head, and the Triton flash-decoding kernel against the reference, under
TRITON_INTERPRET=1 on CPU (in a subprocess, so the interpreter setting cannot leak into other tests)
and natively when a CUDA GPU is present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3lib.model.mla_decode import mla_decode, mla_decode_ref

C, R = 32, 16  # small latent and RoPE widths keep the interpreter fast


def random_inputs(B, H, S, C=C, R=R, dtype=torch.float32, device="cpu", seed=0):
    """Queries and a cache laid out as LatentCache stores it: one (B, S+pad, C+R) buffer, two views."""
    g = torch.Generator().manual_seed(seed)
    q_latent = torch.randn(B, H, C, generator=g)
    q_pe = torch.randn(B, H, R, generator=g)
    buf = torch.randn(B, S + 3, C + R, generator=g)  # 3 unused slots: the views are not contiguous
    cast = dict(dtype=dtype, device=device)
    buf = buf.to(**cast)
    return q_latent.to(**cast), q_pe.to(**cast), buf[:, :S, :C], buf[:, :S, C:]


def test_reference_matches_per_head_attention():
    B, H, S = 3, 4, 9
    q_latent, q_pe, kv, pe = random_inputs(B, H, S)
    lengths = torch.tensor([9, 1, 5])
    got = mla_decode_ref(q_latent, q_pe, kv, pe, lengths, 0.3)
    for b in range(B):
        n = int(lengths[b])
        k = torch.cat([kv[b, :n], pe[b, :n]], -1)  # (n, C+R): the one key every head uses
        for h in range(H):
            p = torch.softmax(torch.cat([q_latent[b, h], q_pe[b, h]]) @ k.T * 0.3, -1)
            torch.testing.assert_close(got[b, h], p @ kv[b, :n], atol=1e-6, rtol=1e-5)


def test_dispatch_on_cpu_is_the_reference():
    q_latent, q_pe, kv, pe = random_inputs(2, 3, 7)
    lengths = torch.tensor([7, 4])
    assert torch.equal(mla_decode(q_latent, q_pe, kv, pe, lengths, 0.2),
                       mla_decode_ref(q_latent, q_pe, kv, pe, lengths, 0.2))


def test_shape_errors_name_the_argument():
    q_latent, q_pe, kv, pe = random_inputs(2, 3, 7)
    with pytest.raises(ValueError, match="q_pe"):
        mla_decode_ref(q_latent, q_pe[:, :2], kv, pe, torch.tensor([7, 7]), 0.2)
    with pytest.raises(ValueError, match="pe_cache"):
        mla_decode_ref(q_latent, q_pe, kv, pe[:, :5], torch.tensor([7, 7]), 0.2)
    with pytest.raises(ValueError, match="lengths"):
        mla_decode_ref(q_latent, q_pe, kv, pe, torch.tensor([7.0, 7.0]), 0.2)


# --------------------------------------------------------------------------------- the Triton kernel
def _kernel_cases(device: str) -> None:
    """Kernel vs reference on random data; several lengths, including ones that are not a multiple of
    the context block, one-token sequences, several slice counts, fp32 and bf16 inputs."""
    from dsv3lib.model.mla_decode import mla_decode_triton

    cases = [  # (B, H, S, lengths, block_n, n_splits, dtype)
        (3, 4, 70, [70, 1, 33], 16, None, torch.float32),
        (3, 4, 70, [70, 1, 33], 16, 3, torch.float32),  # slices past a short sequence stay empty
        (2, 5, 48, [48, 17], 16, 1, torch.float32),  # one slice, 5 heads padded to a block of 16
        (2, 4, 37, [37, 16], 32, 2, torch.bfloat16),
    ]
    for B, H, S, lengths, block_n, n_splits, dtype in cases:
        q_latent, q_pe, kv, pe = random_inputs(B, H, S, dtype=dtype, device=device, seed=S)
        lengths = torch.tensor(lengths, device=device)
        want = mla_decode_ref(q_latent, q_pe, kv, pe, lengths, 0.2)
        got = mla_decode_triton(q_latent, q_pe, kv, pe, lengths, 0.2, block_n=block_n, n_splits=n_splits)
        assert got.dtype == dtype and got.shape == (B, H, C)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got, want, **tol)
    print("kernel ok")


@pytest.mark.slow
def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(tests)!r}); import test_mla_decode as t; t._kernel_cases('cpu')"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0 and "kernel ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_on_gpu():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set")
    _kernel_cases("cuda")
    # DeepSeek-V3 per-layer widths in bf16; mla_decode dispatches to the kernel
    q_latent, q_pe, kv, pe = random_inputs(4, 128, 1000, C=512, R=64, dtype=torch.bfloat16, device="cuda")
    lengths = torch.tensor([1000, 1, 513, 999], device="cuda")
    torch.testing.assert_close(mla_decode(q_latent, q_pe, kv, pe, lengths, 0.135),
                               mla_decode_ref(q_latent, q_pe, kv, pe, lengths, 0.135), atol=2e-2, rtol=2e-2)
