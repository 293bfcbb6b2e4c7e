"""Tests of the whole reference Transformer (dsv3lib.model; chapter 0): shapes, causality, the KV
cache, bad input, the MTP loss, an overfit check. Oracles are simpler code written here."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from model_helpers import ATOL, make_model, random_tokens, small, tiny

from dsv3lib.model import (
    MoE,
    Transformer,
    mtp_loss,
)


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


# ------------------------------------------------------------------------------------------ modules and modes
def test_block_lives_in_its_own_module():
    from dsv3lib.model import Block
    from dsv3lib.model.block import Block as from_block
    from dsv3lib.model.mtp import MTPModule
    from dsv3lib.model.transformer import Block as from_transformer

    assert Block is from_block is from_transformer
    model = make_model(tiny(n_mtp_modules=1))
    assert all(type(b) is Block for b in [*model.layers, model.mtp[0].block])
    assert isinstance(model.mtp[0], MTPModule)


def test_eval_mode_restores_the_mode_it_found():
    from dsv3lib.model import eval_mode

    model = make_model(tiny())
    for start in (True, False):
        model.train(start)
        with eval_mode(model) as m:
            assert m is model and not any(x.training for x in model.modules())
        assert all(x.training == start for x in model.modules())
    model.train()
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            raise RuntimeError("inside")
    assert model.training
