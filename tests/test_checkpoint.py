"""Checkpoints: our format, training state, atomic writes (the Hugging Face layout: test_hf.py)."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3lib import checkpoint as ck
from dsv3lib.checkpoint import (
    load,
    load_training_state,
    load_weights_into,
    restore_rng_states,
    save,
    save_training_state,
)
from dsv3lib.config import ModelConfig
from dsv3lib.hf import save_hf
from dsv3lib.model import Transformer

TINY = dict(vocab_size=64, max_seq_len=32, dim=32, inter_dim=48, n_layers=3, n_dense_layers=1, n_heads=2,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            moe_inter_dim=16, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2,
            n_expert_groups=2, n_limited_groups=1, n_mtp_modules=1)


def make(seed=0, **overrides) -> Transformer:
    """A seeded tiny model with nothing at its default value: random norms and gate biases too."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.dim() == 1:  # norms (ones) and gate biases (zeros) by default
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def tokens(seed=1, vocab=64):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def assert_same(a: Transformer, b: Transformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        assert torch.equal(sa[n], sb[n]), n
    assert torch.equal(a.freqs_cis, b.freqs_cis)
    x = tokens(vocab=a.cfg.vocab_size)
    oa, ob = a(x), b(x)
    assert torch.equal(oa.logits, ob.logits)
    assert all(torch.equal(p, q) for p, q in zip(oa.mtp_logits, ob.mtp_logits, strict=True))


def leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-")))


# ------------------------------------------------------------------------------------------ our format
def test_save_load_round_trip(tmp_path):
    model = make()
    assert model.layers[1].ffn.gate.bias.abs().sum() > 0
    save(model, tmp_path / "ckpt", extra={"step": 7, "tokens_seen": 1234})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta == {"model": model.cfg.to_dict(), "step": 7, "tokens_seen": 1234}
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert "layers.1.ffn.gate.bias" in f.keys() and "mtp.0.block.ffn.gate.bias" in f.keys()
    loaded = load(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    assert_same(model, loaded)
    assert all(not p.is_meta and p.requires_grad for p in loaded.parameters())
    assert leftovers(tmp_path) == []


def test_load_casts_dtype_but_keeps_gate_bias_and_rope_exact(tmp_path):
    save(make(), tmp_path / "c")
    model = load(tmp_path / "c", dtype=torch.bfloat16)
    assert model.embed.weight.dtype == model.layers[0].attn.wkv_a.weight.dtype == torch.bfloat16
    assert model.layers[1].ffn.gate.bias.dtype == torch.float32
    assert model.freqs_cis.dtype == torch.complex64
    assert model(tokens()).logits.dtype == torch.bfloat16


def test_tied_embeddings_round_trip(tmp_path):
    model = make(tie_embeddings=True)
    save(model, tmp_path / "tied")
    with safe_open(tmp_path / "tied" / "model.safetensors", "pt") as f:
        assert "embed.weight" in f.keys() and "head.weight" not in f.keys()  # stored once
    loaded = load(tmp_path / "tied")
    assert loaded.head.weight is loaded.embed.weight
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    assert_same(model, loaded)


def test_overwrite_replaces_whole_directory(tmp_path):
    save(make(seed=0), tmp_path / "c")
    (tmp_path / "c" / "stale.txt").write_text("from an older run")
    save(make(seed=1), tmp_path / "c")
    assert not (tmp_path / "c" / "stale.txt").exists()
    assert_same(make(seed=1), load(tmp_path / "c"))
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------- atomicity
def _boom(*args, **kwargs):
    raise OSError("disk full (injected)")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "save_file", _boom)
    with pytest.raises(OSError, match="injected"):
        save(make(), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_existing_checkpoint(tmp_path, monkeypatch):
    original = make(seed=0)
    save(original, tmp_path / "c", extra={"step": 1})
    monkeypatch.setattr(ck, "save_file", _boom)
    with pytest.raises(OSError, match="injected"):
        save(make(seed=1), tmp_path / "c", extra={"step": 2})
    monkeypatch.undo()
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["c"]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["step"] == 1
    assert_same(original, load(tmp_path / "c"))


def test_failed_training_state_write_keeps_existing(tmp_path, monkeypatch):
    model = make()
    opt = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path / "run", model, opt, step=1)
    monkeypatch.setattr(ck.torch, "save", _boom)  # fails after model.safetensors is already written
    with pytest.raises(OSError, match="injected"):
        save_training_state(tmp_path / "run", model, opt, step=2)
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    assert load_training_state(tmp_path / "run", make(seed=3), opt)["step"] == 1


def test_atomic_write_dir_error_in_body(tmp_path):
    with pytest.raises(RuntimeError, match="body"):
        with ck.atomic_write_dir(tmp_path / "d") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("body failed")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ training state
def _train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 12))
        loss = model(x).logits.float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _opt_sched(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = make()
    opt, sched = _opt_sched(model)
    _train(model, opt, sched, 2)
    save_training_state(tmp_path / "run", model, opt, sched, step=2, extra={"data_pos": 99})
    assert (tmp_path / "run" / "training_state.pt").is_file()

    other = make(seed=5)
    opt2, sched2 = _opt_sched(other)
    params_before = [id(p) for p in other.parameters()]
    info = load_training_state(tmp_path / "run", other, opt2, sched2)
    assert info["step"] == 2 and info["extra"] == {"step": 2, "data_pos": 99}
    assert [id(p) for p in other.parameters()] == params_before  # in place: the optimizer still holds them
    assert_same(model, other)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and sched.state_dict() == sched2.state_dict()
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)

    # the saved RNG states resume the same stream: one more step on each run is identical
    torch.manual_seed(123)
    restore_rng_states(info["rng_states"])
    _train(other, opt2, sched2, 1)
    restore_rng_states(info["rng_states"])
    _train(model, opt, sched, 1)
    assert_same(model, other)


