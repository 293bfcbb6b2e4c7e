"""load_hf reproduces the released implementations' logits on what a DeepSeek-V3 config.json can express.

Each case writes random weights under the release's names (fp32, bf16 or FP8 blocks; two shards + index)
with a config.json, loads them with ``dsv3lib.hf.load_hf`` and compares the logits with
``tests/hf_reference.py``, a forward pass written from Hugging Face's config keys that imports nothing
from dsv3lib. Values the library cannot reproduce must fail with one line naming the config key.
"""

import json
import re

import pytest
import torch
from hf_reference import forward, random_weights, write_checkpoint

from dsv3lib.hf import load_hf
from dsv3lib.model import Gate

BASE = dict(  # every key the reference reads; tiny sizes
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_act="silu", attention_bias=False,
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc",
    norm_topk_prob=True, routed_scaling_factor=2.5, moe_layer_freq=1, num_nextn_predict_layers=1,
    max_position_embeddings=64, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
    tie_word_embeddings=False, initializer_range=0.02,
)
YARN = dict(max_position_embeddings=256, rope_scaling=dict(
    type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1, mscale=1.0,
    mscale_all_dim=1.0))
FP8_DIMS = dict(hidden_size=160, intermediate_size=136, moe_intermediate_size=136, q_lora_rank=136,
                kv_lora_rank=140, num_attention_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=16, v_head_dim=64)

CASES = {  # name: (config overrides, storage)
    "v3-routing+yarn": (dict(**YARN), {}),  # sigmoid, bias, 4 groups keep 2, top-4 (K/M = 2 = top-2)
    "top2-not-paper": (dict(num_experts_per_tok=2), {}),  # K/M = 1: the paper's rule ranks by the best one
    "K/M=3": (dict(n_routed_experts=16, num_experts_per_tok=6, first_k_dense_replace=2, **YARN), {}),
    "softmax,q-null,0-shared,all-moe,unnormalised": (dict(
        scoring_func="softmax", q_lora_rank=None, n_shared_experts=0, first_k_dense_replace=0,
        norm_topk_prob=False, routed_scaling_factor=1.5), {}),
    "greedy-softmax-2-shared(V2-Lite)": (dict(
        topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=1.0, n_shared_experts=2, q_lora_rank=None, num_experts_per_tok=2), {}),
    "dense-trunk,top-1": (dict(first_k_dense_replace=3, num_experts_per_tok=1, n_group=2, topk_group=1), {}),
    "top-1-unnormalised,no-groups": (dict(num_experts_per_tok=1, n_group=1, topk_group=1,
                                          norm_topk_prob=False), {}),
    "yarn-mscale-0.707,non-interleaved,tied,bf16": (dict(
        max_position_embeddings=256, rope_interleave=False, tie_word_embeddings=True, rope_theta=500.0,
        rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=32, mscale=0.707,
                          mscale_all_dim=0.707)), dict(dtype=torch.bfloat16)),
    "fp8-blocks,K/M=3,2-shared": (dict(FP8_DIMS, n_routed_experts=8, n_group=2, topk_group=1,
                                       num_experts_per_tok=3, n_shared_experts=2, **YARN), dict(fp8=True)),
    "no-mtp-tensors(transformers-saved)": (dict(num_experts_per_tok=2, n_group=2, topk_group=1),
                                           dict(mtp_layers=False)),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def build(tmp_path, overrides, storage, seed=0):
    cfg = {**BASE, **overrides}
    weights = random_weights(cfg, seed, mtp_layers=storage.get("mtp_layers", True))
    held = write_checkpoint(tmp_path / "hf", cfg, weights, dtype=storage.get("dtype", torch.float32),
                            fp8=storage.get("fp8", False))
    return cfg, held


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_the_reference(tmp_path, name):
    overrides, storage = CASES[name]
    cfg, held = build(tmp_path, overrides, storage)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    ref = forward(cfg, held, tokens)
    model = load_hf(tmp_path / "hf")
    with torch.no_grad():
        ours = model(tokens, mtp=False).logits
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-5, name
    assert len(model.mtp) == (cfg["num_nextn_predict_layers"] if storage.get("mtp_layers", True) else 0)


def test_the_grid_would_see_the_paper_rule(tmp_path):
    """Where K_r/M ≠ 2 the paper's group rule routes differently: the comparison above would fail."""
    cfg, held = build(tmp_path, *CASES["top2-not-paper"])
    tokens = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    model = load_hf(tmp_path / "hf")
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.cfg = gate.cfg.replace(group_score="paper")
    with torch.no_grad():
        assert rel_err(model(tokens, mtp=False).logits, forward(cfg, held, tokens)) > 1e-3


NO_YARN_ALL_DIM = dict(max_position_embeddings=256, rope_scaling=dict(type="yarn", factor=4.0, mscale=1.0,
                                                                       original_max_position_embeddings=64))


@pytest.mark.parametrize("overrides, message", [
    (dict(topk_method="group_limited_greedy"), "topk_method: 'group_limited_greedy' (DeepSeek-V2"),
    (dict(hidden_act="gelu"), "hidden_act: only 'silu'"),
    (dict(attention_bias=True), "attention_bias: only False"),
    (dict(moe_layer_freq=2), "moe_layer_freq: only 1"),
    (dict(num_key_value_heads=1), "num_key_value_heads: must equal num_attention_heads=2"),
    (dict(scoring_func="tanh"), "scoring_func (score_func): must be one of"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace (n_dense_layers): 4 exceeds n_layers=3"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok (n_activated_experts): 5 exceeds the 4 experts"),
    (dict(n_group=None), "n_group: null is not supported"),
    (NO_YARN_ALL_DIM, "rope_scaling.mscale_all_dim: transformers would scale the RoPE dims' logits by 1.29"),
    (dict(YARN, rope_scaling=dict(YARN["rope_scaling"], mscale_all_dim=0.707)), "rope_scaling.mscale_all_dim:"),
    (dict(rope_scaling=dict(YARN["rope_scaling"])), "rope_scaling.original_max_position_embeddings: 64 >= max_"),
    (dict(rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling.type: only 'yarn'"),
    (dict(rope_interleave="yes"), "rope_interleave: must be true or false"),
    (dict(quantization_config=dict(weight_block_size=[128, 64])), "quantization_config.weight_block_size:"),
])
def test_what_cannot_be_honoured_fails_in_one_line(tmp_path, overrides, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **overrides}))  # refused before any tensor
    with pytest.raises(ValueError, match="^" + re.escape(message)) as err:
        load_hf(tmp_path)
    assert "\n" not in str(err.value)
