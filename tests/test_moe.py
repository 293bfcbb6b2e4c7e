"""DeepSeekMoE routing and dispatch (dsv3lib.model.moe): group-limited top-k, the correction bias,
sorted dispatch against a per-token loop."""

from __future__ import annotations

import pytest
import torch
from model_helpers import ATOL, group_of, make_moe, small, tiny

from dsv3lib.config import ModelConfig
from dsv3lib.model import (
    Gate,
    MoE,
    Routing,
    Transformer,
)
from dsv3lib.model.moe import combine, sort_by_expert


# ------------------------------------------------------------------------------------------ 4. routing
def reference_select(biased: torch.Tensor, cfg: ModelConfig) -> list[set[int]]:
    """Per-token loop: rank groups by the sum of their top-2 biased scores (the released rule; the paper's
    top (topk // limited) under group_score="paper"), keep the best n_limited_groups, then pick the top
    n_activated_experts inside them."""
    per_group = 2 if cfg.group_score == "top2" else max(1, cfg.n_activated_experts // cfg.n_limited_groups)
    E = cfg.experts_per_group
    chosen = []
    for row in biased.tolist():
        groups = [row[g * E:(g + 1) * E] for g in range(cfg.n_expert_groups)]
        gscore = [sum(sorted(g, reverse=True)[:per_group]) for g in groups]
        keep = sorted(range(cfg.n_expert_groups), key=lambda g: -gscore[g])[:cfg.n_limited_groups]
        cand = [(row[i], i) for g in keep for i in range(g * E, (g + 1) * E)]
        chosen.append({i for _, i in sorted(cand, reverse=True)[:cfg.n_activated_experts]})
    return chosen


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_gate_group_limit_and_weights(score_func):
    cfg = tiny(route_scale=2.5, score_func=score_func)  # 16 experts, 4 groups of 4, ≤ 2 groups, top-4
    gate = make_moe(cfg).gate
    assert isinstance(gate, Gate)
    N = 64
    x = torch.randn(N, cfg.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        weights, indices, *_ = gate(x)
        scores = gate.scores(x)
    assert weights.shape == indices.shape == (N, cfg.n_activated_experts)
    assert indices.dtype == torch.long

    # each token's experts are distinct and lie in at most n_limited_groups groups
    for row in indices:
        assert len(set(row.tolist())) == cfg.n_activated_experts
        assert len(set(group_of(row, cfg).tolist())) <= cfg.n_limited_groups
    # and they are the ones the group-limited rule picks
    ref = reference_select(scores + gate.bias, cfg)
    assert [set(r.tolist()) for r in indices] == ref

    # scores: sigmoid of u·e, or softmax over all experts
    logits = x @ gate.weight.T
    expect_scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    torch.testing.assert_close(scores, expect_scores, atol=1e-6, rtol=0)

    # weights: raw scores of the chosen experts, normalised, times route_scale
    torch.testing.assert_close(weights.sum(-1), torch.full((N,), 2.5), atol=1e-5, rtol=0)
    raw = scores.gather(1, indices)
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True) * 2.5, atol=1e-6, rtol=0)


