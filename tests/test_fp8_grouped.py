"""dsv3lib.fp8.grouped: a MoE layer's FP8 experts in one call, bit for bit the per-expert FP8Linear calls."""

import pytest
import torch
from torch import nn

from dsv3lib.config import ModelConfig
from dsv3lib.dispatch import use_backend
from dsv3lib.fp8 import FP8Linear, convert_to_fp8
from dsv3lib.fp8.grouped import fp8_grouped_linear, grouped_experts
from dsv3lib.model import Transformer, mtp_loss
from dsv3lib.model import moe as moe_module
from dsv3lib.model.moe import MLP
from dsv3lib.train import TrainConfig, make_optimizer
from dsv3lib.wgrad import weight_grad_sink


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _experts(counts, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = [FP8Linear(K, N, bias=False) for _ in counts]
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(torch.randn(N, K, generator=g) * 0.1)
    x = torch.randn(sum(counts), K, generator=g) * 3
    dy = torch.randn(sum(counts), N, generator=g)
    return layers, x, dy


class _Queue:
    """A weight-gradient sink that keeps every pushed dW computation for later (a zero-bubble ``W``)."""

    def __init__(self):
        self.fns = []

    def push(self, fn):
        self.fns.append(fn)
        return True


@pytest.mark.parametrize("counts,N,K", [([3, 0, 130, 7], 64, 128), ([1, 200, 0, 5, 129], 128, 64),
                                        ([40, 300], 200, 130), ([17, 0, 256], 384, 256), ([5], 64, 128)])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("backend", ["auto", "ref"])  # the grouped call with the compiled CPU kernels or without
def test_grouped_linear_is_the_per_expert_calls_bit_for_bit(counts, N, K, deferred, backend):
    layers, x, dy = _experts(counts, N, K)
    results = []
    for grouped in (False, True):  # the per-expert calls always on the PyTorch references
        for m in layers:
            m.weight.grad = None
        xi, sink = x.clone().requires_grad_(), _Queue()
        with weight_grad_sink(sink if deferred else None), use_backend(backend if grouped else "ref"):
            if grouped:
                y = fp8_grouped_linear(xi, counts, [m.weight for m in layers])
            else:
                y = torch.cat([m(c) for m, c in zip(layers, xi.split(counts)) if len(c)])
        with use_backend(backend if grouped else "ref"):
            y.backward(dy)
            assert all(m.weight.grad is None for m in layers) or not deferred  # dW waits for the W op
            for fn in sink.fns:
                fn()
        results.append((y, xi.grad, [m.weight.grad for m in layers]))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert _same(y0, y1) and _same(dx0, dx1)
    assert all(_same(a, b) for a, b in zip(g0, g1))
    assert [g is None for g in g1] == [c == 0 for c in counts]  # an idle expert gets no gradient at all


def test_training_steps_match_the_per_expert_path(monkeypatch):
    """Three FP8 training steps of the tiny model (routing changes between steps): every parameter the same."""
    def train(grouped):
        if not grouped:
            monkeypatch.setattr(moe_module, "grouped_experts", lambda *a: None)
        torch.manual_seed(0)
        cfg = ModelConfig.preset("tiny", n_layers=2)
        model = convert_to_fp8(Transformer(cfg))
        tcfg = TrainConfig(batch_size=4, seq_len=32)
        opt = make_optimizer(model, tcfg)
        tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            loss, _, _ = mtp_loss(model(tokens[:, :-1]), tokens[:, 1:], tcfg.mtp_lambda)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        monkeypatch.undo()
        return dict(model.named_parameters())

    per_expert, grouped = train(False), train(True)
    assert all(_same(per_expert[n].detach(), p.detach()) for n, p in grouped.items())


def test_when_the_grouped_path_applies():
    x = torch.randn(6, 32)
    fp8 = nn.ModuleList(MLP(32, 16) for _ in range(2))
    for mlp in fp8:
        for name in ("w1", "w2", "w3"):
            setattr(mlp, name, FP8Linear.from_linear(getattr(mlp, name)))
    assert grouped_experts(fp8, x, [2, 4]).shape == (6, 32)
    assert grouped_experts(nn.ModuleList(MLP(32, 16) for _ in range(2)), x, [2, 4]) is None  # plain Linears
    fp8[1].w2 = FP8Linear.from_linear(nn.Linear(16, 32))  # a bias
    assert grouped_experts(fp8, x, [2, 4]) is None
    with pytest.raises(ValueError, match="counts"):
        fp8_grouped_linear(x, [2, 3], [fp8[0].w1.weight, fp8[1].w1.weight])


def test_block_dgrad_experts_take_the_per_expert_path():
    """App. B.2's option lives in FP8LinearFunction only: experts that use it must not be grouped."""
    from dsv3lib.config import ModelConfig
    from dsv3lib.fp8 import convert_to_fp8
    from dsv3lib.fp8.grouped import grouped_experts
    from dsv3lib.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    tile, block = Transformer(cfg), Transformer(cfg)
    block.load_state_dict(tile.state_dict())
    convert_to_fp8(tile)
    convert_to_fp8(block, dgrad_quant="block")
    moe = next(m for m in block.modules() if hasattr(m, "experts"))
    x = torch.randn(12, cfg.dim)
    assert grouped_experts(moe.experts, x, [12] + [0] * (len(moe.experts) - 1)) is None
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    grads = []
    for m in (tile, block):
        m(tokens)[0].float().square().mean().backward()
        grads.append(next(p.grad for n, p in m.named_parameters() if "experts" in n and "w1" in n
                          and p.grad is not None))
    assert not torch.equal(*grads)  # the experts' input gradients (so upstream dW) changed