def test_load_weights_into_rejects_other_config(tmp_path):
    save(make(), tmp_path / "c")
    with pytest.raises(ValueError, match=r"config.json: model.route_scale = 1.0, the model has 2.5"):
        load_weights_into(make(route_scale=2.5), tmp_path / "c")


# -------------------------------------------------------------------------------------- load errors
def _rewrite(path: Path, edit):
    with safe_open(path, "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.2.attn.wkv_b.weight"),
     "layers.2.attn.wkv_b.weight: missing from model.safetensors"),
    (lambda t: t.update({"layers.0.attn.wq_a.weight": torch.zeros(64, 32)}),
     "layers.0.attn.wq_a.weight: shape (64, 32) in checkpoint, model expects (16, 32)"),
    (lambda t: t.update({"layers.9.attn.wo.weight": torch.zeros(2)}),
     "layers.9.attn.wo.weight: unexpected in model.safetensors"),
    (lambda t: t.pop("layers.1.ffn.gate.bias"), "layers.1.ffn.gate.bias: missing from model.safetensors"),
])
def test_load_errors_name_the_tensor(tmp_path, edit, message):
    save(make(), tmp_path / "c")
    _rewrite(tmp_path / "c" / "model.safetensors", edit)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load(tmp_path / "c")
    assert "\n" not in str(err.value)


def test_load_missing_files(tmp_path):
    save(make(), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(tmp_path / "c")
    (tmp_path / "c" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="training_state.pt"):
        load_training_state(tmp_path / "c", make())
    save_hf(make(), tmp_path / "h")
    with pytest.raises(ValueError, match="use load_hf"):
        load(tmp_path / "h")


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    """The temporary directory is private (mkdtemp: 0700); the checkpoint it becomes follows the umask."""
    import os
    import stat

    from dsv3lib.checkpoint import save
    from dsv3lib.config import ModelConfig
    from dsv3lib.model import Transformer

    old = os.umask(0o022)
    try:
        save(Transformer(ModelConfig.preset("tiny", n_layers=1, n_dense_layers=1, n_mtp_modules=0)), tmp_path / "ck")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ck" / "model.safetensors").stat().st_mode) == 0o644