@pytest.mark.parametrize("group_score", ["top2", "paper"])
def test_group_rules_differ_when_kr_over_m_is_not_2(group_score):
    cfg = tiny(n_activated_experts=6, group_score=group_score)  # 4 groups of 4, ≤ 2 groups: K_r/M = 3
    gate = make_moe(cfg).gate
    x = torch.randn(256, cfg.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        indices = gate(x).indices
        biased = gate.scores(x) + gate.bias
    assert [set(r.tolist()) for r in indices] == reference_select(biased, cfg)
    other = cfg.replace(group_score="paper" if group_score == "top2" else "top2")
    assert [set(r.tolist()) for r in indices] != reference_select(biased, other)  # some token differs


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_gate_without_normalisation(score_func):
    cfg = tiny(route_scale=2.5, score_func=score_func, norm_topk_prob=False)
    gate = make_moe(cfg).gate
    x = torch.randn(32, cfg.dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        weights, indices, *_ = gate(x)
        raw = gate.scores(x).gather(1, indices)
    torch.testing.assert_close(weights, raw * 2.5, atol=1e-6, rtol=0)


def test_gate_no_groups():
    cfg = tiny(n_expert_groups=1, n_limited_groups=1, route_scale=2.5)
    gate = make_moe(cfg).gate
    x = torch.randn(32, cfg.dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        indices = gate(x).indices
        biased = gate.scores(x) + gate.bias
    expect = biased.topk(cfg.n_activated_experts, dim=-1).indices
    assert [set(r.tolist()) for r in indices] == [set(r.tolist()) for r in expect]


def test_bias_changes_choice_not_weight():
    cfg = tiny(route_scale=2.5)
    gate = make_moe(cfg).gate
    N, j = 48, 11
    x = torch.randn(N, cfg.dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        gate.bias.zero_()
        before = gate(x).indices
        assert not (before == j).any(dim=1).all()  # j is not everyone's choice without the bias
        gate.bias[j] = 10.0
        weights, indices, *_ = gate(x)
        s = gate.scores(x)  # raw affinities, bias-free
    assert (indices == j).any(dim=1).all()  # the bias makes every token pick j
    col = (indices == j).float().argmax(dim=1)
    w_j = weights.gather(1, col[:, None]).squeeze(1)
    chosen = s.gather(1, indices)
    expect = torch.sigmoid(x @ gate.weight[j]) / chosen.sum(-1) * 2.5
    torch.testing.assert_close(w_j, expect, atol=1e-6, rtol=0)


def test_bias_is_buffer_without_grad():
    cfg = tiny(route_scale=2.5)
    moe = make_moe(cfg)
    gate = moe.gate
    assert "bias" in dict(gate.named_buffers())
    assert "bias" not in dict(gate.named_parameters())
    assert not gate.bias.requires_grad
    assert "gate.bias" in moe.state_dict()  # persistent: saved with the model
    x = torch.randn(2, 5, cfg.dim, generator=torch.Generator().manual_seed(7))
    moe(x).square().sum().backward()
    assert gate.bias.grad is None
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_gate_returns_its_routing_to_the_caller_and_its_hooks():
    cfg = tiny()
    moe = make_moe(cfg)
    x = torch.randn(3, 7, cfg.dim, generator=torch.Generator().manual_seed(8))
    seen = []
    handle = moe.gate.register_forward_hook(lambda gate, args, routing: seen.append(routing))
    moe(x)
    handle.remove()
    moe(x)
    (r,) = seen  # one forward with the hook on
    N, E, K = 3 * 7, cfg.n_routed_experts, cfg.n_activated_experts
    assert isinstance(r, Routing) and r.token_shape == (3, 7)
    assert r.weights.shape == r.indices.shape == (N, K) and r.scores.shape == (N, E)
    assert r.scores.dtype == torch.float32 and r.scores.requires_grad  # the aux losses train through it
    flat = moe.gate(x.reshape(-1, cfg.dim))  # the same tokens, flat: the same routing, token_shape (N,)
    assert flat.token_shape == (N,)
    assert torch.equal(flat.indices, r.indices) and torch.equal(flat.weights, r.weights)
    assert torch.equal(flat.scores, r.scores)
    assert not any(n.startswith("last_") for n in vars(moe.gate))  # the gate keeps nothing from a forward


def test_sort_by_expert_and_combine():
    g = torch.Generator().manual_seed(9)
    N, K, E, D = 7, 3, 5, 4
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])  # (N, K)
    weights = torch.rand(N, K, generator=g)
    x = torch.randn(N, D, generator=g)
    order, token_of, counts = sort_by_expert(indices, E)
    assert counts.tolist() == [int((indices == e).sum()) for e in range(E)]
    # sorted slots: by expert, tokens ascending within an expert
    pairs = [(int(indices.flatten()[o]), int(t)) for o, t in zip(order, token_of)]
    assert pairs == sorted((int(indices[n, k]), n) for n in range(N) for k in range(K))
    # each "expert" e scales its rows by (e + 1); combine adds them per token, weighted
    out = x[token_of] * (indices.flatten()[order] + 1).unsqueeze(-1).float()
    expect = torch.stack([sum(weights[n, k] * (indices[n, k] + 1) * x[n] for k in range(K)) for n in range(N)])
    torch.testing.assert_close(combine(out, weights, order, token_of), expect)


def test_standalone_gate_weight_is_initialised():
    # In deterministic mode torch.empty fills floats with NaN, which makes uninitialised memory visible.
    old_mode = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        torch.manual_seed(0)
        moe = MoE(tiny())
    finally:
        torch.use_deterministic_algorithms(old_mode)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
    for name, p in moe.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is uninitialised"


def test_model_gate_biases_are_zero_at_init_and_not_parameters():
    torch.manual_seed(0)
    model = Transformer(small())
    biases = {n: b for n, b in model.named_buffers() if n.endswith("gate.bias")}
    assert len(biases) == 2  # one MoE layer + the MTP block
    assert all(torch.count_nonzero(b) == 0 for b in biases.values())
    assert not any(n.endswith("gate.bias") for n, _ in model.named_parameters())


# ------------------------------------------------------------------------ 5. sorted dispatch vs loop
def loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """For each token: Σ_j w_j · expert_j(x) + shared(x)."""
    flat = x.reshape(-1, x.size(-1))
    weights, indices, *_ = moe.gate(flat)
    rows = []
    for n in range(flat.size(0)):
        y = moe.shared_experts(flat[n]) if moe.shared_experts is not None else torch.zeros_like(flat[n])
        for j in range(indices.size(1)):
            y = y + weights[n, j] * moe.experts[int(indices[n, j])](flat[n])
        rows.append(y)
    return torch.stack(rows).view(x.shape)


def _grads(moe: MoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"x": x.grad.clone()}
    for name, p in moe.named_parameters():
        out[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return out


@pytest.mark.parametrize(
    "overrides,shape",
    [(dict(), (2, 9)), (dict(n_shared_experts=0), (1, 3)),
     (dict(n_shared_experts=2, score_func="softmax"), (3, 4))],
    ids=["tiny", "no-shared-few-tokens", "two-shared-softmax"],
)
def test_sorted_dispatch_matches_loop(overrides, shape):
    cfg = tiny(route_scale=2.5, **overrides)
    moe = make_moe(cfg)
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(*shape, cfg.dim, generator=g)
    grad_out = torch.randn(*shape, cfg.dim, generator=g)

    x = x0.clone().requires_grad_(True)
    y = moe(x)
    (y * grad_out).sum().backward()
    fast = _grads(moe, x)
    moe.zero_grad(set_to_none=True)

    xr = x0.clone().requires_grad_(True)
    yr = loop_reference(moe, xr)
    (yr * grad_out).sum().backward()
    xr_grad = xr.grad
    x.grad = xr_grad
    ref = _grads(moe, x)

    assert y.shape == x0.shape
    torch.testing.assert_close(y, yr, atol=ATOL, rtol=0)
    assert fast.keys() == ref.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], atol=ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # the routed experts' weights really were exercised
    used = [e for e in range(cfg.n_routed_experts) if fast[f"experts.{e}.w1.weight"].abs().sum() > 0]
    assert len(used) >= cfg.n_activated_experts
    assert fast["gate.weight"].abs().sum() > 0
