"""The CPU path's E4M3 values computed in FP32 (``dsv3lib.fp8.grid``) against the FP8 cast and decode they replace.

``round_to_e4m3_`` must give ``v.to(float8_e4m3fn).float()`` for every FP32 number a quantiser can produce
(|v| ≤ 464): checked exhaustively over all non-negative FP32 bit patterns up to 464 (slow) and, quickly, on
every E4M3 value, every midpoint between neighbours and the FP32 numbers one step either side of it. The
operand builders must equal the FP8 route's decoded tensors bit for bit.
"""

import pytest
import torch

from dsv3lib.fp8 import act_quant_ref, fp8_to_float, weight_quant_ref
from dsv3lib.fp8.grid import (Recent, clear_caches, grid_act, grid_weight, round_to_e4m3_, shared_act, split_k,
                              tile_products_fp32, token_tiles)
from dsv3lib.fp8.quant import _k_blocks, tile_products

FP8 = torch.float8_e4m3fn


def _cast_decode(v):
    return v.to(FP8).float()


def _check(v):
    got = round_to_e4m3_(v.clone())
    want = _cast_decode(v)
    bad = got != want  # -0.0 == +0.0: the one documented difference (a tiny negative rounds to +0)
    assert not bad.any(), f"{bad.sum().item()} mismatches, e.g. v={v[bad][:4].tolist()} got {got[bad][:4].tolist()}"


def test_grid_points_midpoints_and_their_neighbours():
    grid = torch.arange(128, dtype=torch.uint8).view(FP8).float()  # 0 … 448, the non-negative finite values
    grid = grid[torch.isfinite(grid)]
    mids = (grid[1:] + grid[:-1]) / 2  # exact in FP32: the ties, where round-half-to-even decides
    pts = torch.cat([grid, mids, torch.tensor([456.0, 463.9, 464.0, 1e-30, 2.0**-10, 2.0**-9 * 1.5])])
    near = torch.cat([torch.nextafter(pts, torch.full_like(pts, 1e9)), torch.nextafter(pts, torch.zeros_like(pts))])
    v = torch.cat([pts, near])
    v = v[v.abs() <= 464]
    _check(torch.cat([v, -v]))


def test_random_bit_patterns_both_signs():
    g = torch.Generator().manual_seed(0)
    hi = torch.tensor(464.0).view(torch.int32).item()
    bits = torch.randint(0, hi + 1, (1 << 22,), generator=g, dtype=torch.int32)
    v = bits.view(torch.float32)
    _check(torch.cat([v, -v]))


@pytest.mark.slow
def test_every_fp32_up_to_464():
    hi = torch.tensor(464.0).view(torch.int32).item()
    for start in range(0, hi + 1, 1 << 24):
        _check(torch.arange(start, min(start + (1 << 24), hi + 1), dtype=torch.int32).view(torch.float32))


def test_round_to_e4m3_refuses_what_it_cannot_do_in_place():
    with pytest.raises(ValueError, match="contiguous float32"):
        round_to_e4m3_(torch.ones(4, 4).t())
    with pytest.raises(ValueError, match="contiguous float32"):
        round_to_e4m3_(torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(70, 256), (9, 64), (0, 128), (4, 384), (33, 200), (5, 1)])
