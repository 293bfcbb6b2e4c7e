"""RoPE in the interleaved complex-pair form, and YaRN (dsv3lib.model.rope)."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import tiny

from dsv3lib.config import ModelConfig
from dsv3lib.model import (
    apply_rotary_emb,
    precompute_freqs_cis,
    rope_frequencies,
)


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


def test_rotary_accepts_non_contiguous_views():
    from dsv3lib.model.rope import apply_rotary_emb

    x = torch.randn(2, 4, 5, 8)  # (B, H, T, rope_dim), then viewed as (B, T, H, rope_dim)
    freqs = torch.polar(torch.ones(5, 4), torch.randn(5, 4))
    view = x.transpose(1, 2)
    assert not view.is_contiguous()
    assert torch.equal(apply_rotary_emb(view, freqs), apply_rotary_emb(view.contiguous(), freqs))
