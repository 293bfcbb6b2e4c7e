"""Checkpoints: our format, training state, atomic writes, Hugging Face layout and FP8 blocks."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3lib import checkpoint as ck
from dsv3lib.checkpoint import (
    dequantize_block_fp8,
    hf_name,
    load,
    load_hf,
    load_training_state,
    load_weights_into,
    quantize_block_fp8,
    restore_rng_states,
    save,
    save_hf,
    save_training_state,
)
from dsv3lib.config import ModelConfig
from dsv3lib.model import Transformer

TINY = dict(vocab_size=64, max_seq_len=32, dim=32, inter_dim=48, n_layers=3, n_dense_layers=1, n_heads=2,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            moe_inter_dim=16, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2,
            n_expert_groups=2, n_limited_groups=1, n_mtp_modules=1)
# FP8 blocks: dims that are not multiples of 128, so edge blocks are partial and most weights span 2 blocks
FP8 = dict(TINY, dim=160, inter_dim=200, q_lora_rank=136, kv_lora_rank=140, moe_inter_dim=136)


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
    with pytest.raises(OSError, match="injected"):
        save_hf(make(), tmp_path / "h")
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


# ------------------------------------------------------------------------------------------ FP8 blocks
def test_fp8_block_quantisation_partial_blocks():
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 260)
    q, scale_inv = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 3)  # ⌈300/128⌉, ⌈260/128⌉

    def block_max(x):  # (3, 3): the largest |x| in each 128×128 block, edge blocks partial
        pad = torch.zeros(384, 384)
        pad[:300, :260] = x.abs()
        return pad.view(3, 128, 3, 128).amax(dim=(1, 3))

    err = dequantize_block_fp8(q, scale_inv) - w
    assert (block_max(err) <= block_max(w) / 16).all()  # 3 mantissa bits: ≤ 2^-4 of the block's max
    assert torch.allclose(scale_inv, block_max(w) / 448)
    # a hand-made case: one scale per block, edge blocks partial
    ones = torch.ones(130, 129).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    deq = dequantize_block_fp8(ones, s)
    assert deq[127, 127] == 1 and deq[127, 128] == 2 and deq[129, 0] == 3 and deq[129, 128] == 4
    with pytest.raises(ValueError, match=re.escape("scale_inv: shape (1, 2), expected (2, 2)")):
        dequantize_block_fp8(ones, s[:1])


# --------------------------------------------------------------------------------------- Hugging Face
def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 0}, {"tie_embeddings": True}])
def test_hf_round_trip_fp32(tmp_path, overrides):
    model = make(**overrides)
    save_hf(model, tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == "deepseek_v3" and "quantization_config" not in hf_cfg
    names = hf_tensors(tmp_path / "hf").keys()
    assert ("model.layers.0.self_attn.q_proj.weight" in names) == (overrides.get("q_lora_rank") == 0)
    assert ("lm_head.weight" in names) != bool(overrides.get("tie_embeddings"))
    assert_same(model, load_hf(tmp_path / "hf"))


def test_hf_bf16_shards(tmp_path):
    model = make()
    for t in model.state_dict(keep_vars=True).values():  # not model.to(): that would also cast freqs_cis
        t.data = t.data.to(torch.bfloat16)
    ref = model.state_dict()
    save_hf(model, tmp_path / "hf", shard_bytes=20_000)
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 2
    loaded = load_hf(tmp_path / "hf", dtype=torch.bfloat16)
    for n, t in loaded.state_dict().items():
        assert torch.equal(t, ref[n].to(t.dtype)), n


def test_hf_fp8_round_trip(tmp_path):
    model = make(**FP8)
    save_hf(model, tmp_path / "hf", fp8=True, shard_bytes=200_000)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["quantization_config"]["weight_block_size"] == [128, 128]
    stored = hf_tensors(tmp_path / "hf")
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)  # 144×160
    assert stored["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"].shape == (2, 2)  # 160×136
    for bf16 in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.3.eh_proj.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias"]:
        assert stored[bf16].dtype == torch.float32 and bf16 + "_scale_inv" not in stored, bf16
    loaded = load_hf(tmp_path / "hf")
    got = loaded.state_dict()
    for n, t in model.state_dict().items():
        err = (got[n] - t).abs().max()
        assert err <= t.abs().max() / 16, n  # per block ≤ 2^-4 of its max, so also per tensor
    x = tokens()
    a, b = model(x), loaded(x)
    for la, lb in zip([a.logits, *a.mtp_logits], [b.logits, *b.mtp_logits]):
        assert (la - lb).norm() / la.norm() < 0.1


def test_hf_block_size_from_config(tmp_path):
    model = make(**FP8)
    save_hf(model, tmp_path / "hf", fp8=True, block=(64, 32))
    assert hf_tensors(tmp_path / "hf")["model.layers.0.self_attn.o_proj.weight_scale_inv"].shape == (3, 1)
    loaded = load_hf(tmp_path / "hf")
    w = model.layers[0].attn.wo.weight
    assert (loaded.layers[0].attn.wo.weight - w).abs().max() <= w.abs().max() / 16


def test_hf_name_examples():
    assert hf_name("layers.1.ffn.experts.3.w1.weight", 61) == "model.layers.1.mlp.experts.3.gate_proj.weight"
    wkv_a = "model.layers.61.self_attn.kv_a_proj_with_mqa.weight"
    assert hf_name("mtp.0.block.attn.wkv_a.weight", 61) == wkv_a
    assert hf_name("mtp.0.norm.weight", 61) == "model.layers.61.shared_head.norm.weight"
    with pytest.raises(ValueError, match="layers.0.attn.rotary.weight: no Hugging Face name"):
        hf_name("layers.0.attn.rotary.weight", 61)


def test_hf_first_layers_only(tmp_path):
    model = make(n_layers=4)
    save_hf(model, tmp_path / "hf")
    part = load_hf(tmp_path / "hf", n_layers=2)
    assert len(part.layers) == 2 and part.cfg.n_layers == 2
    full_sd = model.state_dict()
    for n, t in part.state_dict().items():
        assert torch.equal(t, full_sd[n]), n  # MTP module still comes from HF layer 4


def hand_written_hf(cfg: ModelConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A DeepSeek-V3 state dict written with the release's own names, independent of dsv3lib's mapping."""
    def r(*shape):
        return torch.randn(*shape, generator=g)
    d, h, L = cfg.dim, cfg.n_heads, cfg.n_layers
    sd = {"model.embed_tokens.weight": r(cfg.vocab_size, d), "model.norm.weight": r(d),
          "lm_head.weight": r(cfg.vocab_size, d)}
    for i in range(L + cfg.n_mtp_modules):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": r(d), p + "post_attention_layernorm.weight": r(d),
               p + "self_attn.q_a_proj.weight": r(cfg.q_lora_rank, d),
               p + "self_attn.q_a_layernorm.weight": r(cfg.q_lora_rank),
               p + "self_attn.q_b_proj.weight": r(h * cfg.qk_head_dim, cfg.q_lora_rank),
               p + "self_attn.kv_a_proj_with_mqa.weight": r(cfg.kv_lora_rank + cfg.qk_rope_head_dim, d),
               p + "self_attn.kv_a_layernorm.weight": r(cfg.kv_lora_rank),
               p + "self_attn.kv_b_proj.weight": r(h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                                   cfg.kv_lora_rank),
               p + "self_attn.o_proj.weight": r(d, h * cfg.v_head_dim),
               p + "self_attn.rotary_emb.inv_freq": r(cfg.qk_rope_head_dim // 2)}
        if i < cfg.n_dense_layers:
            sd |= {p + "mlp.gate_proj.weight": r(cfg.inter_dim, d),
                   p + "mlp.up_proj.weight": r(cfg.inter_dim, d),
                   p + "mlp.down_proj.weight": r(d, cfg.inter_dim)}
            continue
        sd |= {p + "mlp.gate.weight": r(cfg.n_routed_experts, d),
               p + "mlp.gate.e_score_correction_bias": r(cfg.n_routed_experts)}
        for e in [f"experts.{j}" for j in range(cfg.n_routed_experts)] + ["shared_experts"]:
            sd |= {p + f"mlp.{e}.gate_proj.weight": r(cfg.moe_inter_dim, d),
                   p + f"mlp.{e}.up_proj.weight": r(cfg.moe_inter_dim, d),
                   p + f"mlp.{e}.down_proj.weight": r(d, cfg.moe_inter_dim)}
        if i >= L:  # the MTP layer, with copies of the embedding and head
            sd |= {p + "enorm.weight": r(d), p + "hnorm.weight": r(d), p + "eh_proj.weight": r(d, 2 * d),
                   p + "shared_head.norm.weight": r(d),
                   p + "embed_tokens.weight": sd["model.embed_tokens.weight"],
                   p + "shared_head.head.weight": sd["lm_head.weight"]}
    return sd


def write_hf_dir(path: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], quant: bool = False):
    """Two shards + model.safetensors.index.json, as the release is laid out."""
    path.mkdir()
    quant_cfg = {"quantization_config": {"weight_block_size": [128, 128]}} if quant else {}
    hf_cfg = cfg.to_hf_config() | quant_cfg
    (path / "config.json").write_text(json.dumps(hf_cfg))
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: sd[n].clone().contiguous() for n in part}, path / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_hf_real_names_literally(tmp_path):
    cfg = ModelConfig(**TINY)
    sd = hand_written_hf(cfg, torch.Generator().manual_seed(0))
    write_hf_dir(tmp_path / "hf", cfg, sd)
    model = load_hf(tmp_path / "hf")
    layer2, mtp = model.layers[2], model.mtp[0]
    checks = {
        "model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.head.weight,
        "model.layers.0.input_layernorm.weight": model.layers[0].attn_norm.weight,
        "model.layers.0.post_attention_layernorm.weight": model.layers[0].ffn_norm.weight,
        "model.layers.0.mlp.gate_proj.weight": model.layers[0].ffn.w1.weight,
        "model.layers.0.mlp.down_proj.weight": model.layers[0].ffn.w2.weight,
        "model.layers.0.mlp.up_proj.weight": model.layers[0].ffn.w3.weight,
        "model.layers.2.self_attn.q_a_proj.weight": layer2.attn.wq_a.weight,
        "model.layers.2.self_attn.q_a_layernorm.weight": layer2.attn.q_norm.weight,
        "model.layers.2.self_attn.q_b_proj.weight": layer2.attn.wq_b.weight,
        "model.layers.2.self_attn.kv_a_proj_with_mqa.weight": layer2.attn.wkv_a.weight,
        "model.layers.2.self_attn.kv_a_layernorm.weight": layer2.attn.kv_norm.weight,
        "model.layers.2.self_attn.kv_b_proj.weight": layer2.attn.wkv_b.weight,
        "model.layers.2.self_attn.o_proj.weight": layer2.attn.wo.weight,
        "model.layers.1.mlp.gate.weight": model.layers[1].ffn.gate.weight,
        "model.layers.1.mlp.gate.e_score_correction_bias": model.layers[1].ffn.gate.bias,
        "model.layers.1.mlp.experts.3.gate_proj.weight": model.layers[1].ffn.experts[3].w1.weight,
        "model.layers.1.mlp.experts.3.down_proj.weight": model.layers[1].ffn.experts[3].w2.weight,
        "model.layers.1.mlp.experts.3.up_proj.weight": model.layers[1].ffn.experts[3].w3.weight,
        "model.layers.2.mlp.shared_experts.gate_proj.weight": layer2.ffn.shared_experts.w1.weight,
        "model.layers.2.mlp.shared_experts.down_proj.weight": layer2.ffn.shared_experts.w2.weight,
        "model.layers.2.mlp.shared_experts.up_proj.weight": layer2.ffn.shared_experts.w3.weight,
        "model.layers.3.enorm.weight": mtp.enorm.weight, "model.layers.3.hnorm.weight": mtp.hnorm.weight,
        "model.layers.3.eh_proj.weight": mtp.eh_proj.weight,
        "model.layers.3.shared_head.norm.weight": mtp.norm.weight,
        "model.layers.3.input_layernorm.weight": mtp.block.attn_norm.weight,
        "model.layers.3.self_attn.kv_b_proj.weight": mtp.block.attn.wkv_b.weight,
        "model.layers.3.mlp.gate.e_score_correction_bias": mtp.block.ffn.gate.bias,
        "model.layers.3.mlp.experts.1.up_proj.weight": mtp.block.ffn.experts[1].w3.weight,
    }
    for name, ours in checks.items():
        assert torch.equal(sd[name], ours), name
    # every one of our tensors has a hand-written HF twin with equal values (nothing silently left at init)
    for n, t in model.state_dict().items():
        assert torch.equal(sd[hf_name(n, cfg.n_layers)], t), n
    # and save_hf writes exactly the release's names (less the RoPE buffers we never store)
    save_hf(model, tmp_path / "out")
    assert set(hf_tensors(tmp_path / "out")) == {n for n in sd if not n.endswith("inv_freq")}