def test_grid_act_is_the_decoded_act_quant(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    if x.numel():
        x[0, : min(64, shape[1])] = 0  # an all-zero tile or stretch
    g, s = grid_act(x, 128, "x")
    q, sq = act_quant_ref(x)
    assert torch.equal(g, fp8_to_float(q)) and torch.equal(s, sq) and g.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(split_k(g, 128), _k_blocks(q, 128)))


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (64, 128), (80, 64), (3, 1)])
def test_grid_weight_is_the_decoded_weight_quant(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    g, s = grid_weight(w, 128, "w")
    q, sq = weight_quant_ref(w)
    assert torch.equal(g, fp8_to_float(q)) and torch.equal(s, sq)
    assert all(torch.equal(a, b) for a, b in zip(split_k(g.t(), 128), _k_blocks(q.t(), 128)))


def test_grid_refuses_nan_naming_the_tensor():
    x = torch.ones(4, 200)
    x[1, 150] = float("nan")
    with pytest.raises(ValueError, match="FP8Linear input"):
        grid_act(x, 128, "FP8Linear input")


@pytest.mark.parametrize("n,k,mp", [(64, 128, 256), (384, 128, 512), (80, 200, 128), (128, 64, 3072),
                                    (7, 300, 256), (130, 257, 384)])
def test_tile_products_fp32_is_the_fp8_route(n, k, mp):
    # dy and x quantised along tokens on their own, token-major, against the FP8 route's tokens-last stack
    t = torch.randn(n + k, mp, generator=torch.Generator().manual_seed(3))
    t *= torch.rand(1, mp, generator=torch.Generator().manual_seed(4))  # tokens of different sizes
    t[:, mp - 50:] = 0  # padded tokens
    tq, ts = act_quant_ref(t, 128)
    dy, x = t[:n].t().contiguous(), t[n:].t().contiguous()  # token-major, as FP8Linear holds them
    dv, ds = token_tiles(dy, 128, "dy")
    xv, xs = token_tiles(x.clone(), 128, "x", inplace=True)
    assert torch.equal(dy, t[:n].t())  # left as it was
    assert torch.equal(ds, ts[:n].t()) and torch.equal(xs, ts[n:].t())
    assert torch.equal(tile_products_fp32(dv, ds, xv, xs), tile_products(tq, ts, n, 128))


def test_recent_finds_only_the_same_unchanged_tensor():
    cache, calls = Recent(2), []

    def make(t):
        calls.append(1)
        return t.sum().item()

    a = torch.ones(4, 3)
    assert cache.get((a,), "k", lambda: make(a)) == 12 and cache.get((a.view(4, 3),), "k", lambda: make(a)) == 12
    assert len(calls) == 1  # a view with the same storage, layout and version: found
    assert cache.get((a,), "other", lambda: make(a)) == 12 and len(calls) == 2  # another key
    a.add_(1)  # an in-place change bumps the version: computed again
    assert cache.get((a,), "k", lambda: make(a)) == 24 and len(calls) == 3
    b = torch.ones(4, 3)  # same shape and values, other storage
    assert cache.get((b,), "k", lambda: make(b)) == 12 and len(calls) == 4
    assert cache.get((a.t(),), "k", lambda: make(a)) == 24 and len(calls) == 5  # other strides
    assert len(cache.entries) == 2  # bounded
    with torch.inference_mode():
        c = torch.ones(2)
    cache.get((c,), "k", lambda: make(c))
    cache.get((c,), "k", lambda: make(c))
    assert len(calls) == 7  # inference tensors carry no version: never cached


def test_shared_act_is_grid_act_and_computed_once():
    clear_caches()
    x = torch.randn(40, 200, generator=torch.Generator().manual_seed(5))
    g1, s1 = shared_act(x, 128, "x")
    g2, s2 = shared_act(x.view(40, 200), 128, "x")
    assert g1 is g2 and s1 is s2
    g, s = grid_act(x, 128, "x")
    assert torch.equal(g1, g) and torch.equal(s1, s)
    x.mul_(2)
    g3, _ = shared_act(x, 128, "x")
    assert g3 is not g1 and torch.equal(g3, grid_act(x, 128, "x")[0])
    clear_caches()


def test_subnormal_scales_take_the_cast():
    # a tile whose amax/448 is below FP32's normal range: x/s can pass 464, where only the cast saturates
    x = torch.linspace(1e-44, 9.4e-43, 600).view(3, 200)  # s a few subnormal steps: x/s reaches ~670
    g, s = grid_act(x, 128, "x")
    q, sq = act_quant_ref(x)
    want = fp8_to_float(q)
    assert torch.equal(s, sq) and torch.equal(g.nan_to_num(7.0), want.nan_to_num(7.0))
    w = torch.linspace(-9.4e-43, 9.4e-43, 130 * 64).view(130, 64)
    gw, sw = grid_weight(w, 128, "w")
    qw, _ = weight_quant_ref(w)
    assert torch.equal(gw.nan_to_num(7.0), fp8_to_float(qw).nan_to_num(7.0))
