"""Training loop: schedule, loss goes down, exact resume, CLI, callbacks."""

import gc
import json
import weakref

import pytest
import torch

from dsv3lib import checkpoint
from dsv3lib.config import ModelConfig
from dsv3lib.data import load_corpus
from dsv3lib.model import Transformer
from dsv3lib.train import TrainConfig, lr_at, main, train

SMALL = dict(n_layers=2, max_seq_len=64)
FAST = dict(batch_size=4, seq_len=32, eval_every=3, eval_batches=2, warmup_steps=2, lr=3e-3)


def small_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny", **SMALL))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_training_lowers_the_loss():
    model = small_model()
    h = train(model, TrainConfig(steps=30, **FAST), progress=False)
    assert len(h.loss) == 30 and len(h.mtp_loss[0]) == 1
    assert h.val_step == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert sum(h.main_loss[-5:]) / 5 < h.main_loss[0] - 1.0
    assert h.val_loss[-1] < h.val_loss[0]


def test_resume_is_exact(tmp_path):
    # bit-exact only on one intra-op thread, which conftest's autouse fixture guarantees
    tcfg = TrainConfig(steps=6, checkpoint_every=3, **FAST)
    straight = small_model()
    h_straight = train(straight, tcfg, progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_4(info):
        if info.step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(small_model(), tcfg, out=tmp_path / "run", callbacks=[stop_at_4], progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 3

    resumed = small_model(seed=123)  # weights come from the checkpoint
    h_resumed = train(resumed, tcfg, out=tmp_path / "run", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert h_resumed.loss == h_straight.loss and h_resumed.val_loss == h_straight.val_loss


def test_resume_refuses_a_different_train_config(tmp_path):
    train(small_model(), TrainConfig(steps=2, **FAST), out=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="^resume"):
        train(small_model(), TrainConfig(steps=4, **FAST), out=tmp_path / "run", resume=True, progress=False)


def test_callbacks_see_every_step():
    seen = []
    train(small_model(), TrainConfig(steps=3, **FAST), callbacks=[lambda i: seen.append(i.step)], progress=False)
    assert seen == [1, 2, 3]


def _probe_scores(model):
    """A hook on every gate keeping a weak reference to each routing's scores (the aux loss's graph input)."""
    gates = [m for m in model.modules() if type(m).__name__ == "Gate"]
    refs = []
    handles = [g.register_forward_hook(lambda gate, args, r: refs.append(weakref.ref(r.scores))) for g in gates]
    return gates, refs, handles


@pytest.mark.parametrize("fail_at", [None, 2])
def test_the_aux_loss_keeps_no_graph_and_no_hook_after_training(fail_at):
    model = small_model()
    gates, refs, handles = _probe_scores(model)

    def fail(info):
        if info.step == fail_at:
            raise RuntimeError("boom")

    tcfg = TrainConfig(steps=3, aux_loss_alpha=1e-3, **FAST)
    if fail_at is None:
        train(model, tcfg, callbacks=[fail], progress=False)
    else:  # a failing step removes the hooks all the same
        with pytest.raises(RuntimeError, match="boom"):
            train(model, tcfg, callbacks=[fail], progress=False)
    gc.collect()
    assert gates and all(len(g._forward_hooks) == 1 for g in gates)  # only the probe's
    assert len(refs) >= 2 * len(gates)  # the probe saw the training forwards
    assert all(r() is None for r in refs)  # no routing's scores (nor their graph) outlive the steps
    for h in handles:
        h.remove()


def test_callbacks_see_the_loads_of_their_step():
    model = small_model()
    seen, loads = [], []
    gates = [m for m in model.modules() if type(m).__name__ == "Gate"]
    hook = lambda gate, args, r: seen.append(r.indices) if gate.training else None  # noqa: E731
    handles = [g.register_forward_hook(hook) for g in gates]
    tcfg = TrainConfig(steps=3, **FAST)  # evaluates after step 3: its forwards are not the step's
    train(model, tcfg, callbacks=[lambda info: loads.append(info.loads)], progress=False)
    for h in handles:
        h.remove()
    assert len(loads) == 3 and len(seen) == 3 * len(gates)
    for step, counts in enumerate(loads):
        expect = [torch.bincount(ix.flatten(), minlength=16) for ix in seen[step * len(gates):][:len(gates)]]
        assert torch.equal(counts, torch.stack(expect))


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", 0.0), ("batch_size", 0), ("min_lr_ratio", 2.0)])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        TrainConfig(**{field: value})


def test_cli_trains_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "cli"
    main(["--preset", "tiny", "--steps", "2", "--out", str(out), "--batch-size", "2", "--seq-len", "16",
          "--eval-every", "1"])
    assert "val loss" in capsys.readouterr().out
    model = checkpoint.load(out)
    assert model.cfg == ModelConfig.preset("tiny")
    x = load_corpus().val[:17].unsqueeze(0)
    assert torch.isfinite(model(x).logits).all()


def test_loss_free_balancing_runs_by_default_and_moves_only_biases():
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, TrainConfig(steps=3, lr=1e-12, **{k: v for k, v in FAST.items() if k != "lr"}), progress=False)
    bias = model.layers[1].ffn.gate.bias
    assert bias.abs().max() > 0  # γ = 0.01 per step: |b| is a multiple of 0.01 up to 0.03
    assert torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-4) and bias.abs().max() <= 0.03 + 1e-6
    off = small_model()
    train(off, TrainConfig(steps=3, bias_update_speed=0.0, **FAST), progress=False)
    assert off.layers[1].ffn.gate.bias.abs().max() == 0
    assert all(torch.allclose(before[n], p, atol=1e-6) for n, p in model.named_parameters())
