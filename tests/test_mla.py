"""MLA internals (dsv3lib.model.mla): cache contents, the shared RoPE key, kv_norm, query paths."""

from __future__ import annotations

import torch
from model_helpers import make_model, random_tokens, small

from dsv3lib.model import (
    MLA,
    KVCache,
    apply_rotary_emb,
    precompute_freqs_cis,
)


# --------------------------------------------------------------------------------------- 8. MLA internals
def test_mla_cache_contents():
    cfg = small(n_heads=4, attn_impl="naive")
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
