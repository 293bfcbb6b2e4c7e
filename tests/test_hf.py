"""The Hugging Face DeepSeek-V3 layout (dsv3lib.hf): names, shards, FP8 blocks, round trips, errors that
name the tensor. Logits against an independent implementation: test_hf_fidelity.py."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_checkpoint import TINY, assert_same, make, tokens

from dsv3lib import hf
from dsv3lib.config import ModelConfig
from dsv3lib.fp8 import weight_quant_ref
from dsv3lib.hf import hf_name, load_hf, save_hf

# FP8 blocks: dims that are not multiples of 128, so edge blocks are partial and most weights span 2 blocks
FP8 = dict(TINY, dim=160, inter_dim=200, q_lora_rank=136, kv_lora_rank=140, moe_inter_dim=136)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError, match="injected"):
        save_hf(make(), tmp_path / "h")
    assert list(tmp_path.iterdir()) == []


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
    save_hf(model, tmp_path / "hf", fp8=True, block=64)
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


def write_hf_dir(path: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], quant: bool = False, **hf_keys):
    """Two shards + model.safetensors.index.json, as the release is laid out."""
    path.mkdir()
    quant_cfg = {"quantization_config": {"weight_block_size": [128, 128]}} if quant else {}
    hf_cfg = cfg.to_hf_config() | quant_cfg | hf_keys
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
    q, s = weight_quant_ref(base[fp8_name])
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


def test_fp8_zero_block_round_trips_to_zeros(tmp_path):
    """fp8.quant's rule, which the checkpoints share: an all-zero block is stored with scale 1 (float32)."""
    model = make(**FP8)
    w = model.layers[0].attn.wkv_a.weight  # (144, 160): blocks (0, 0), (0, 1), (1, 0), (1, 1)
    with torch.no_grad():
        w[:128, 128:] = 0
    save_hf(model, tmp_path / "hf", fp8=True)
    s = hf_tensors(tmp_path / "hf")["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert s.dtype == torch.float32 and torch.isfinite(s).all() and s[0, 1] == 1
    got = load_hf(tmp_path / "hf").layers[0].attn.wkv_a.weight
    assert torch.equal(got[:128, 128:], torch.zeros(128, 32))
    assert (got - w).abs().max() <= w.abs().max() / 16


def test_greedy_checkpoints_route_without_a_bias(tmp_path):
    cfg = ModelConfig(**TINY)
    base = hand_written_hf(cfg, torch.Generator().manual_seed(0))
    greedy = {k: v for k, v in base.items() if not k.endswith("e_score_correction_bias")}
    write_hf_dir(tmp_path / "greedy", cfg, greedy, topk_method="greedy")
    model = load_hf(tmp_path / "greedy")
    assert model.cfg.n_expert_groups == 1 and model.layers[1].ffn.gate.bias.abs().sum() == 0
    write_hf_dir(tmp_path / "stray", cfg, base, topk_method="greedy")
    with pytest.raises(ValueError, match=r"^model\.layers\.\d\.mlp\.gate\.e_score_correction_bias: a correction "
                                         r"bias, but topk_method 'greedy' routes without one$"):
        load_hf(tmp_path / "stray")


def test_paper_rule_cannot_be_saved_where_it_routes_differently(tmp_path):
    with pytest.raises(ValueError, match="^group_score: 'paper' ranks groups by their top 1"):
        save_hf(make(group_score="paper", n_routed_experts=8, n_expert_groups=4, n_limited_groups=2), tmp_path)
    save_hf(make(group_score="paper", n_activated_experts=2, n_expert_groups=2, n_limited_groups=1), tmp_path / "ok")
