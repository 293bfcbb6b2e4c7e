"""The FP8 reference path against the code it replaced, bit for bit (issue 13, item 3).

``dsv3lib.fp8.quant`` and ``FP8Linear`` were rewritten for CPU speed: table look-up instead of ``.float()``
on FP8 tensors, no padding or transposing copies that change nothing, in-place scale multiplies. The
semantics must not move by a bit, so the old functions live on here, verbatim but for names, as the
oracle; every result is compared with ``torch.equal`` (and FP8 tensors by their bytes).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dsv3lib.config import ModelConfig
from dsv3lib.dispatch import use_backend
from dsv3lib.fp8 import (FP8Linear, act_dequant, act_quant_ref, convert_to_fp8, fp8_gemm_ref, fp8_to_float,
                         weight_dequant, weight_quant_ref)
from dsv3lib.model import Transformer, mtp_loss
from dsv3lib.model import moe as moe_module
from dsv3lib.train import TrainConfig, make_optimizer

FP8, MAX = torch.float8_e4m3fn, 448.0


# ------------------------------------------------------------------ the old code (before the speed-up)
def old_scale(amax):
    s = amax.float() / MAX
    return torch.where(amax > 0, s, torch.ones_like(s))


def old_pad_to(x, dim, block):
    pad = -x.shape[dim] % block
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def old_act_quant(x, bs=128):
    K = x.shape[-1]
    xt = old_pad_to(x.float(), -1, bs).unflatten(-1, (-1, bs))
    s = old_scale(xt.abs().amax(dim=-1))
    return (xt / s.unsqueeze(-1)).clamp(-MAX, MAX).to(FP8).flatten(-2)[..., :K], s


def old_weight_quant(w, bs=128):
    N, K = w.shape
    wb = old_pad_to(old_pad_to(w.float(), 0, bs), 1, bs).unflatten(0, (-1, bs)).unflatten(2, (-1, bs))
    s = old_scale(wb.abs().amax(dim=(1, 3)))
    return (wb / s[:, None, :, None]).clamp(-MAX, MAX).to(FP8).flatten(2).flatten(0, 1)[:N, :K], s


def old_act_dequant(x_fp8, s, bs=128):
    return x_fp8.float() * s.repeat_interleave(bs, dim=-1)[..., :x_fp8.shape[-1]]


def old_gemm(a, a_s, b, b_s, bs=128):
    lead, K = a.shape[:-1], a.shape[-1]
    M, N = math.prod(lead), b.shape[0]
    a2, as2 = a.reshape(M, K), a_s.reshape(M, a_s.shape[-1]).float()
    bs_rows = (b_s if b_s.shape[0] == N else b_s.repeat_interleave(bs, 0)[:N]).float()
    acc = torch.zeros(M, N, dtype=torch.float32)
    for i, k0 in enumerate(range(0, K, bs)):
        part = a2[:, k0:k0 + bs].float() @ b[:, k0:k0 + bs].float().T
        acc += part * as2[:, i:i + 1] * bs_rows[:, i]
    return acc.reshape(*lead, N)


class OldFP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bs):
        N, K = weight.shape
        xq, xs = old_act_quant(x.reshape(-1, K), bs)
        wq, ws = old_weight_quant(weight, bs)
        y = old_gemm(xq, xs, wq, ws, bs)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.bs, ctx.has_bias, ctx.x_shape = bs, bias is not None, x.shape
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        bs, (N, K) = ctx.bs, wq.shape
        dy2 = dy.reshape(-1, N).float()
        dyq, dys = old_act_quant(dy2, bs)
        wtq = wq.view(torch.uint8).t().contiguous().view(wq.dtype)
        dx = old_gemm(dyq, dys, wtq, ws.t().contiguous(), bs).to(dy.dtype).reshape(ctx.x_shape)
        if dy2.shape[0] == 0:
            dw = torch.zeros(N, K)
        else:
            def pad_rows(t):
                return F.pad(t, (0, 0, 0, -t.shape[0] % bs)) if t.shape[0] % bs else t
            dytq, dyts = old_act_quant(pad_rows(dy2).t().contiguous(), bs)
            xtq, xts = old_act_quant(pad_rows(old_act_dequant(xq, xs, bs)).t().contiguous(), bs)
            dw = old_gemm(dytq, dyts, xtq, xts, bs)
        return dx, dw, dy2.sum(0) if ctx.has_bias else None, None


# ----------------------------------------------------------------------------------------- the tests
def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _same_fp8(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_fp8_to_float_is_the_cast_for_every_byte():
    q = torch.arange(256, dtype=torch.uint8).view(FP8)
    got, want = fp8_to_float(q), q.float()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # the same bits, NaNs included
    t = q.view(16, 16).t()  # any strides
    assert torch.equal(fp8_to_float(t).view(torch.int32), t.float().view(torch.int32))


@pytest.mark.parametrize("shape", [(70, 256), (3, 5, 200), (9, 64), (0, 128), (4, 384)])
def test_act_quant_and_dequant_as_before(shape):
    x = _rand(*shape, scale=3.0)
    if x.numel():
        x.view(-1, x.shape[-1])[0, :64] = 0  # an all-zero stretch, and an all-zero tile if K <= 64
    q, s = act_quant_ref(x)
    qo, so = old_act_quant(x)
    assert _same_fp8(q, qo) and torch.equal(s, so)
    assert torch.equal(act_dequant(q, s), old_act_dequant(qo, so))


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (64, 128), (80, 64)])
def test_weight_quant_and_dequant_as_before(shape):
    w = _rand(*shape, seed=1)
    q, s = weight_quant_ref(w)
    qo, so = old_weight_quant(w)
    assert _same_fp8(q, qo) and torch.equal(s, so)
    full = so.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]
    assert torch.equal(weight_dequant(q, s), qo.float() * full)


@pytest.mark.parametrize("M,N,K", [(70, 200, 256), (33, 64, 192), (128, 80, 64), (5, 130, 384), (0, 64, 128)])
@pytest.mark.parametrize("b_layout", ["blocks", "tiles", "transposed"])
def test_gemm_as_before(M, N, K, b_layout):
    aq, a_s = old_act_quant(_rand(M, K, seed=2))
    a_s = a_s * torch.linspace(0.5, 2, a_s.numel()).reshape(a_s.shape)  # distinct scales per K block
    if b_layout == "blocks":
        bq, b_s = old_weight_quant(_rand(N, K, seed=3))
    elif b_layout == "tiles":
        bq, b_s = old_act_quant(_rand(N, K, seed=3))
    else:  # Dgrad's Wᵀ: a transposed view of a (K, N) weight's blocks
        wq, ws = old_weight_quant(_rand(K, N, seed=3))
        bq, b_s = wq.t(), ws.t()
    got = fp8_gemm_ref(aq, a_s, bq, b_s)
    want = old_gemm(aq, a_s, bq.contiguous(), b_s.contiguous())
    assert torch.equal(got, want)


@pytest.mark.parametrize("M,K,N", [(70, 256, 128), (300, 200, 72), (128, 64, 192), (0, 128, 64), (5, 384, 384)])
@pytest.mark.parametrize("backend", ["auto", "ref"])  # the compiled CPU kernels (if built), the PyTorch references
def test_fp8_linear_as_before(M, K, N, backend):
    with use_backend(backend):
        _linear_as_before(M, K, N)


def _linear_as_before(M, K, N):
    torch.manual_seed(0)
    layer = FP8Linear(K, N)
    x, dy = _rand(M, K, seed=4), _rand(M, N, seed=5)
    results = []
    for fn in (lambda x: layer(x), lambda x: OldFP8Linear.apply(x, layer.weight, layer.bias, 128)):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad()
        y = fn(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for name, got, want in zip(("y", "dx", "dw", "db"), *results, strict=True):
        assert torch.equal(got, want), name


def _model_step(old: bool):
    """One training step as dsv3lib.train takes it, on the tiny model in FP8 (the old FP8Linear if ``old``)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", n_layers=2)
    model = convert_to_fp8(Transformer(cfg))
    if old:
        for m in model.modules():
            if isinstance(m, FP8Linear):
                m.forward = lambda x, m=m: OldFP8Linear.apply(x, m.weight, m.bias, m.block_size)
    tcfg = TrainConfig(batch_size=4, seq_len=64)
    opt = make_optimizer(model, tcfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(1))
    grouped = moe_module.grouped_experts
    if old:  # the old code had no grouped expert path: every expert through its own (old) FP8Linear
        moe_module.grouped_experts = lambda *args: None
    try:
        loss, _, _ = mtp_loss(model(tokens[:, :-1]), tokens[:, 1:], tcfg.mtp_lambda)
    finally:
        moe_module.grouped_experts = grouped
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    opt.step()
    return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["auto", "ref"])
def test_fp8_model_step_as_before(backend):
    with use_backend(backend):
        loss, grads, params = _model_step(old=False)
    loss_o, grads_o, params_o = _model_step(old=True)
    assert torch.equal(loss, loss_o)
    assert grads.keys() == grads_o.keys() and len(grads) > 10
    assert [n for n in grads if not torch.equal(grads[n], grads_o[n])] == []
    assert [n for n in params if not torch.equal(params[n], params_o[n])] == []
