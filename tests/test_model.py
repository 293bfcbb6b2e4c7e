"""Tests for the single-device reference DeepSeek-V3 (dsv3lib.model; chapter 0).

Every test seeds torch, runs in float32 on CPU, and uses random non-zero weights (the model's own init,
plus random gate correction biases so that the bias path is exercised). Oracles are simpler code written
here: a per-token MoE loop, a full forward for the cache, plain RoPE for YaRN, a manual MTP loss.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dsv3lib.config import ModelConfig
from dsv3lib.model import (MLA, Gate, KVCache, MoE, Transformer, apply_rotary_emb, mtp_loss,
                           precompute_freqs_cis, rope_frequencies)

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is as fast, and it avoids OpenMP spin-waiting (50×
    slow-downs measured) when other processes share the CPU cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------- helpers
def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **overrides)


def small(**overrides) -> ModelConfig:
    """A smaller variant of tiny: 2 layers (1 dense + 1 MoE), so model-level tests stay fast."""
    return tiny(**{"n_layers": 2, **overrides})


def randomise_gate_biases(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Random correction biases b (sigmoid scores are ≈ 0.5 ± 0.05 at init, so 0.05 changes choices)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=g) * scale)


def make_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    randomise_gate_biases(model, seed + 1)
    return model


def make_moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    """A standalone MoE; the gate weight is torch.empty in Gate, so initialise it here."""
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.1)  # u·e_i ~ N(0, 1.1²): a spread of sigmoid scores
    randomise_gate_biases(moe, seed + 1)
    return moe


def random_tokens(cfg: ModelConfig, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def group_of(indices: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return indices // cfg.experts_per_group


# ------------------------------------------------------------------------------------------ 1. shapes
@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_mtp_modules=0),
        dict(n_mtp_modules=1),
        dict(n_mtp_modules=2),
        dict(q_lora_rank=0),
        dict(n_dense_layers=0),
        dict(n_dense_layers=2),  # = n_layers: no MoE in the trunk (MTP block is still MoE)
        dict(n_dense_layers=2, n_mtp_modules=0),
    ],
    ids=["mtp0", "mtp1", "mtp2", "no-q-lora", "all-moe", "all-dense", "all-dense-no-mtp"],
)
def test_forward_shapes(overrides):
    cfg = small(**overrides)
    model = make_model(cfg)
    B, T = 2, 9
    with torch.no_grad():
        out = model(random_tokens(cfg, B, T))
    assert out.logits.shape == (B, T, cfg.vocab_size)
    assert out.logits.dtype == torch.float32
    assert len(out.mtp_logits) == cfg.n_mtp_modules
    for k, lg in enumerate(out.mtp_logits, start=1):
        assert lg.shape == (B, T - k, cfg.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(lg).all() for lg in out.mtp_logits)


def test_layer_kinds_follow_n_dense_layers():
    from dsv3lib.model import MLP

    for n_dense in (0, 1, 2):
        model = make_model(small(n_dense_layers=n_dense))
        kinds = [type(layer.ffn) for layer in model.layers]
        assert kinds == [MLP] * n_dense + [MoE] * (2 - n_dense)
        assert all(isinstance(m.block.ffn, MoE) for m in model.mtp)
    no_q = make_model(small(q_lora_rank=0))
    attn = no_q.layers[0].attn
    assert hasattr(attn, "wq") and not hasattr(attn, "wq_a")


def test_mtp_off_and_on_request():
    cfg = small(n_mtp_modules=2)
    model = make_model(cfg)
    tokens = random_tokens(cfg, 2, 8)
    with torch.no_grad():
        assert model(tokens, mtp=False).mtp_logits == []
        cache = model.new_cache(2, 8)
        assert model(tokens, cache=cache).mtp_logits == []  # default: no MTP when decoding
        full = model(tokens)
        forced = model(tokens, cache=model.new_cache(2, 8), mtp=True)
    for a, b in zip(full.mtp_logits, forced.mtp_logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- 2. causality
VARIANTS = dict(argnames="overrides", argvalues=[dict(), dict(q_lora_rank=0, n_dense_layers=0)],
                ids=["tiny", "variant"])


@pytest.mark.parametrize(**VARIANTS)
def test_causality(overrides):
    cfg = small(n_mtp_modules=2, **overrides)
    model = make_model(cfg)
    B, T = 2, 12
    tokens = random_tokens(cfg, B, T)
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 3, 7, 11):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.arange(B)) % cfg.vocab_size
            out = model(changed)
            # main logits: positions < t are untouched, position t sees the change
            torch.testing.assert_close(out.logits[:, :t], base.logits[:, :t], atol=1e-6, rtol=0)
            assert not torch.allclose(out.logits[:, t], base.logits[:, t], atol=1e-4)
            # MTP depth k at position i sees tokens ≤ i + k
            for k, (lg, lg0) in enumerate(zip(out.mtp_logits, base.mtp_logits, strict=True), start=1):
                first = max(t - k, 0)
                torch.testing.assert_close(lg[:, :first], lg0[:, :first], atol=1e-6, rtol=0)
                if t - k >= 0:  # position t-k reads token t through the embedding of token i+k
                    assert not torch.allclose(lg[:, t - k], lg0[:, t - k], atol=1e-4)


# -------------------------------------------------------------------------------- 3. cache equivalence
@pytest.mark.parametrize(**VARIANTS)
def test_cache_token_by_token_and_chunked(overrides):
    cfg = small(**overrides)
    model = make_model(cfg)
    B, T = 3, 10
    tokens = random_tokens(cfg, B, T)
    with torch.no_grad():
        full = model(tokens).logits  # (B, T, vocab)

        # prefill 4, then one token at a time
        cache = model.new_cache(B, 16)
        steps = [model(tokens[:, :4], start_pos=0, cache=cache).logits]
        for pos in range(4, T):
            steps.append(model(tokens[:, pos:pos + 1], start_pos=pos, cache=cache).logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)

        # chunked prefill 5 + 3 + 1 + 1
        cache = model.new_cache(B, T)
        chunks, pos = [], 0
        for n in (5, 3, 1, 1):
            chunks.append(model(tokens[:, pos:pos + n], start_pos=pos, cache=cache).logits)
            pos += n
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=ATOL, rtol=0)


def test_cache_rollback_overwrites():
    cfg = small()
    model = make_model(cfg)
    B = 2
    first = random_tokens(cfg, B, 10, seed=0)
    branch = random_tokens(cfg, B, 4, seed=7)  # replaces positions 6..9
    with torch.no_grad():
        cache = model.new_cache(B, 12)
        model(first, start_pos=0, cache=cache)  # writes positions 0..9
        rolled = model(branch, start_pos=6, cache=cache).logits  # roll back to 6 and re-decode
        # decode one more token after the rolled-back branch
        nxt = random_tokens(cfg, B, 1, seed=9)
        rolled_next = model(nxt, start_pos=10, cache=cache).logits

        fresh_tokens = torch.cat([first[:, :6], branch, nxt], dim=1)
        fresh = model(fresh_tokens).logits
    torch.testing.assert_close(rolled, fresh[:, 6:10], atol=ATOL, rtol=0)
    torch.testing.assert_close(rolled_next, fresh[:, 10:11], atol=ATOL, rtol=0)


def test_cache_batch_smaller_than_allocated():
    cfg = small()
    model = make_model(cfg)
    tokens = random_tokens(cfg, 2, 6)
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache(4, 8)  # room for 4 sequences, we use 2
        a = model(tokens[:, :5], cache=cache).logits
        b = model(tokens[:, 5:], start_pos=5, cache=cache).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ 4. routing
def reference_select(biased: torch.Tensor, cfg: ModelConfig) -> list[set[int]]:
    """Per-token loop: rank groups by the sum of their top (topk // limited) biased scores, keep the best
    n_limited_groups, then pick the top n_activated_experts inside them."""
    per_group = max(1, cfg.n_activated_experts // cfg.n_limited_groups)
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
        weights, indices = gate(x)
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


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_gate_without_normalisation(score_func):
    cfg = tiny(route_scale=2.5, score_func=score_func, norm_topk_prob=False)
    gate = make_moe(cfg).gate
    x = torch.randn(32, cfg.dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        weights, indices = gate(x)
        raw = gate.scores(x).gather(1, indices)
    torch.testing.assert_close(weights, raw * 2.5, atol=1e-6, rtol=0)


def test_gate_no_groups():
    cfg = tiny(n_expert_groups=1, n_limited_groups=1, route_scale=2.5)
    gate = make_moe(cfg).gate
    x = torch.randn(32, cfg.dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, indices = gate(x)
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
        _, before = gate(x)
        assert not (before == j).any(dim=1).all()  # j is not everyone's choice without the bias
        gate.bias[j] = 10.0
        weights, indices = gate(x)
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


def test_last_counts():
    cfg = tiny()
    moe = make_moe(cfg)
    x = torch.randn(3, 7, cfg.dim, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        moe(x)
        counts = moe.gate.last_counts.clone()
        _, indices = moe.gate(x.reshape(-1, cfg.dim))
    N = 3 * 7
    assert counts.shape == (cfg.n_routed_experts,)
    assert counts.sum().item() == N * cfg.n_activated_experts
    assert torch.equal(counts, torch.bincount(indices.flatten(), minlength=cfg.n_routed_experts))


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
    weights, indices = moe.gate(flat)
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


# ---------------------------------------------------------------------------------------------- 6. RoPE
def test_rope_preserves_pair_norms():
    cfg = tiny()
    freqs_cis = precompute_freqs_cis(cfg)
    assert freqs_cis.shape == (cfg.max_seq_len, cfg.qk_rope_head_dim // 2) and freqs_cis.is_complex()
    x = torch.randn(2, 7, 3, cfg.qk_rope_head_dim, generator=torch.Generator().manual_seed(0))
    y = apply_rotary_emb(x, freqs_cis[10:17])
    assert y.shape == x.shape and y.dtype == x.dtype
    pair_norm = lambda t: t.view(*t.shape[:-1], -1, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), atol=1e-6, rtol=1e-6)
    # position 0 is the identity
    torch.testing.assert_close(apply_rotary_emb(x[:, :1], freqs_cis[:1]), x[:, :1], atol=0, rtol=0)


def test_rope_relative_position():
    cfg = tiny()
    freqs_cis = precompute_freqs_cis(cfg)
    theta = rope_frequencies(cfg).double()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, cfg.qk_rope_head_dim, generator=g)
    k = torch.randn(1, 1, 1, cfg.qk_rope_head_dim, generator=g)

    def score(m: int, n: int) -> float:
        qm = apply_rotary_emb(q, freqs_cis[m:m + 1])
        kn = apply_rotary_emb(k, freqs_cis[n:n + 1])
        return float((qm * kn).sum())

    # complex-pair form: q·k after rotation = Re Σ_j q_j conj(k_j) e^{i (m-n) θ_j}
    qc = torch.view_as_complex(q.double().view(-1, 2))
    kc = torch.view_as_complex(k.double().view(-1, 2))

    def complex_score(delta: int) -> float:
        return float((qc * kc.conj() * torch.polar(torch.ones_like(theta), delta * theta)).sum().real)

    for delta in (0, 3, -5, 17):
        values = [score(n + delta, n) for n in (0, 5, 40, 100) if n + delta >= 0]
        assert max(values) - min(values) < 1e-4, (delta, values)
        assert values[0] == pytest.approx(complex_score(delta), abs=1e-4)
    assert abs(score(3, 0) - score(0, 0)) > 1e-3  # and it does depend on the offset


def test_rope_pairs_adjacent_dims():
    cfg = tiny()
    freqs_cis = precompute_freqs_cis(cfg)
    theta = rope_frequencies(cfg)
    D, pos = cfg.qk_rope_head_dim, 5
    for pair in (0, 1, D // 2 - 1):
        x = torch.zeros(1, 1, 1, D)
        x[..., 2 * pair] = 1.0  # the real part of complex pair `pair`
        y = apply_rotary_emb(x, freqs_cis[pos:pos + 1]).flatten()
        angle = pos * float(theta[pair])
        expect = torch.zeros(D)
        expect[2 * pair], expect[2 * pair + 1] = math.cos(angle), math.sin(angle)  # partner is the next dim
        torch.testing.assert_close(y, expect, atol=1e-6, rtol=0)
    # plain RoPE frequencies θ_i = base^(-2i/D)
    plain = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    torch.testing.assert_close(theta.double(), plain, atol=0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- 7. YaRN
def plain_freqs(cfg: ModelConfig) -> torch.Tensor:
    D = cfg.qk_rope_head_dim
    return 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


def check_yarn(cfg: ModelConfig) -> None:
    assert cfg.yarn_active
    plain = plain_freqs(cfg)
    freqs = rope_frequencies(cfg).double()
    assert freqs.shape == plain.shape
    ratio = freqs / plain  # 1 = kept, 1/s = interpolated
    # rotations of each pair over the original context
    rotations = cfg.original_seq_len * plain / (2 * math.pi)
    fast, slow = rotations > cfg.beta_fast, rotations < cfg.beta_slow
    assert slow.any()
    torch.testing.assert_close(ratio[fast], torch.ones(int(fast.sum()), dtype=torch.float64),
                               atol=0, rtol=1e-6)
    torch.testing.assert_close(ratio[slow], torch.full((int(slow.sum()),), 1 / cfg.rope_factor,
                                                       dtype=torch.float64), atol=0, rtol=1e-6)
    # the highest-frequency pair is kept, the lowest divided by s
    assert ratio[0] == pytest.approx(1.0, rel=1e-6)
    assert ratio[-1] == pytest.approx(1 / cfg.rope_factor, rel=1e-6)
    # monotone (non-increasing) ramp in between, with values strictly between 1/s and 1 there
    assert (ratio[1:] <= ratio[:-1] + 1e-7).all()
    mid = (ratio < 1 - 1e-6) & (ratio > 1 / cfg.rope_factor + 1e-6)
    assert mid.any()
    # the ramp is linear in the pair index between the correction dims (YaRN's γ): pair i rotates
    # r times over L when i = D·ln(L / (2π r)) / (2 ln base); floor/ceil and clamps as the official code
    D = cfg.qk_rope_head_dim

    def pair_index(r: float) -> float:
        return D * math.log(cfg.original_seq_len / (2 * math.pi * r)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(pair_index(cfg.beta_fast)), 0)
    high = min(math.ceil(pair_index(cfg.beta_slow)), D - 1)
    gamma = ((torch.arange(D // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    expect = 1 - gamma + gamma / cfg.rope_factor
    torch.testing.assert_close(ratio, expect, atol=1e-6, rtol=0)


def test_yarn_small_config():
    cfg = tiny(original_seq_len=64, max_seq_len=256, rope_factor=4.0, beta_fast=32, beta_slow=1,
               qk_rope_head_dim=32)
    check_yarn(cfg)
    freqs = rope_frequencies(cfg).double()
    assert freqs[0] == pytest.approx(1.0)
    # the table the model uses is built from these frequencies
    fc = precompute_freqs_cis(cfg)
    torch.testing.assert_close(torch.angle(fc[1]).double(), freqs, atol=1e-6, rtol=0)
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5 * (0.1 * math.log(4.0) + 1) ** 2)


def test_yarn_deepseek_v3_preset():
    cfg = ModelConfig.preset("deepseek-v3")  # arithmetic only, never instantiated
    assert cfg.qk_rope_head_dim == 64
    check_yarn(cfg)
    ratio = rope_frequencies(cfg).double() / plain_freqs(cfg)
    # with base 1e4, L=4096: pairs 0..10 rotate ≥ 32 times (kept), pairs 23..31 < once (÷40)
    assert torch.allclose(ratio[:11], torch.ones(11, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.allclose(ratio[23:], torch.full((9,), 1 / 40, dtype=torch.float64), rtol=1e-6, atol=0)
    assert cfg.softmax_scale == pytest.approx(0.13523, abs=1e-5)
    assert cfg.yarn_mscale == pytest.approx(0.1 * math.log(40) + 1)


@pytest.mark.parametrize("max_seq_len", [64, 32])
def test_yarn_inactive_within_original_context(max_seq_len):
    cfg = tiny(original_seq_len=64, max_seq_len=max_seq_len, rope_factor=4.0, qk_rope_head_dim=32)
    assert not cfg.yarn_active
    torch.testing.assert_close(rope_frequencies(cfg).double(), plain_freqs(cfg), atol=0, rtol=1e-6)
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5)


# --------------------------------------------------------------------------------------- 8. MLA internals
def test_mla_cache_contents():
    cfg = small(n_heads=4)
    model = make_model(cfg)
    B, T, L = 2, 6, 8
    tokens = random_tokens(cfg, B, T)
    seen = []
    hook = model.layers[0].attn.kv_norm.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        cache = model.new_cache(B, L)
        model(tokens, cache=cache)
    hook.remove()
    assert len(cache) == cfg.n_layers and all(isinstance(c, KVCache) for c in cache)
    for c in cache:
        assert c.k.shape == (B, L, cfg.n_heads, cfg.qk_head_dim)
        assert c.v.shape == (B, L, cfg.n_heads, cfg.v_head_dim)
        assert c.nbytes == 4 * B * L * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        k_pe = c.k[:, :T, :, cfg.qk_nope_head_dim:]
        assert torch.equal(k_pe, k_pe[:, :, :1].expand_as(k_pe))  # one RoPE key shared by every head
        assert not torch.equal(c.k[:, :T, 0, :cfg.qk_nope_head_dim], c.k[:, :T, 1, :cfg.qk_nope_head_dim])
        assert torch.count_nonzero(c.k[:, T:]) == 0 and torch.count_nonzero(c.v[:, T:]) == 0
    # kv_norm saw only the latent, never the RoPE part
    assert seen == [torch.Size([B, T, cfg.kv_lora_rank])]

    # the cached k_pe is RoPE(wkv_a(x)[..., kv_lora_rank:]) with no norm in between
    layer = model.layers[0]
    with torch.no_grad():
        x = layer.attn_norm(model.embed(tokens))
        raw_pe = layer.attn.wkv_a(x)[..., cfg.kv_lora_rank:]
        expect = apply_rotary_emb(raw_pe.unsqueeze(2), model.freqs_cis[:T])
    torch.testing.assert_close(cache[0].k[:, :T, :1, cfg.qk_nope_head_dim:], expect, atol=1e-6, rtol=0)


def test_kv_norm_scales_latent_only():
    cfg = small()
    torch.manual_seed(0)
    mla = MLA(cfg)
    x = torch.randn(2, 5, cfg.dim, generator=torch.Generator().manual_seed(1))
    freqs_cis = precompute_freqs_cis(cfg)[:5]
    with torch.no_grad():
        c1 = KVCache.empty(cfg, 2, 5)
        mla(x, 0, freqs_cis, c1)
        mla.kv_norm.weight.mul_(3.0)
        c2 = KVCache.empty(cfg, 2, 5)
        mla(x, 0, freqs_cis, c2)
    nope = cfg.qk_nope_head_dim
    assert torch.equal(c1.k[..., nope:], c2.k[..., nope:])  # RoPE key: untouched by kv_norm
    torch.testing.assert_close(c2.k[..., :nope], 3 * c1.k[..., :nope], atol=1e-5, rtol=1e-5)  # latent path
    torch.testing.assert_close(c2.v, 3 * c1.v, atol=1e-5, rtol=1e-5)


def test_mla_query_variants_match_their_projection():
    cfg = small(q_lora_rank=0)
    torch.manual_seed(0)
    mla = MLA(cfg)
    x = torch.randn(1, 3, cfg.dim)
    with torch.no_grad():
        q = mla.project_q(x)
    assert q.shape == (1, 3, cfg.n_heads, cfg.qk_head_dim)
    torch.testing.assert_close(q.flatten(2), x @ mla.wq.weight.T, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ 9. bad input
@pytest.fixture(scope="module")
def bad_input_model():
    return make_model(small(max_seq_len=16))


@pytest.mark.parametrize("bad", [-1, -7, 256, 1000])
def test_out_of_vocab_tokens(bad_input_model, bad):
    tokens = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match="tokens") as info:
        bad_input_model(tokens)
    assert str(bad) in str(info.value)


def test_too_long_sequence(bad_input_model):
    with pytest.raises(ValueError, match="max_seq_len"):
        bad_input_model(torch.zeros(1, 17, dtype=torch.long))
    bad_input_model(torch.zeros(1, 16, dtype=torch.long))  # exactly max_seq_len is fine
    cache = bad_input_model.new_cache(1, 16)
    bad_input_model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        bad_input_model(torch.zeros(1, 7, dtype=torch.long), start_pos=10, cache=cache)


def test_start_pos_without_cache(bad_input_model):
    with pytest.raises(ValueError, match="start_pos|cache"):
        bad_input_model(torch.zeros(1, 3, dtype=torch.long), start_pos=2, mtp=False)
    with pytest.raises(ValueError):
        bad_input_model(torch.zeros(1, 3, dtype=torch.long), start_pos=2)


def test_mtp_with_start_pos_rejected(bad_input_model):
    cache = bad_input_model.new_cache(1, 8)
    bad_input_model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="mtp"):
        bad_input_model(torch.zeros(1, 2, dtype=torch.long), start_pos=2, cache=cache, mtp=True)


def test_empty_sequence(bad_input_model):
    tokens = torch.zeros(2, 0, dtype=torch.long)
    try:
        out = bad_input_model(tokens)
    except ValueError as e:  # a named rejection is fine ...
        assert "tokens" in str(e)
    else:  # ... and so are empty logits
        assert out.logits.shape == (2, 0, bad_input_model.cfg.vocab_size)


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3), ()])
def test_wrong_rank_tokens(bad_input_model, shape):
    with pytest.raises(ValueError, match="tokens"):
        bad_input_model(torch.zeros(shape, dtype=torch.long))


def test_float_tokens_rejected(bad_input_model):
    with pytest.raises(ValueError, match="tokens"):
        bad_input_model(torch.zeros(1, 3))


@pytest.mark.parametrize("max_len", [0, -1, 17])
def test_cache_length_out_of_range(bad_input_model, max_len):
    with pytest.raises(ValueError, match="max_len"):
        bad_input_model.new_cache(1, max_len)


def test_cache_overflow_and_batch(bad_input_model):
    cache = bad_input_model.new_cache(1, 4)
    with pytest.raises(ValueError):
        bad_input_model(torch.zeros(1, 5, dtype=torch.long), cache=cache)  # longer than the cache
    with pytest.raises(ValueError, match="batch"):
        bad_input_model(torch.zeros(2, 2, dtype=torch.long), cache=cache)  # more rows than the cache


# ------------------------------------------------------------------------------------------ 10. mtp_loss
def test_mtp_loss_matches_manual():
    cfg = small(n_mtp_modules=2)
    model = make_model(cfg)
    seq = random_tokens(cfg, 2, 11)
    tokens, labels = seq[:, :-1], seq[:, 1:]
    out = model(tokens)
    lam = 0.3
    total, main, depth = mtp_loss(out, labels, mtp_lambda=lam)
    V = cfg.vocab_size
    m = F.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1))
    # depth k at position i predicts token i+k+1 = labels[:, i+k]
    d = []
    for k, lg in enumerate(out.mtp_logits, start=1):
        T_k = lg.size(1)
        logp = lg.log_softmax(-1)
        nll = -sum(logp[b, i, seq[b, i + k + 1]] for b in range(2) for i in range(T_k)) / (2 * T_k)
        d.append(nll)
    torch.testing.assert_close(main, m, atol=1e-6, rtol=0)
    assert len(depth) == 2
    for got, want in zip(depth, d):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(total, m + lam * (d[0] + d[1]) / 2, atol=1e-5, rtol=0)


def test_mtp_loss_ignore_index():
    cfg = small(n_mtp_modules=1)
    model = make_model(cfg)
    seq = random_tokens(cfg, 2, 9)
    tokens, labels = seq[:, :-1], seq[:, 1:].clone()
    labels[0, -3:] = -100
    with torch.no_grad():
        out = model(tokens)
        _, main, depth = mtp_loss(out, labels)
    keep = labels != -100
    m = F.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(main, m, atol=1e-6, rtol=0)
    keep1 = labels[:, 1:] != -100
    torch.testing.assert_close(depth[0], F.cross_entropy(out.mtp_logits[0][keep1], labels[:, 1:][keep1]),
                               atol=1e-6, rtol=0)


def test_mtp_loss_without_modules_is_main():
    cfg = small(n_mtp_modules=0)
    model = make_model(cfg)
    seq = random_tokens(cfg, 2, 9)
    out = model(seq[:, :-1])
    total, main, depth = mtp_loss(out, seq[:, 1:])
    assert depth == []
    assert torch.equal(total, main)


def test_mtp_loss_backpropagates_to_mtp_and_shared_params():
    cfg = small(n_mtp_modules=1)
    model = make_model(cfg)
    seq = random_tokens(cfg, 2, 9)
    out = model(seq[:, :-1])
    total, main, depth = mtp_loss(out, seq[:, 1:], mtp_lambda=0.3)

    # the main loss alone never reaches the MTP module
    main.backward(retain_graph=True)
    assert all(p.grad is None for p in model.mtp.parameters())
    model.zero_grad(set_to_none=True)

    # the MTP term alone reaches the MTP module and the shared embedding and head
    (0.3 * depth[0]).backward(retain_graph=True)
    mtp = model.mtp[0]
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight",
                 "block.attn.wkv_a.weight", "block.ffn.gate.weight"):
        grad = mtp.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.embed.weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0
    assert model.layers[0].attn.wkv_a.weight.grad.abs().sum() > 0  # and through h^0 into the trunk
    mtp_only = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # the total's gradient is the sum of the two
    main.backward(retain_graph=True)
    main_only = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total.backward()
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        expect = main_only.get(n, 0) + mtp_only.get(n, 0)
        torch.testing.assert_close(p.grad, expect + torch.zeros_like(p.grad), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ 11. overfit
def test_overfit_one_batch():
    cfg = tiny()  # the tiny preset itself, MTP included (~20 steps, ~3 s on one core)
    model = make_model(cfg)
    model.train()
    seq = random_tokens(cfg, 2, 33, seed=42)
    tokens, labels = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(150):
        total, main, depth = mtp_loss(model(tokens), labels)
        if first is None:
            first = (main.item(), depth[0].item())
        if main.item() < 0.5:
            break
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    uniform = math.log(cfg.vocab_size)
    assert abs(first[0] - uniform) < 0.5 and abs(first[1] - uniform) < 0.5  # started near uniform
    assert main.item() < 0.5, f"main loss {main.item():.3f} after {step + 1} steps"
    assert depth[0].item() < 0.5 * first[1]  # the MTP head learned the batch too


def test_casting_keeps_rope_table_and_gate_bias():
    """model.to(bf16) must not drop RoPE's imaginary part nor round the balancing bias."""
    torch.manual_seed(0)
    model = Transformer(small())
    x = torch.randint(0, model.cfg.vocab_size, (1, 24))
    ref = model(x, mtp=False).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "discards the imaginary part" warning either
        model = model.to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.complex64 and model.embed.weight.dtype == torch.bfloat16
    assert all(layer.ffn.gate.bias.dtype == torch.float32 for layer in model.layers[model.cfg.n_dense_layers:])
    got = model(x, mtp=False).logits.float()
    assert (got - ref).norm() / ref.norm() < 0.05
