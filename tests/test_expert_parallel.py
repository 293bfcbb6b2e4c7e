"""Expert parallelism (dsv3lib.parallel.expert): EP over 2 and 4 spawned gloo processes equals the
single-process MoE; node-limited routing and the all-to-all bytes it saves."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import make_moe, tiny

from dsv3lib.config import ModelConfig
from dsv3lib.parallel.expert import (
    alltoall_bytes_per_token,
    expected_groups_reached,
    groups_reached,
    node_limited_traffic,
)
from dsv3lib.parallel.checks import moe_vs_one_process
from dsv3lib.parallel.launch import launch

ATOL = 1e-5  # fp32; measured ≤ 1e-7 for outputs, ≤ 2e-6 for gradients (summation order differs)

CASES = [
    ({}, 5),  # tiny: 16 experts in 4 groups, ≤ 2 groups per token, 1 shared expert
    (dict(n_shared_experts=0, score_func="softmax", n_expert_groups=1, n_limited_groups=1), 1),  # few tokens
    (dict(n_shared_experts=2, n_routed_experts=32, n_expert_groups=8, n_limited_groups=2), 7),
    ({}, 4, True),  # every token goes to rank 0's experts: the other ranks receive no rows
]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_equals_single_process(world_size):
    *results, model = launch(moe_vs_one_process, world_size, (CASES, 0, True))  # one spawn (≈ 4 s start-up)
    assert len(results) == len(CASES)
    # the whole model, its MoE layers (main and MTP) sharded by shard_experts
    assert model["model_logits"] <= ATOL, model
    assert model["model_bias_mismatch"] == 0, model  # BiasBalancer(reduce_loads=True): one bias everywhere
    assert model["model_grads"] <= 2e-6 * model["model_grad_scale"], model  # grads up to ~10², fp32 sums
    for case, diffs in zip(CASES, results):
        for key in ["output", "input_grad", "expert_grads", "gate_grad"]:
            assert diffs[key] <= ATOL, (case, key, diffs)
        if case[0].get("n_shared_experts", 1):
            assert diffs["shared_grads"] <= ATOL, (case, diffs)
    assert results[0]["min_received"] > 0
    assert results[-1]["min_received"] == 0  # the empty-rank path really ran


# ------------------------------------------------------------------------- node-limited routing
def test_expected_groups_reached_formula():
    # exact by enumeration on a small case: 8 experts, 4 groups of 2, top-3
    from itertools import combinations

    sets = list(combinations(range(8), 3))
    mean = sum(len({e // 2 for e in s}) for s in sets) / len(sets)
    assert expected_groups_reached(8, 4, 3) == pytest.approx(mean)
    # restricted to 2 groups (4 experts): top-3 of 4 always hits both groups
    assert expected_groups_reached(8, 4, 3, limit=2) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="^topk"):
        expected_groups_reached(8, 4, 5, limit=2)


def test_v3_node_limited_bytes():
    cfg = ModelConfig.preset("deepseek-v3")
    t = node_limited_traffic(cfg)
    # 8 of 256 uniformly random experts over 8 nodes of 32: 8·(1 − C(224,8)/C(256,8)) ≈ 5.31 nodes
    assert t["nodes_unlimited"] == pytest.approx(8 * (1 - math.comb(224, 8) / math.comb(256, 8)))
    assert 5.2 < t["nodes_unlimited"] < 5.4 and 3.5 < t["nodes_limited"] <= t["nodes_limit"] == 4
    per_node = 7168 * 3  # FP8 dispatch (1 B) + BF16 combine (2 B)
    assert alltoall_bytes_per_token(cfg, 1) == per_node
    assert t["bytes_limit"] == 4 * per_node and t["bytes_all_nodes"] == 8 * per_node
    assert t["bytes_unlimited"] == pytest.approx(t["nodes_unlimited"] * per_node)


def test_measured_groups_reached_respects_the_limit():
    cfg = tiny()  # 4 groups, ≤ 2 per token, top-4
    free_cfg = tiny(n_limited_groups=4)
    x = torch.randn(512, cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        idx = make_moe(cfg).gate(x).indices
        idx_free = make_moe(free_cfg).gate(x).indices
    reached, reached_free = groups_reached(idx, cfg), groups_reached(idx_free, free_cfg)
    assert reached.shape == (512,) and reached.max() <= 2 and reached.min() >= 1
    assert reached_free.max() > 2
    assert reached.float().mean() < reached_free.float().mean()
    # against a per-token count
    assert reached.tolist() == [len({int(e) // cfg.experts_per_group for e in row}) for row in idx]


# ---------------------------------------------- expert computation paths (belongs with test_moe.py)
@pytest.mark.parametrize("overrides", [dict(), dict(n_shared_experts=0, score_func="softmax")],
                         ids=["tiny", "no-shared-softmax"])
def test_grouped_mm_path_equals_sorted_path(overrides):
    cfg = tiny(route_scale=2.5, **overrides)
    moe = make_moe(cfg)
    g = torch.Generator().manual_seed(12)
    x0, grad_out = torch.randn(3, 7, cfg.dim, generator=g), torch.randn(3, 7, cfg.dim, generator=g)
    results = []
    for grouped in (False, True):
        moe.grouped_mm = grouped
        moe.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        y = moe(x)
        (y * grad_out).sum().backward()
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in moe.named_parameters()}
        results.append((y, x.grad, grads))
    (y, gx, grads), (y2, gx2, grads2) = results
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=0)
    torch.testing.assert_close(gx2, gx, atol=1e-6, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
