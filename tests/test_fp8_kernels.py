"""dsv3lib.fp8.kernels: the Triton kernels against the torch reference, under TRITON_INTERPRET=1 on CPU.

Triton must see TRITON_INTERPRET=1 before it is first imported, and setting it would leak into every
later test of the session. So unless the variable is already set, this module runs itself once in a
child pytest process with it set (``test_kernels_in_interpreter``) and skips its kernel tests here;
in the child they run. Shapes are small and blocks big: the interpreter's cost grows with programs ×
loop steps. On a CUDA machine ``test_compiled_kernels_on_gpu`` runs the compiled kernels.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from dsv3lib.dispatch import use_backend
from dsv3lib.fp8 import quant
from dsv3lib.fp8.linear import FP8Linear

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.slow
def test_kernels_in_interpreter():
    if INTERPRETED:
        pytest.skip("this is the child process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


@pytest.fixture(scope="module")
def kernels():
    import dsv3lib.fp8.kernels as k
    assert k.INTERPRET
    return k


def _bits(t):
    return t.view(torch.uint8)


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@in_child
@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant_kernel_bit_exact(kernels, pow2):
    x = _rand(3, 23, 256, scale=3.0)  # M = 69 rows: not a multiple of the 32-row program block
    x[0, 1, :128] = 0  # an all-zero tile
    y, s = kernels.act_quant(x, pow2=pow2)
    yr, sr = quant.act_quant_ref(x, pow2=pow2)
    assert y.shape == x.shape and s.shape == (3, 23, 2)
    assert torch.equal(s, sr)
    assert torch.equal(_bits(y), _bits(yr))


@in_child
def test_act_quant_kernel_rounds_ties_subnormals_like_torch(kernels):
    # scale exactly 1 (each tile's max is 448), so the kernel must reproduce torch's cast of the values themselves
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[:-1] + grid[1:]) / 2  # halfway between neighbours, incl. the subnormal range
    vals = torch.cat([ties, grid[:-1] + (grid[1:] - grid[:-1]) * 0.3, _rand(500, seed=5) * 0.01])
    n = vals.numel() // 127 * 127
    x = torch.cat([torch.full((n // 127, 1), 448.0), vals[:n].reshape(-1, 127)], dim=1)
    y, s = kernels.act_quant(x.contiguous())
    assert torch.equal(s, torch.ones_like(s))
    assert torch.equal(_bits(y), _bits(x.to(torch.float8_e4m3fn)))


@in_child
@pytest.mark.parametrize("shape", [(256, 128), (200, 300)])
def test_weight_quant_kernel_bit_exact(kernels, shape):
    w = _rand(*shape, seed=1)
    y, s = kernels.weight_quant(w)
    yr, sr = quant.weight_quant_ref(w)
    assert torch.equal(s, sr) and torch.equal(_bits(y), _bits(yr))


@in_child
@pytest.mark.parametrize("M,N,K", [(70, 200, 256), (1, 128, 128)])
@pytest.mark.parametrize("b_layout", ["blocks", "tiles"])
def test_fp8_gemm_kernel_matches_reference(kernels, M, N, K, b_layout):
    aq, as_ = quant.act_quant_ref(_rand(M, K, seed=2))
    b = _rand(N, K, seed=3)
    bq, bs = quant.weight_quant_ref(b) if b_layout == "blocks" else quant.act_quant_ref(b)
    as_ = as_ * torch.linspace(0.5, 2, as_.numel()).reshape(as_.shape)  # distinct scales per K block
    got = kernels.fp8_gemm(aq, as_, bq, bs)
    want = quant.fp8_gemm_ref(aq, as_, bq, bs)
    assert got.shape == (M, N)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@in_child
def test_kernel_wrappers_check_layout(kernels):
    with pytest.raises(ValueError, match="K % 128"):
        kernels.act_quant(torch.randn(4, 200))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.act_quant(torch.randn(256, 8).t())
    aq, as_ = quant.act_quant_ref(torch.randn(4, 200))
    bq, bs = quant.weight_quant_ref(torch.randn(8, 200))
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.fp8_gemm(aq, as_, bq, bs)


@in_child
def test_fp8_linear_through_triton_matches_reference_path(kernels):
    _linear_triton_vs_reference("cpu")


def _linear_triton_vs_reference(device):
    """One FP8Linear forward and backward through the Triton kernels and through the references: the same
    output, input gradient and weight gradient."""
    torch.manual_seed(0)
    layer = FP8Linear(256, 128).to(device)
    x = torch.randn(70, 256, device=device)  # 70 tokens: Wgrad pads them to 128
    dy = torch.randn(70, 128, device=device)
    results = {}
    for backend in ("ref", "triton"):
        with use_backend(backend):
            xi = x.clone().requires_grad_(True)
            layer.zero_grad()
            y = layer(xi)
            y.backward(dy)
        results[backend] = (y.detach(), xi.grad, layer.weight.grad.clone())
    # the interpreter sums in exact FP32; Hopper's FP8 tensor cores keep ~14 bits inside a block (V3 §3.3.2)
    tol = 1e-5 if device == "cpu" else 1e-3
    for got, want in zip(results["triton"], results["ref"], strict=True):
        assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


GPU_CHECK = """
import torch
from dsv3lib.fp8 import kernels, quant
a, b = torch.randn(300, 512, device="cuda"), torch.randn(384, 512, device="cuda")
for pow2 in (False, True):
    y, s = kernels.act_quant(a, pow2=pow2); yr, sr = quant.act_quant_ref(a, pow2=pow2)
    assert torch.equal(s, sr) and torch.equal(y.view(torch.uint8), yr.view(torch.uint8)), "act_quant"
w, ws = kernels.weight_quant(b); wr, wsr = quant.weight_quant_ref(b)
assert torch.equal(ws, wsr) and torch.equal(w.view(torch.uint8), wr.view(torch.uint8)), "weight_quant"
c = kernels.fp8_gemm(y, s, w, ws); cr = quant.fp8_gemm_ref(y, s, w, ws)
assert torch.allclose(c, cr, rtol=1e-4, atol=1e-4 * cr.abs().max().item()), (c - cr).abs().max()
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (sm_89+), not the interpreter")
def test_compiled_kernels_on_gpu():
    r = subprocess.run([sys.executable, "-c", GPU_CHECK], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (sm_89+), not the interpreter")
def test_fp8_linear_on_gpu():
    _linear_triton_vs_reference("cuda")