def test_hf_errors_name_the_tensor(tmp_path):
    cfg = ModelConfig(**TINY)
    base = hand_written_hf(cfg, torch.Generator().manual_seed(0))

    def attempt(name, edit, quant=False, strict=True):
        sd = dict(base)
        edit(sd)
        write_hf_dir(tmp_path / name, cfg, sd, quant)
        return load_hf(tmp_path / name, strict=strict)

    with pytest.raises(ValueError, match=re.escape(
            "model.layers.2.self_attn.kv_b_proj.weight (ours: layers.2.attn.wkv_b.weight): missing from")):
        attempt("missing", lambda sd: sd.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(ValueError, match=re.escape(
            "model.layers.0.self_attn.q_a_proj.weight (ours: layers.0.attn.wq_a.weight): "
            "shape (8, 32) in checkpoint, model expects (16, 32)")):
        attempt("shape", lambda sd: sd.update(
            {"model.layers.0.self_attn.q_a_proj.weight": torch.ones(8, 32)}))
    extra = {"model.layers.1.mlp.experts.9.up_proj.weight": torch.ones(2)}
    unexpected = "model.layers.1.mlp.experts.9.up_proj.weight: unexpected"
    with pytest.raises(ValueError, match=re.escape(unexpected)):
        attempt("unexpected", lambda sd: sd.update(extra))
    attempt("lenient", lambda sd: sd.update(extra), strict=False)

    fp8_name = "model.layers.1.mlp.experts.2.down_proj.weight"
    q, s = quantize_block_fp8(base[fp8_name])
    with pytest.raises(ValueError, match=re.escape(
            f"{fp8_name} (ours: layers.1.ffn.experts.2.w2.weight): float8 tensor without its "
            f"{fp8_name}_scale_inv")):
        attempt("noscale", lambda sd: sd.update({fp8_name: q}), quant=True)
    bad_scale = f"{fp8_name}_scale_inv: shape (2, 1) in checkpoint, expected (1, 1)"
    with pytest.raises(ValueError, match=re.escape(bad_scale)):
        attempt("badscale", lambda sd: sd.update({fp8_name: q, fp8_name + "_scale_inv": s.repeat(2, 1)}),
                quant=True)
    model = attempt("goodscale", lambda sd: sd.update({fp8_name: q, fp8_name + "_scale_inv": s}), quant=True)
    assert torch.equal(model.layers[1].ffn.experts[2].w2.weight, q.float() * s)

    # strict=False zero-fills a missing correction bias (V2-style checkpoints have none); strict fails
    no_bias = lambda sd: sd.pop("model.layers.1.mlp.gate.e_score_correction_bias")  # noqa: E731
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        attempt("nobias", no_bias)
    assert attempt("nobias_lenient", no_bias, strict=False).layers[1].ffn.gate.bias.abs().sum() == 0

    with pytest.raises(ValueError, match=re.escape("model.layers.3.embed_tokens.weight: shape (64, 16)")):
        attempt("badcopy", lambda sd: sd.update({"model.layers.3.embed_tokens.weight": torch.ones(64, 16)}))
    attempt("nocopies", lambda sd: [sd.pop(f"model.layers.3.{n}.weight")
                                    for n in ("embed_tokens", "shared_head.head")])

    save_hf(make(), tmp_path / "gone")
    (tmp_path / "gone" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "gone")
    write_hf_dir(tmp_path / "noshard", cfg, base)
    (tmp_path / "noshard" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf(tmp_path / "noshard")


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
