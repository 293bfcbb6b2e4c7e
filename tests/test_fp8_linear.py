"""dsv3lib.fp8.linear: FP8Linear's three FP8 GEMMs and convert_to_fp8 on the Transformer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3lib.config import ModelConfig
from dsv3lib.fp8 import FP8Linear, act_dequant, act_quant_ref, convert_to_fp8, weight_dequant, weight_quant_ref
from dsv3lib.model.transformer import Transformer


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads(layer, x, dy):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("M,K,N", [(256, 256, 384), (100, 200, 72)])
def test_fp8_linear_gradients_close_to_high_precision(M, K, N):
    torch.manual_seed(0)
    ref = nn.Linear(K, N).double()
    fp8 = FP8Linear.from_linear(nn.Linear(K, N))
    with torch.no_grad():
        fp8.weight.copy_(ref.weight)
        fp8.bias.copy_(ref.bias)
    x, dy = torch.randn(2, M // 2, K), torch.randn(2, M // 2, N)
    y8, dx8, dw8, db8 = _grads(fp8, x, dy)
    y, dx, dw, db = _grads(ref, x.double(), dy.double())
    assert y8.dtype == torch.float32 and fp8.weight.grad.dtype == torch.float32
    for name, got, want in [("y", y8, y), ("dx", dx8, dx), ("dw", dw8, dw)]:
        assert 5e-3 < _rel(got, want) < 0.06, name  # E4M3 on both operands: ~4% on random data
    assert _rel(db8, db) < 1e-6  # the bias gradient is a plain sum


def test_fp8_linear_is_exactly_the_block_scaled_gemm():
    torch.manual_seed(1)
    layer = FP8Linear(256, 128, bias=False)
    x = torch.randn(8, 256)
    xq, xs = act_quant_ref(x)
    wq, ws = weight_quant_ref(layer.weight.detach())
    want = act_dequant(xq, xs).double() @ weight_dequant(wq, ws).double().T
    assert torch.allclose(layer(x).double(), want, rtol=1e-5, atol=1e-6)


def test_fp8_linear_rejects_nonfinite_input():
    layer = FP8Linear(128, 128)
    x = torch.randn(4, 128)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="FP8Linear input"):
        layer(x)


def test_convert_to_fp8_keeps_head_embedding_gate_norms():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", n_layers=2, n_mtp_modules=1)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    ref_logits = model(tokens).logits
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    params_before = {n: p for n, p in model.named_parameters()}
    convert_to_fp8(model)
    assert type(model.head) is nn.Linear and isinstance(model.embed, nn.Embedding)
    assert "head" not in model.fp8_converted and len(model.fp8_converted) == n_linear - 1
    assert all(type(m) is not nn.Linear or m is model.head for m in model.modules())
    assert {n: p for n, p in model.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())  # same Parameters: optimizer-safe
    logits = model(tokens).logits
    rel = _rel(logits, ref_logits)
    assert 0 < rel < 0.1
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.0.attn" in n)


def test_convert_to_fp8_skip_patterns():
    cfg = ModelConfig.preset("tiny", n_layers=2, n_mtp_modules=0)
    model = convert_to_fp8(Transformer(cfg), skip=("head", "*.wkv_b"))
    assert type(model.layers[0].attn.wkv_b) is nn.Linear
    assert type(model.layers[0].attn.wo) is FP8Linear


def test_fp8_linear_with_no_tokens():
    layer = FP8Linear(128, 64)
    x = torch.zeros(0, 128, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 128)
    assert torch.equal(layer.weight.grad, torch.zeros(64, 128))


def test_convert_to_fp8_refuses_grouped_mm():
    model = Transformer(ModelConfig.preset("tiny", n_layers=2, n_mtp_modules=0))
    model.layers[1].ffn.grouped_mm = True
    with pytest.raises(ValueError, match="grouped_mm"):
        convert_to_fp8(model)


def test_fp8_training_tracks_fp32_training():
    # in-features all multiples of 128 (what the Triton path on a GPU wants); a few AdamW steps on one batch
    cfg = ModelConfig.preset("tiny", n_layers=2, q_lora_rank=128, kv_lora_rank=128, moe_inter_dim=128,
                             n_mtp_modules=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        if fp8:
            convert_to_fp8(model)
            assert all(m.in_features % 128 == 0 for m in model.modules() if isinstance(m, FP8Linear))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for _ in range(5):
            logits = model(tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[fp8] = run
    assert losses[True][-1] < losses[True][0] - 0.1  # it learns
    assert losses[True] != losses[False]  # and really ran in FP8
    assert abs(losses[True][0] - losses[False][0]) / losses[False][0] < 0.005  # same weights, FP8 forward
    assert abs(losses[True][-1] - losses[False][-1]) / losses[False][-1] < 0.02


def _block_dequant_by_hand(t, bs=128):
    """An independent 128×128-block E4M3 round trip: each block scaled so its amax maps to 448."""
    out = torch.empty_like(t)
    for i in range(0, t.shape[0], bs):
        for j in range(0, t.shape[1], bs):
            blk = t[i:i + bs, j:j + bs]
            s = blk.abs().amax().clamp_min(1e-12) / 448.0
            out[i:i + bs, j:j + bs] = (blk / s).to(torch.float8_e4m3fn).float() * s
    return out


@pytest.mark.parametrize("M,K,N", [(256, 256, 384), (100, 200, 72), (300, 128, 256)])
def test_block_dgrad_is_the_block_scaled_gemm(M, K, N):
    torch.manual_seed(2)
    tile = FP8Linear(K, N, bias=False)
    block = FP8Linear.from_linear(tile, dgrad_quant="block")
    x, dy = torch.randn(M, K), torch.randn(M, N)
    _, dx_t, dw_t = _grads_nobias(tile, x, dy)
    _, dx_b, dw_b = _grads_nobias(block, x, dy)
    wq, ws = weight_quant_ref(tile.weight.detach())
    want = _block_dequant_by_hand(dy).double() @ weight_dequant(wq, ws).double()
    assert torch.allclose(dx_b.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(dx_b, dx_t)  # the option reaches Dgrad ...
    assert torch.equal(dw_b, dw_t)  # ... and only Dgrad: Wgrad keeps its 128×1 tiles


def _grads_nobias(layer, x, dy):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone()


def test_block_dgrad_loses_the_small_tokens_next_to_an_outlier_token():
    """App. B.2's mechanism: one token's large gradient sets its whole block's scale."""
    torch.manual_seed(3)
    tile = FP8Linear(256, 256, bias=False)
    block = FP8Linear.from_linear(tile, dgrad_quant="block")
    x, dy = torch.randn(128, 256), torch.randn(128, 256) * 1e-3
    dy[5] *= 1e5  # one token's gradient 10⁵× the others'
    ref = dy.double() @ tile.weight.detach().double()
    quiet = torch.arange(128) != 5
    err = {}
    for name, layer in (("tile", tile), ("block", block)):
        dx = _grads_nobias(layer, x, dy)[1]
        err[name] = _rel(dx[quiet], ref[quiet])
    assert err["tile"] < 0.06 and err["block"] > 0.25  # 4% vs 35%: the quiet tokens sit in the subnormals


def test_dgrad_quant_is_checked():
    with pytest.raises(ValueError, match="dgrad_quant"):
        FP8Linear(128, 128, dgrad_quant="blocks")
    with pytest.raises(ValueError, match="dgrad_quant"):
        convert_to_fp8(nn.Sequential(nn.Linear(128, 128)), dgrad_quant="128x128")
    m = convert_to_fp8(nn.Sequential(nn.Linear(128, 128)), dgrad_quant="block")
    assert m[0].dgrad_quant == "block" and "dgrad_quant='block'" in repr(m)


def test_function_apply_without_the_dgrad_option():
    from dsv3lib.fp8 import FP8LinearFunction

    w = nn.Parameter(torch.randn(128, 128))
    x = torch.randn(4, 128, requires_grad=True)
    FP8LinearFunction.apply(x, w, None, 128).sum().backward()  # four arguments, as before the option existed
    assert x.grad is not None and w.grad is not None
