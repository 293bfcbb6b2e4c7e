"""Balancing: the load meter adds up the routings its hooks see; the loss-free bias moves by ±γ toward the
mean load and evens out the loads; the auxiliary losses follow their equations and balance a router on their
own; MaxVio per batch and over a set."""

import math

import pytest
import torch

from dsv3lib.balancing import (
    BiasBalancer,
    LoadMeter,
    AffinityRecorder,
    LoadRecorder,
    balance_loss,
    batch_balance_loss,
    capture_routing,
    global_max_violation,
    max_violation,
    sequence_balance_loss,
)
from dsv3lib.config import ModelConfig
from dsv3lib.model import Gate, MoE, Transformer
from dsv3lib.train import TrainConfig, train


def test_max_violation():
    assert max_violation(torch.tensor([4, 4, 4, 4])) == 0.0
    assert max_violation(torch.tensor([8, 4, 2, 2])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="^counts"):
        max_violation(torch.zeros(4))


def _bincount(indices, E=16):
    return torch.bincount(indices.flatten(), minlength=E)


def test_load_meter_adds_up_every_forward_until_reset():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", n_layers=2, max_seq_len=64)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, cfg.vocab_size, (2, n), generator=g) for n in (16, 9))
    with capture_routing(model) as routings, LoadMeter(model) as meter:
        assert meter.names == ["layers.1.ffn", "mtp.0.block.ffn"]
        assert torch.equal(meter.counts(), torch.zeros(2, 16, dtype=torch.long))  # nothing ran yet
        with torch.no_grad():
            model(a)  # main layer and MTP gate
            model(b, mtp=False)  # main layer only
        (ra1, rm1, ra2) = routings
        counts = meter.counts()
        assert counts.shape == (2, 16) and counts.dtype == torch.long
        assert torch.equal(counts[0], _bincount(ra1.indices) + _bincount(ra2.indices))  # both batches
        assert torch.equal(counts[1], _bincount(rm1.indices))
        assert counts[0].sum() == (2 * 16 + 2 * 9) * cfg.n_activated_experts
        counts.zero_()  # counts() is a copy
        assert meter.counts()[0].sum() > 0
        meter.reset()
        with torch.no_grad():
            model(b, mtp=False)
        assert torch.equal(meter.counts()[0], _bincount(ra2.indices)) and meter.counts()[1].sum() == 0
    # leaving the blocks removed every hook: further forwards are neither counted nor captured
    assert all(len(gate._forward_hooks) == 0 for gate in meter.gates)
    before = meter.counts()
    with torch.no_grad():
        model(a)
    assert torch.equal(meter.counts(), before) and len(routings) == 4  # 3 forwards + 1 after the reset


def test_load_meter_close_removes_its_hooks_only():
    torch.manual_seed(0)
    moe = MoE(ModelConfig.preset("tiny"))
    x = torch.randn(4, 8, moe.cfg.dim)
    meter, other = LoadMeter(moe), LoadMeter(moe)
    with torch.no_grad():
        moe(x)
    meter.close()
    with torch.no_grad():
        moe(x)
    assert meter.counts().sum() == 32 * 4 and other.counts().sum() == 2 * 32 * 4
    other.close()
    assert len(moe.gate._forward_hooks) == 0


def test_bias_update_is_sign_of_deficit():
    torch.manual_seed(0)
    moe = MoE(ModelConfig.preset("tiny"))
    loads = torch.tensor([[10, 0, 5, 5] * 4])  # one gate; mean 5
    BiasBalancer(moe, gamma=0.1).update(loads)
    assert torch.allclose(moe.gate.bias, torch.tensor([-0.1, 0.1, 0.0, 0.0] * 4))
    assert loads.dtype == torch.long and loads[0, 0] == 10  # the caller's loads are left alone
    with pytest.raises(ValueError, match="^loads"):
        BiasBalancer(moe, gamma=0.1).update(loads[0])


def test_balancer_evens_out_a_skewed_router():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight[:4] += 1.0  # experts 0-3 attract about half of all tokens each
    x = torch.randn(1024, cfg.dim)
    balancer = BiasBalancer(moe, gamma=0.005)
    meter = LoadMeter(moe)
    moe(x)
    start = max_violation(meter.counts()[0])
    late = []
    for _ in range(300):
        meter.reset()
        moe(x)
        balancer.update(meter.counts())
        late.append(max_violation(meter.counts()[0]))
    assert start > 0.9 and sum(late[-20:]) / 20 < 0.35  # sign updates oscillate by ±γ around balance
    assert moe.gate.bias[:4].max() < 0 < moe.gate.bias[4:].max()


