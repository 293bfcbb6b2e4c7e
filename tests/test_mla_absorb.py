"""Absorbed MLA and the latent cache (dsv3lib.model.mla; chapter 2): equality with the naive form over
the same weights, cache bytes, which cache a model builds, and YaRN past the original context."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import make_model, random_tokens, small

from dsv3lib.accounting import kv_cache_bytes_per_token
from dsv3lib.config import ModelConfig
from dsv3lib.generate import generate
from dsv3lib.model import MLA, KVCache, Transformer, precompute_freqs_cis, rope_frequencies
from dsv3lib.model.mla import LatentCache, new_layer_cache
from dsv3lib.published import PUBLISHED, gqa_kv_bytes_per_token

TOL = dict(atol=2e-5, rtol=1e-5)  # fp32: the two forms sum the same products in different orders


def random_mla(cfg: ModelConfig, seed: int = 0) -> MLA:
    """An MLA with weights large enough that attention is far from uniform (a weak test otherwise)."""
    torch.manual_seed(seed)
    mla = MLA(cfg)
    with torch.no_grad():
        for p in mla.parameters():
            if p.dim() == 2:
                p.normal_(std=2.0 / math.sqrt(p.size(1)))
            else:
                p.uniform_(0.5, 1.5)
    return mla


def pair(cfg: ModelConfig, seed: int = 0) -> tuple[Transformer, Transformer]:
    """The same weights as a naive-cache and an absorbed-cache model."""
    naive = make_model(cfg.replace(attn_impl="naive"), seed)
    absorb = make_model(cfg.replace(attn_impl="absorb"), seed)
    absorb.load_state_dict(naive.state_dict())
    return naive, absorb


MLA_VARIANTS = dict(argnames="overrides", argvalues=[dict(), dict(q_lora_rank=0, n_heads=3, kv_lora_rank=48)],
                    ids=["tiny", "no-q-lora"])


# ------------------------------------------------------------------------------ 1. one layer, both forms
@pytest.mark.parametrize(**MLA_VARIANTS)
def test_absorbed_equals_naive_without_cache(overrides):
    cfg = small(**overrides)
    mla = random_mla(cfg)
    x = torch.randn(3, 11, cfg.dim, generator=torch.Generator().manual_seed(1))
    freqs_cis = precompute_freqs_cis(cfg)[:11]
    with torch.no_grad():
        naive = mla.naive(x, 0, freqs_cis)
        absorbed = mla.absorbed(x, 0, freqs_cis)
        one = mla.absorbed(x[:, :1], 0, freqs_cis[:1])  # a single token: the decode path
        default = mla(x, 0, freqs_cis)  # no cache: forward expands (naive), as training does
    assert naive.abs().mean() > 0.1
    torch.testing.assert_close(absorbed, naive, **TOL)
    torch.testing.assert_close(one, naive[:, :1], **TOL)
    assert torch.equal(default, naive)


@pytest.mark.parametrize(**MLA_VARIANTS)
def test_absorbed_equals_naive_with_caches(overrides):
    """Prefill 5, then single tokens, then a chunk of 3; batch 2 in caches allocated for 3."""
    cfg = small(**overrides)
    mla = random_mla(cfg, seed=3)
    B, T = 2, 12
    x = torch.randn(B, T, cfg.dim, generator=torch.Generator().manual_seed(4))
    freqs = precompute_freqs_cis(cfg)
    with torch.no_grad():
        full = mla.naive(x, 0, freqs[:T])
        kv, lat = KVCache.empty(cfg, 3, 16), LatentCache.empty(cfg, 3, 16)
        outs_n, outs_a, pos = [], [], 0
        for n in (5, 1, 1, 1, 1, 3):
            sl = slice(pos, pos + n)
            outs_n.append(mla(x[:, sl], pos, freqs[sl], kv))
            outs_a.append(mla(x[:, sl], pos, freqs[sl], lat))
            pos += n
    torch.testing.assert_close(torch.cat(outs_n, 1), full, **TOL)
    torch.testing.assert_close(torch.cat(outs_a, 1), full, **TOL)
    # the latent cache holds exactly what a token contributes: normed c_KV and rotated k_R
    with torch.no_grad():
        latent, k_pe = mla.latent(x, freqs[:T])
    torch.testing.assert_close(lat.latent[:B, :T], latent, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lat.pe[:B, :T], k_pe, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(lat.k[:, T:]) == 0 and torch.count_nonzero(lat.k[B:]) == 0


def test_absorbed_decode_calls_mla_decode(monkeypatch):
    import dsv3lib.model.mla as mla_mod

    calls = []
    real = mla_mod.mla_decode

    def spy(q_latent, q_pe, latent_cache, pe_cache, lengths, scale):
        calls.append((tuple(q_latent.shape), tuple(latent_cache.shape), lengths.tolist()))
        return real(q_latent, q_pe, latent_cache, pe_cache, lengths, scale)

    monkeypatch.setattr(mla_mod, "mla_decode", spy)
    cfg = small()
    mla = random_mla(cfg)
    x = torch.randn(2, 4, cfg.dim)
    freqs = precompute_freqs_cis(cfg)
    cache = LatentCache.empty(cfg, 2, 8)
    with torch.no_grad():
        mla(x[:, :3], 0, freqs[:3], cache)  # prefill: the multi-query path
        assert calls == []
        mla(x[:, 3:], 3, freqs[3:4], cache)
    assert calls == [((2, cfg.n_heads, cfg.kv_lora_rank), (2, 4, cfg.kv_lora_rank), [4, 4])]


# --------------------------------------------------------------------------------- 2. whole models
MODEL_VARIANTS = dict(argnames="overrides", argvalues=[dict(), dict(q_lora_rank=0, n_dense_layers=0)],
                      ids=["tiny", "variant"])


@pytest.mark.parametrize(**MODEL_VARIANTS)
def test_models_agree_prefill_decode_chunked(overrides):
    naive, absorb = pair(small(**overrides))
    B, T = 3, 10
    tokens = random_tokens(naive.cfg, B, T)
    with torch.no_grad():
        full = naive(tokens, mtp=False).logits
        for model, kind in ((naive, KVCache), (absorb, LatentCache)):
            cache = model.new_cache(B, 16)
            assert all(isinstance(c, kind) for c in cache)
            steps = [model(tokens[:, :4], 0, cache).logits]  # prefill, then token by token
            steps += [model(tokens[:, p:p + 1], p, cache).logits for p in range(4, T)]
            torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)
            cache, chunks, pos = model.new_cache(B, T), [], 0
            for n in (5, 3, 1, 1):  # chunked prefill
                chunks.append(model(tokens[:, pos:pos + n], pos, cache).logits)
                pos += n
            torch.testing.assert_close(torch.cat(chunks, 1), full, **TOL)


def test_latent_cache_rollback_overwrites():
    naive, absorb = pair(small())
    B = 2
    first = random_tokens(absorb.cfg, B, 10, seed=0)
    branch = random_tokens(absorb.cfg, B, 4, seed=7)  # replaces positions 6..9
    nxt = random_tokens(absorb.cfg, B, 1, seed=9)
    with torch.no_grad():
        fresh = naive(torch.cat([first[:, :6], branch, nxt], 1), mtp=False).logits
        cache = absorb.new_cache(B, 12)
        absorb(first, 0, cache)
        rolled = absorb(branch, 6, cache).logits
        rolled_next = absorb(nxt, 10, cache).logits
        # roll back again, this time re-decoding one token at a time
        again = [absorb(branch[:, i:i + 1], 6 + i, cache).logits for i in range(4)]
    torch.testing.assert_close(rolled, fresh[:, 6:10], **TOL)
    torch.testing.assert_close(rolled_next, fresh[:, 10:11], **TOL)
    torch.testing.assert_close(torch.cat(again, 1), fresh[:, 6:10], **TOL)


def test_mtp_blocks_use_the_latent_cache_too():
    naive, absorb = pair(small(n_mtp_modules=2))
    B, T = 2, 9
    tokens = random_tokens(absorb.cfg, B, T)
    with torch.no_grad():
        ref = naive(tokens).mtp_logits  # no cache: depth k at positions 0..T-k-1
        h = absorb.hidden(tokens)
        caches = absorb.new_cache(B, T, mtp=True)
        assert len(caches) == 2 and all(isinstance(c, LatentCache) for c in caches)
        freqs = absorb.freqs_cis
        for k, module in enumerate(absorb.mtp, start=1):
            n = T - k
            emb = absorb.embed(tokens[:, k:])
            parts = [module(h[:, :3], emb[:, :3], freqs[:3], 0, caches[k - 1])]  # prefill 3
            parts += [module(h[:, p:p + 1], emb[:, p:p + 1], freqs[p:p + 1], p, caches[k - 1])
                      for p in range(3, n)]  # then one position at a time
            h = torch.cat(parts, 1)
            torch.testing.assert_close(absorb.head(h), ref[k - 1], **TOL)


def test_generate_uses_latent_cache_and_matches_naive():
    naive, absorb = pair(small())
    assert ModelConfig().attn_impl == "absorb"  # the default: generation caches latents
    prompt = random_tokens(absorb.cfg, 2, 5, seed=3)
    made = []
    new_cache = absorb.new_cache
    absorb.new_cache = lambda *a, **k: made.append(new_cache(*a, **k)) or made[-1]
    out_a = generate(absorb, prompt, 12)
    assert len(made) == 1 and all(isinstance(c, LatentCache) for c in made[0])
    del absorb.new_cache
    out_n = generate(naive, prompt, 12)
    out_0 = generate(absorb, prompt, 12, use_cache=False)
    assert torch.equal(out_a, out_n) and torch.equal(out_a, out_0)


def test_cache_limits_checked_for_latent_cache():
    model = make_model(small(max_seq_len=16))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="start_pos"):
        model.layers[0].attn.absorbed(torch.zeros(1, 2, model.cfg.dim), 3, model.freqs_cis[3:5])


# ------------------------------------------------------------------------------------- 3. cache bytes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token(dtype):
    cfg = small()
    model = make_model(cfg).to(dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    B, L = 3, 20
    for attn_impl, per_token in (("absorb", cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                                 ("naive", cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim))):
        model.cfg = cfg.replace(attn_impl=attn_impl)
        caches = model.new_cache(B, L) + model.new_cache(B, L, mtp=True)
        for c in caches:
            assert c.k.dtype == dtype
            assert c.bytes_per_token == per_token * size
            assert c.nbytes == B * L * per_token * size
            # measured from the storage actually allocated (a view must not hide extra bytes)
            storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in (c.k, c.v)}
            assert sum(storages.values()) == c.nbytes
        with torch.no_grad():  # and decoding through it works in this dtype
            model(random_tokens(cfg, B, 6), 0, caches[: cfg.n_layers])


def test_deepseek_v3_cache_bytes_from_the_library():
    v3 = ModelConfig.preset("deepseek-v3")
    latent = LatentCache.empty(v3, 1, 1, torch.bfloat16, "meta")
    expanded = new_layer_cache(v3, 1, 1, torch.bfloat16, "meta", attn_impl="naive")
    assert isinstance(latent, LatentCache) and isinstance(expanded, KVCache)
    assert latent.bytes_per_token == 576 * 2 == 1152
    assert expanded.bytes_per_token == 128 * (192 + 128) * 2 == 81_920
    assert latent.bytes_per_token * v3.n_layers == kv_cache_bytes_per_token(v3) == 70_272  # ISCA Tab. 1
    assert expanded.bytes_per_token * v3.n_layers == kv_cache_bytes_per_token(v3, "mha") == 4_997_120
    assert round(expanded.bytes_per_token / latent.bytes_per_token, 1) == 71.1
    # the published peers of ISCA Table 1 (BF16)
    assert gqa_kv_bytes_per_token(PUBLISHED["llama-3.1-405b"]) == 516_096
    assert gqa_kv_bytes_per_token(PUBLISHED["qwen2.5-72b"]) == 327_680
    with pytest.raises(ValueError, match="attn_impl"):
        new_layer_cache(v3, 1, 1, attn_impl="flash")


def test_attn_impl_is_validated():
    with pytest.raises(ValueError, match="attn_impl"):
        ModelConfig(attn_impl="fast")
    assert ModelConfig.from_dict(ModelConfig(attn_impl="naive").to_dict()).attn_impl == "naive"


# ------------------------------------------------------------------------- 4. YaRN past original_seq_len
YARN = dict(max_seq_len=96, original_seq_len=24, rope_factor=4.0, rope_theta=100.0, mscale=1.0)


def yarn_thetas(cfg: ModelConfig) -> torch.Tensor:
    """θ_j after YaRN, written out from the formula (float64): pairs rotating more than beta_fast times
    over the original context keep θ_j, fewer than beta_slow get θ_j/s, a linear ramp (by pair index)
    between."""
    d, base, L, s = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.original_seq_len, cfg.rope_factor
    j = torch.arange(d // 2, dtype=torch.float64)
    theta = base ** (-2 * j / d)

    def pair_index(rotations):  # the j with L·θ_j / 2π == rotations
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = max(math.floor(pair_index(cfg.beta_fast)), 0), min(math.ceil(pair_index(cfg.beta_slow)), d - 1)
    gamma = ((j - lo) / (hi - lo)).clamp(0, 1)
    return theta * (1 - gamma) + theta / s * gamma


def test_yarn_rotation_angles_beyond_original_length():
    cfg = small(**YARN)
    assert cfg.yarn_active
    theta = yarn_thetas(cfg)
    d = cfg.qk_rope_head_dim
    assert theta[0] == 1.0 and math.isclose(theta[-1], 100.0 ** (-(d - 2) / d) / 4)  # kept / stretched ×s
    torch.testing.assert_close(rope_frequencies(cfg).double(), theta, atol=1e-7, rtol=1e-6)
    freqs_cis = precompute_freqs_cis(cfg)
    for t in (0, 23, 24, 25, 50, 95):  # below, at and beyond original_seq_len
        expect = torch.polar(torch.ones_like(theta), t * theta).to(torch.complex64)
        torch.testing.assert_close(freqs_cis[t], expect, atol=2e-5, rtol=0)


def test_yarn_logit_scale_is_mscale_squared():
    """Past the original context the attention logits are q·k/√d_qk · m², m = 0.1·mscale·ln s + 1 (V3 §4.3):
    an MLA layer at positions 40..47 (> original_seq_len=24) equals attention written out by hand."""
    cfg = small(**YARN, q_lora_rank=0)
    m = 0.1 * math.log(4.0) + 1
    assert math.isclose(cfg.softmax_scale, cfg.qk_head_dim ** -0.5 * m * m)
    assert math.isclose(ModelConfig.preset("deepseek-v3").softmax_scale, 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert small(max_seq_len=24, original_seq_len=24).softmax_scale == small().qk_head_dim ** -0.5  # inactive
    mla = random_mla(cfg, seed=5)
    B, T, P0 = 2, 48, 40
    x = torch.randn(B, T, cfg.dim, generator=torch.Generator().manual_seed(6))
    freqs = precompute_freqs_cis(cfg)[:T]
    with torch.no_grad():
        cache = LatentCache.empty(cfg, B, T)
        mla(x[:, :P0], 0, freqs[:P0], cache)
        got = torch.cat([mla(x[:, p:p + 1], p, freqs[p:p + 1], cache) for p in range(P0, T)], 1)
        # by hand: rotate pair j of position t by t·θ_j (θ from the formula), scale logits by m²/√d
        H, nope = cfg.n_heads, cfg.qk_nope_head_dim
        q = (x @ mla.wq.weight.T).view(B, T, H, -1).double()
        kv = x @ mla.wkv_a.weight.T
        c, k_r = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:].double()
        c = mla.kv_norm(c)
        w = mla.wkv_b.weight.view(H, nope + cfg.v_head_dim, -1).double()
        k_c = torch.einsum("btc,hdc->bthd", c.double(), w[:, :nope])
        v = torch.einsum("btc,hdc->bthd", c.double(), w[:, nope:])
        ang = torch.arange(T, dtype=torch.float64)[:, None] * yarn_thetas(cfg)  # (T, rope/2)

        def rot(z):  # (..., T, [H,] rope) adjacent pairs
            zc = torch.view_as_complex(z.reshape(*z.shape[:-1], -1, 2).contiguous())
            r = torch.polar(torch.ones_like(ang), ang)
            r = r.view(T, 1, -1) if z.dim() == 4 else r
            return torch.view_as_real(zc * r).flatten(-2)

        q_r, k_r = rot(q[..., nope:]), rot(k_r)
        logits = (torch.einsum("bthd,bshd->bhts", q[..., :nope], k_c)
                  + torch.einsum("bthd,bsd->bhts", q_r, k_r)) * cfg.qk_head_dim ** -0.5 * m * m
        logits = logits + torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
        o = torch.einsum("bhts,bshd->bthd", logits.softmax(-1), v).flatten(2)
        want = (o @ mla.wo.weight.double().T)[:, P0:]
    torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4)
