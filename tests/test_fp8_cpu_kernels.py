"""The compiled CPU kernels (``dsv3lib/fp8/cpu_kernels.c``) against the PyTorch references they stand in for.

Every result must be the same bits (compared as integers, so -0.0 and +0.0 differ): quantised values and scales,
the scaled GEMM accumulation and Wgrad's tile sums, on odd shapes, all-zero groups, tiny and huge values; the
E4M3 rounding over every FP32 input up to 448 (slow). Without a compiler the library falls back to the references
with one warning (checked in a child process with a compiler that does not exist).
"""

import os
import subprocess
import sys

import pytest
import torch

from dsv3lib.dispatch import use_backend
from dsv3lib.fp8 import cpu_kernels, grid, quant
from dsv3lib.fp8.grouped import _stacked_weight_grid, _stacked_weight_grid_ref

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the kernels cannot be built")


def _same(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _data(*shape, seed=0):
    """Values across many binades, signed zeros, an all-zero group and a few exact E4M3 ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(*shape, generator=g).pow(6) * 50
    flat = x.view(-1)
    if flat.numel() > 8:
        flat[:3] = torch.tensor([-0.0, 0.0, -1e-30])
        flat[-140:-1] = 0  # most of a group, or a whole one
    return x


@pytest.mark.parametrize("shape", [(70, 256), (9, 64), (0, 128), (4, 384), (33, 200), (5, 1), (512, 128), (3, 129)])
def test_act_tiles_is_grid_act_ref(shape):
    x = _data(*shape, seed=1)
    v, s = grid.grid_act(x, 128, "x")
    rv, rs = grid.grid_act_ref(x, 128, "x")
    assert _same(v, rv) and _same(s, rs)


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (64, 128), (80, 64), (3, 1), (130, 257)])
def test_weight_blocks_is_grid_weight_ref(shape):
    w = _data(*shape, seed=2)
    v, s = grid.grid_weight(w, 128, "w")
    rv, rs = grid.grid_weight_ref(w, 128, "w")
    assert _same(v, rv) and _same(s, rs)


@pytest.mark.parametrize("E,N,K", [(16, 64, 128), (3, 130, 64), (2, 7, 300)])
def test_stacked_weight_blocks_are_the_reference(E, N, K):
    ws = list(_data(E, N, K, seed=3).unbind(0))
    v, s = _stacked_weight_grid(ws, 128, "w")
    rv, rs = _stacked_weight_grid_ref(torch.stack(ws), 128, "w")
    assert _same(v, rv) and _same(s, rs)


@pytest.mark.parametrize("mp,cols", [(256, 192), (3072, 64), (128, 1), (384, 300)])
def test_token_tiles_is_the_reference(mp, cols):
    a = _data(mp, cols, seed=4)
    v, s = grid.token_tiles(a, 128, "a")
    rv, rs = grid.token_tiles_ref(a.clone(), 128, "a")
    assert _same(v, rv) and _same(s, rs)
    v2, _ = grid.token_tiles(a, 128, "a", inplace=True)  # the kernel never overwrites its input
    assert _same(v2, rv)


@pytest.mark.parametrize("M,N,K", [(70, 200, 256), (33, 64, 192), (128, 80, 64), (5, 130, 384), (0, 64, 128)])
@pytest.mark.parametrize("b_rows", ["blocks", "rows", "one"])
def test_gemm_values_is_gemm_blocks(M, N, K, b_rows):
    a, b = _data(M, K, seed=5), _data(N, K, seed=6)
    av, a_s = grid.grid_act_ref(a, 128, "a")
    bv, b_s = grid.grid_weight_ref(b, 128, "b")
    if b_rows == "rows":
        b_s = quant.expand_b_scales(b_s, N, 128)
    elif b_rows == "one":
        b_s = b_s[:1]
    ab, bb = grid.split_k(av, 128), grid.split_k(bv, 128)
    got = grid.gemm_values(ab, a_s, bb, b_s, 128)
    want = quant.gemm_blocks(ab, a_s, bb, b_s, 128)
    assert _same(got, want)


@pytest.mark.parametrize("tiles,n,K", [(4, 64, 128), (1, 384, 128), (24, 128, 64), (3, 7, 300)])
def test_wgrad_values_is_the_tile_sum(tiles, n, K):
    dy, x = _data(tiles * 128, n, seed=7), _data(tiles * 128, K, seed=8)
    dv, ds = grid.token_tiles_ref(dy, 128, "dy")
    xv, xs = grid.token_tiles_ref(x, 128, "x")
    got = grid.wgrad_values(dv, ds, xv, xs)
    want = quant.sum_tiles(grid.tile_products_fp32(dv, ds, xv, xs))
    assert _same(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_refused_by_name(bad):
    x = torch.ones(40, 200)
    x[3, 150] = bad
    with pytest.raises(ValueError, match="FP8Linear input: contains NaN or inf"):
        grid.grid_act(x, 128, "FP8Linear input")
    with pytest.raises(ValueError, match="the weight: contains NaN or inf"):
        grid.grid_weight(x, 128, "the weight")
    a = torch.ones(256, 5)
    a[200, 3] = bad
    with pytest.raises(ValueError, match="dy: contains NaN or inf"):
        grid.token_tiles(a, 128, "dy")


def test_subnormal_scales_run_the_reference():
    # an amax below ~5e-36 makes a subnormal scale: the kernel says so and the reference (torch's cast) answers
    x = torch.linspace(1e-44, 9.4e-43, 256 * 3).view(256, 3)
    v, s, status = cpu_kernels.token_tiles(x, 128)
    assert status & cpu_kernels.SUBNORMAL_SCALE
    got, gs = grid.token_tiles(x, 128, "x")
    want, ws = grid.token_tiles_ref(x.clone(), 128, "x")
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and torch.equal(gs, ws)
    assert status == 2 and cpu_kernels.act_tiles(x.t().contiguous(), 128)[2] == 2


def test_ref_backend_turns_the_kernels_off():
    x = torch.ones(4, 4)
    assert cpu_kernels.serves(x)
    with use_backend("ref"):
        assert not cpu_kernels.serves(x)


@pytest.mark.slow
def test_rounding_of_every_fp32_up_to_448():
    # rows of [448, v_1 … v_127]: the tile's scale is exactly 1, so the kernel rounds each v itself
    hi = torch.tensor(448.0).view(torch.int32).item()
    for start in range(0, hi + 1, 127 << 17):
        v = torch.arange(start, min(start + (127 << 17), hi + 1), dtype=torch.int32).view(torch.float32)
        v = torch.cat([v, v.new_zeros(-v.numel() % 127)])
        for sign in (1.0, -1.0):
            rows = torch.cat([torch.full((v.numel() // 127, 1), 448.0), sign * v.view(-1, 127)], dim=1)
            got, s = grid.grid_act(rows, 128, "v")
            assert (s == 1).all()
            want = rows.to(torch.float8_e4m3fn).float()
            assert torch.equal(got, want)  # == : a tiny negative that rounds to zero is +0 here (grid.py)


def test_without_a_compiler_the_references_run_with_one_warning(tmp_path):
    code = (
        "import warnings, torch\n"
        "from dsv3lib.fp8 import FP8Linear, cpu_kernels\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    layer = FP8Linear(64, 32)\n"
        "    y = layer(torch.randn(8, 64)); y.sum().backward(); layer(torch.randn(8, 64))\n"
        "msgs = [str(x.message) for x in w if 'FP8 CPU kernels' in str(x.message)]\n"
        "assert not cpu_kernels.available() and len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "DSV3_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "could not be built" in r.stdout and "reference" in r.stdout
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind


def test_kernels_refuse_what_they_would_misread():
    # a strided or non-FP32 tensor would be read with the wrong layout: refused before any C code runs
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        cpu_kernels.act_tiles(torch.ones(8, 4).t(), 128)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        cpu_kernels.weight_blocks(torch.ones(1, 4, 4, dtype=torch.float64), 128)
    with pytest.raises(ValueError, match="not a multiple of the block"):
        cpu_kernels.token_tiles(torch.ones(100, 3), 128)
    part = torch.ones(4, 5)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.scale_acc(part, torch.ones(3), torch.ones(1, 5), part, True)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.tile_sum(torch.ones(2, 3, 4), torch.ones(2, 3), torch.ones(2, 5), torch.empty(3, 4))