def test_bad_gamma():
    with pytest.raises(ValueError, match="^gamma"):
        BiasBalancer(MoE(ModelConfig.preset("tiny")), gamma=0.0)


# ------------------------------------------------------------------------------- auxiliary losses
def _routing(B=3, T=10, E=16, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B * T, E, generator=g, dtype=torch.float64).requires_grad_(True)
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)])
    return scores, indices


def _loop_sequence_loss(scores, indices, B, T, alpha):
    """V3 eq. 17–20 with Python loops; f counted as plain numbers, so the gradient can only go through P."""
    E, K = scores.size(1), indices.size(1)
    total = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        f = [E / (K * T) * sum(int(i in indices[t].tolist()) for t in rows) for i in range(E)]
        P = [sum(scores[t, i] / scores[t].sum() for t in rows) / T for i in range(E)]
        total = total + alpha * sum(fi * pi for fi, pi in zip(f, P))
    return total / B


def test_sequence_loss_matches_the_equations_value_and_gradient():
    B, T = 3, 10
    scores, indices = _routing(B, T)
    loss = sequence_balance_loss(scores, indices, (B, T), alpha=1e-4)
    (g,) = torch.autograd.grad(loss, scores)
    ref = _loop_sequence_loss(scores, indices, B, T, alpha=1e-4)
    (g_ref,) = torch.autograd.grad(ref, scores)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-18)


def test_sequence_loss_is_alpha_when_balanced():
    # every expert picked equally often in each sequence: f = 1; P sums to 1, so L = α
    E, K, T = 8, 2, 4
    indices = torch.arange(E).view(T, K).repeat(2, 1)  # 2 sequences of 4 tokens
    scores = torch.rand(2 * T, E, dtype=torch.float64)
    loss = sequence_balance_loss(scores, indices, (2, T), alpha=1e-4)
    assert loss.item() == pytest.approx(1e-4, rel=1e-12)
    with pytest.raises(ValueError, match="^token_shape"):
        sequence_balance_loss(scores, indices, (3,), alpha=1e-4)


def test_batch_loss_matches_wang_eq2():
    scores, indices = _routing(B=1, T=40)
    N, E, K = 40, scores.size(1), indices.size(1)
    loss = batch_balance_loss(scores, indices, alpha=1e-3)
    f = torch.bincount(indices.flatten(), minlength=E).double() * E / (K * N)
    torch.testing.assert_close(loss, 1e-3 * (f * scores.mean(0)).sum())
    # normalised: the sequence loss with the whole batch as one sequence
    torch.testing.assert_close(batch_balance_loss(scores, indices, alpha=1e-3, normalize=True),
                               sequence_balance_loss(scores, indices, (N,), alpha=1e-3))


def test_capture_routing_only_inside_its_block():
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg)
    gate = moe.gate
    x = torch.randn(2, 5, cfg.dim)
    with capture_routing(moe) as routings:
        moe(x)
    moe(x)  # after the block: not captured
    (r,) = routings
    assert r.scores.shape == (10, cfg.n_routed_experts) and r.scores.requires_grad
    assert r.indices.shape == (10, cfg.n_activated_experts) and r.token_shape == (2, 5)
    assert len(gate._forward_hooks) == 0
    # only the gate weight gets a gradient from the aux loss; the bias never does
    loss = balance_loss(routings, "sequence", 1e-2)
    torch.testing.assert_close(loss, sequence_balance_loss(r.scores, r.indices, (2, 5), 1e-2))
    loss.backward()
    assert gate.weight.grad.abs().sum() > 0 and gate.bias.grad is None
    assert all(p.grad is None for n, p in moe.named_parameters() if not n.startswith("gate."))
    with pytest.raises(ValueError, match="^routings"):
        balance_loss([])
    with pytest.raises(ValueError, match="^kind"):
        balance_loss(routings, "token")


@pytest.mark.parametrize("kind", ["sequence", "batch"])
def test_aux_loss_alone_balances_a_skewed_router(kind):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.1)
        moe.gate.weight[:4] += 0.3  # experts 0-3 attract most tokens
    x = torch.randn(8, 32, cfg.dim)
    opt = torch.optim.SGD([moe.gate.weight], lr=100.0)
    start = max_violation(_bincount(moe.gate(x).indices))
    late = []
    for _ in range(50):
        with capture_routing(moe) as routings:
            moe(x)
        late.append(max_violation(_bincount(routings[0].indices)))
        opt.zero_grad()
        balance_loss(routings, kind, alpha=1.0).backward()  # only the balance loss is trained, with a big step
        opt.step()
    assert start > 0.6 and sum(late[-10:]) / 10 < 0.5 * start


# ---------------------------------------------------------------------------------------- metrics
SMALL_MODEL = dict(n_layers=2, max_seq_len=64)


def test_load_recorder_and_aux_loss_in_training():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", **SMALL_MODEL))
    rec = LoadRecorder(model)
    tcfg = TrainConfig(steps=3, batch_size=2, seq_len=16, eval_every=3, eval_batches=1, warmup_steps=1,
                       bias_update_speed=0.0, aux_loss_alpha=1e-4, aux_loss="sequence")
    h = train(model, tcfg, callbacks=[rec], progress=False)
    assert rec.names == ["layers.1.ffn", "mtp.0.block.ffn"]
    assert rec.steps == [1, 2, 3] and len(rec.max_vio) == 3 and len(rec.max_vio[0]) == 2
    assert rec.loads[0].shape == (2, 16)
    assert rec.loads[0][0].sum() == 2 * 16 * 4  # B·T·K picks in the main layer
    assert rec.heatmap(0).shape == (3, 16) and rec.heatmap(0).mean().item() == pytest.approx(1.0)
    assert len(rec.mean_max_vio()) == 3
    # the total includes the aux loss: main + λ·mtp + aux > main + λ·mtp
    for loss, main, mtp in zip(h.loss, h.main_loss, h.mtp_loss):
        aux = loss - main - tcfg.mtp_lambda * mtp[0]
        assert 0 < aux < 3e-4  # two gates, ≈ α each
    assert all(len(g._forward_hooks) == 0 for g in model.modules() if isinstance(g, Gate))  # hooks gone


def test_affinity_recorder_means_the_training_scores():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", **SMALL_MODEL))
    aff = AffinityRecorder(model)
    seen = []  # the same quantity, gathered independently: every training forward's scores
    hooks = [g.register_forward_hook(lambda m, a, out: seen.append(out.scores.mean().item()) if m.training else None)
             for g in model.modules() if isinstance(g, Gate)]
    tcfg = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, warmup_steps=1)
    train(model, tcfg, callbacks=[aff], progress=False)
    n = len(seen) // 2  # forwards per step (two gates, one forward each)
    assert aff.steps == [1, 2]
    assert aff.mean == pytest.approx([sum(seen[:n]) / n, sum(seen[n:]) / n])
    assert all(0 < v < 1 for v in aff.mean)  # sigmoid affinities
    aff.remove()
    for h in hooks:
        h.remove()
    assert all(len(g._forward_hooks) == 0 for g in model.modules() if isinstance(g, Gate))
    with pytest.raises(ValueError, match="^model: has no MoE gate"):
        AffinityRecorder(torch.nn.Linear(2, 2))


def test_bad_aux_loss_kind():
    with pytest.raises(ValueError, match="^aux_loss"):
        TrainConfig(aux_loss="token")
    with pytest.raises(ValueError, match="^aux_loss_alpha"):
        TrainConfig(aux_loss_alpha=-1.0)


def test_global_max_violation_adds_the_counts_of_all_windows():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", **SMALL_MODEL)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2 * 3 * 16 + 1,), generator=torch.Generator().manual_seed(1))
    res = global_max_violation(model, tokens, batch_size=2, seq_len=16)
    assert res.names == ["layers.1.ffn"]  # main layers only; the MTP block is not run
    assert res.counts.shape == (1, 16) and res.counts.sum().item() == 6 * 16 * 4
    counts = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        for b in range(3):
            x = tokens[b * 32:(b + 1) * 32].view(2, 16)
            with capture_routing(model.layers[1].ffn) as routings:
                model(x, mtp=False)
            counts += _bincount(routings[0].indices)
    assert torch.equal(res.counts[0], counts)
    assert math.isclose(res.max_vio[0], max_violation(counts)) and res.mean_max_vio == res.max_vio[0]
