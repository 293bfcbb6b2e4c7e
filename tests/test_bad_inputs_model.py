"""Bad inputs to the public API of config, model, generation, speculative decoding and FP8 (issue 18).

Every case must fail with one ``TypeError``/``ValueError`` line that starts with (or names) the bad
argument or field, before any wrong number comes out. Inputs that can be read unambiguously (lists and
NumPy arrays of ids, NumPy scalars in a config) are converted, and the conversion is checked too.
"""

import math
import re

import numpy as np
import pytest
import torch

from dsv3lib.config import ModelConfig
from dsv3lib.fp8 import gemm, quant
from dsv3lib.generate import generate, sample_next, top_p_filter
from dsv3lib.model import Transformer, mtp_loss
from dsv3lib.speculative import (accept_or_resample, expected_tokens_per_forward, speculative_generate,
                                 teacher_forced_acceptance)

NAN, INF = float("nan"), float("inf")
TINY = dict(vocab_size=64, max_seq_len=32, dim=32, inter_dim=48, n_layers=2, n_heads=2, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16,
            n_routed_experts=4, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1)
HF = dict(  # a small DeepSeek-V3 config.json
    model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
    n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, topk_method="noaux_tc",
    max_position_embeddings=256, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                   beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))


def hf(**changes):
    return lambda env: ModelConfig.from_hf_config({**HF, **changes})


def yarn(**changes):
    return hf(rope_scaling={**HF["rope_scaling"], **changes})


class Env:
    """What the cases call: a tiny model (latent cache), one of another config, FP8 operands."""

    def __init__(self):
        torch.manual_seed(0)
        self.cfg = ModelConfig(**TINY)
        self.model = Transformer(self.cfg).eval()
        self.other = Transformer(self.cfg.replace(kv_lora_rank=8))
        self.tok = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
        self.x = torch.randn(4, 256)
        self.xq, self.xs = quant.act_quant_ref(self.x)
        self.wq, self.ws = quant.weight_quant_ref(torch.randn(256, 256))

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)


@pytest.fixture(scope="module")
def env():
    return Env()


CASES = {  # name: (call(env), exception type, what the one line must start with)
    # ---------------------------------------------------------------- config
    "hf model_type deepseek_v2": (hf(model_type="deepseek_v2"), ValueError, "model_type:"),
    "hf topk_method group_limited_greedy": (hf(topk_method="group_limited_greedy"), ValueError, "topk_method:"),
    "hf topk_method null": (hf(topk_method=None), ValueError, "topk_method:"),
    "hf hidden_size null": (hf(hidden_size=None), ValueError, "hidden_size:"),
    "hf hidden_size string": (hf(hidden_size="32"), ValueError, "hidden_size (dim):"),
    "hf hidden_size true": (hf(hidden_size=True), ValueError, "hidden_size (dim):"),
    "hf hidden_size negative": (hf(hidden_size=-32), ValueError, "hidden_size (dim):"),
    "hf vocab_size nan": (hf(vocab_size=NAN), ValueError, "vocab_size:"),
    "hf rope_theta nan": (hf(rope_theta=NAN), ValueError, "rope_theta:"),
    "hf rms_norm_eps 0": (hf(rms_norm_eps=0), ValueError, "rms_norm_eps (norm_eps):"),
    "hf routed_scaling_factor nan": (hf(routed_scaling_factor=NAN), ValueError, "routed_scaling_factor"),
    "hf max_position_embeddings 0": (hf(max_position_embeddings=0), ValueError, "max_position_embeddings"),
    "hf yarn factor 0.5": (yarn(factor=0.5), ValueError, "rope_scaling.factor:"),
    "hf yarn factor string": (yarn(factor="4"), ValueError, "rope_scaling.factor:"),
    "hf yarn factor nan": (yarn(factor=NAN), ValueError, "rope_scaling.factor:"),
    "hf yarn mscale string": (yarn(mscale="1", mscale_all_dim="1"), ValueError, "rope_scaling.mscale:"),
    "hf yarn original string": (yarn(original_max_position_embeddings="64"), ValueError,
                                "rope_scaling.original_max_position_embeddings:"),
    "hf yarn beta_fast 0": (yarn(beta_fast=0), ValueError, "rope_scaling.beta_fast"),
    "hf rope_scaling a list": (hf(rope_scaling=[4.0]), TypeError, "rope_scaling:"),
    "hf config None": (lambda env: ModelConfig.from_hf_config(None), TypeError, "hf:"),
    "hf config a path": (lambda env: ModelConfig.from_hf_config("config.json"), TypeError, "hf:"),
    "cfg dim string": (lambda env: ModelConfig(dim="128"), ValueError, "dim:"),
    "cfg route_scale inf": (lambda env: ModelConfig(route_scale=INF), ValueError, "route_scale:"),
    "cfg rope_factor < 1": (lambda env: ModelConfig(rope_factor=0.5), ValueError, "rope_factor:"),
    "cfg unused n_routed_experts -3": (lambda env: ModelConfig(n_layers=1, n_dense_layers=1, n_mtp_modules=0,
                                                               n_routed_experts=-3), ValueError, "n_routed_experts:"),
    "preset a list": (lambda env: ModelConfig.preset(["tiny"]), ValueError, "preset:"),
    "preset unknown override": (lambda env: ModelConfig.preset("tiny", dimm=3), TypeError, "dimm:"),
    "replace unknown field": (lambda env: env.cfg.replace(dimm=3), TypeError, "dimm:"),
    "from_dict None": (lambda env: ModelConfig.from_dict(None), TypeError, "d:"),
    "from_dict a list": (lambda env: ModelConfig.from_dict([("dim", 3)]), TypeError, "d:"),
    # ----------------------------------------------------------------- model
    "Transformer(dict)": (lambda env: Transformer(TINY), TypeError, "cfg:"),
    "tokens a list": (lambda env: env.forward([[1, 2]]), TypeError, "tokens:"),
    "tokens float": (lambda env: env.forward(env.tok.float()), ValueError, "tokens:"),
    "tokens empty batch": (lambda env: env.forward(torch.zeros(0, 3, dtype=torch.long)), ValueError, "tokens:"),
    "tokens id >= vocab": (lambda env: env.forward(torch.tensor([[1, 64]])), ValueError, "tokens: id 64"),
    "start_pos float": (lambda env: env.forward(env.tok, 1.5, env.model.new_cache(1)), TypeError, "start_pos:"),
    "start_pos negative": (lambda env: env.forward(env.tok, -1, env.model.new_cache(1)), ValueError, "start_pos:"),
    "start_pos past the filled cache": (lambda env: env.forward(env.tok, 3, env.model.new_cache(1)), ValueError,
                                        "start_pos: 3 is past the 0 positions"),
    "cache of another config": (lambda env: env.forward(env.tok, 0, env.other.new_cache(1)), ValueError,
                                "cache[0]:"),
    "cache of the MTP modules": (lambda env: env.forward(env.tok, 0, env.model.new_cache(1, mtp=True)),
                                 ValueError, "cache:"),
    "cache not a list": (lambda env: env.forward(env.tok, 0, torch.zeros(3)), TypeError, "cache:"),
    "new_cache batch_size 0": (lambda env: env.model.new_cache(0), ValueError, "batch_size:"),
    "new_cache max_len 1.5": (lambda env: env.model.new_cache(1, 1.5), TypeError, "max_len:"),
    "mtp_loss labels shape": (lambda env: mtp_loss(env.forward(env.tok), env.tok[:, 1:]), ValueError, "labels:"),
    "mtp_loss labels >= vocab": (lambda env: mtp_loss(env.forward(env.tok), env.tok + 64), ValueError, "labels:"),
    "mtp_loss mtp_lambda nan": (lambda env: mtp_loss(env.forward(env.tok), env.tok, mtp_lambda=NAN), ValueError,
                                "mtp_lambda:"),
    # -------------------------------------------------------------- generate
    "generate float prompt": (lambda env: generate(env.model, torch.tensor([1.7, 2.2]), 2), TypeError, "prompt:"),
    "generate float list": (lambda env: generate(env.model, [1.7, 2.2], 2), TypeError, "prompt:"),
    "generate bool prompt": (lambda env: generate(env.model, torch.tensor([True]), 2), TypeError, "prompt:"),
    "generate string prompt": (lambda env: generate(env.model, "hello", 2), TypeError, "prompt:"),
    "generate ragged prompt": (lambda env: generate(env.model, [[1, 2], [3]], 2), ValueError, "prompt:"),
    "generate empty prompt": (lambda env: generate(env.model, [], 2), ValueError, "prompt:"),
    "generate prompt too long": (lambda env: generate(env.model, [1] * 33, 0), ValueError, "prompt:"),
    "generate prompt id >= vocab": (lambda env: generate(env.model, [1, 64], 2), ValueError, "tokens: id 64"),
    "generate max_new_tokens -1": (lambda env: generate(env.model, [1], -1), ValueError, "max_new_tokens:"),
    "generate max_new_tokens 2.5": (lambda env: generate(env.model, [1], 2.5), TypeError, "max_new_tokens:"),
    "generate max_new_tokens True": (lambda env: generate(env.model, [1], True), TypeError, "max_new_tokens:"),
    "generate temperature inf": (lambda env: generate(env.model, [1], 2, temperature=INF), ValueError,
                                 "temperature:"),
    "generate temperature nan": (lambda env: generate(env.model, [1], 2, temperature=NAN), ValueError,
                                 "temperature:"),
    "generate temperature None": (lambda env: generate(env.model, [1], 2, temperature=None), TypeError,
                                  "temperature:"),
    "generate top_p 0": (lambda env: generate(env.model, [1], 2, temperature=1.0, top_p=0), ValueError, "top_p:"),
    "generate top_p nan": (lambda env: generate(env.model, [1], 2, top_p=NAN), ValueError, "top_p:"),
    "generate seed 1.5": (lambda env: generate(env.model, [1], 2, temperature=1.0, seed=1.5), TypeError, "seed:"),
    "generate eos_id -1": (lambda env: generate(env.model, [1], 2, eos_id=-1), ValueError, "eos_id:"),
    "generate eos_id >= vocab": (lambda env: generate(env.model, [1], 2, eos_id=64), ValueError, "eos_id:"),
    "generate model a config": (lambda env: generate(env.cfg, [1], 2), TypeError, "model:"),
    "sample_next temperature -1": (lambda env: sample_next(torch.randn(1, 8), -1.0), ValueError, "temperature:"),
    "sample_next NaN logits": (lambda env: sample_next(torch.full((1, 8), NAN), 1.0), ValueError, "logits:"),
    "top_p_filter 0": (lambda env: top_p_filter(torch.full((1, 4), 0.25), 0.0), ValueError, "top_p:"),
    # ------------------------------------------------------------ speculative
    "speculative float prompt": (lambda env: speculative_generate(env.model, torch.tensor([1.5]), 2), TypeError,
                                 "prompt:"),
    "speculative temperature inf": (lambda env: speculative_generate(env.model, [1], 2, temperature=INF),
                                    ValueError, "temperature:"),
    "speculative top_p 1.5": (lambda env: speculative_generate(env.model, [1], 2, top_p=1.5), ValueError, "top_p:"),
    "speculative depth 1.0": (lambda env: speculative_generate(env.model, [1], 2, depth=1.0), TypeError, "depth:"),
    "speculative max_new_tokens None": (lambda env: speculative_generate(env.model, [1], None), TypeError,
                                        "max_new_tokens:"),
    "speculative eos_id string": (lambda env: speculative_generate(env.model, [1], 2, eos_id="x"), TypeError,
                                  "eos_id:"),
    "accept_or_resample shapes": (lambda env: accept_or_resample(torch.ones(4) / 4, torch.ones(5) / 5, 1),
                                  ValueError, "q:"),
    "accept_or_resample token": (lambda env: accept_or_resample(torch.ones(4) / 4, torch.ones(4) / 4, 7),
                                 ValueError, "token:"),
    "expected_tokens depth -1": (lambda env: expected_tokens_per_forward(0.5, -1), ValueError, "depth:"),
    "expected_tokens acceptance None": (lambda env: expected_tokens_per_forward(None, 2), TypeError, "acceptance:"),
    "teacher_forced tokens a list": (lambda env: teacher_forced_acceptance(env.model, [[1, 2, 3]]), TypeError,
                                     "tokens:"),
    # ------------------------------------------------------------------- fp8
    "act_dequant scale shape": (lambda env: quant.act_dequant(env.xq, env.xs[:, :1]), ValueError, "s:"),
    "act_dequant scale columns": (lambda env: quant.act_dequant(env.xq, torch.ones(4, 3)), ValueError, "s:"),
    "act_dequant not fp8": (lambda env: quant.act_dequant(env.x, env.xs), ValueError, "x_fp8:"),
    "weight_dequant scale shape": (lambda env: quant.weight_dequant(env.wq, torch.ones(3, 3)), ValueError, "s:"),
    "weight_dequant 1-D": (lambda env: quant.weight_dequant(env.wq[0], env.ws), ValueError, "w_fp8:"),
    "act_quant block_size 0": (lambda env: gemm.act_quant(env.x, 0), ValueError, "block_size:"),
    "act_quant_ref block_size -1": (lambda env: quant.act_quant_ref(env.x, -1), ValueError, "block_size:"),
    "weight_quant block_size 1.5": (lambda env: gemm.weight_quant(env.x, 1.5), TypeError, "block_size:"),
    "act_quant a list": (lambda env: quant.act_quant_ref([[1.0, 2.0]]), TypeError, "x:"),
    "act_quant 0-d": (lambda env: quant.act_quant_ref(torch.tensor(1.0)), ValueError, "x:"),
    "weight_quant inf": (lambda env: quant.weight_quant_ref(torch.tensor([[1.0, INF]]), name="w"), ValueError, "w:"),
    "weight_quant NaN": (lambda env: gemm.weight_quant(torch.tensor([[1.0, NAN]])), ValueError, "weight:"),
    "weight_quant empty": (lambda env: quant.weight_quant_ref(torch.ones(0, 4)), ValueError, "weight:"),
    "fp8_gemm_ref NaN a_scales": (lambda env: quant.fp8_gemm_ref(env.xq, env.xs * NAN, env.wq, env.ws), ValueError,
                                  "fp8_gemm: a_scales:"),
    "fp8_gemm_ref negative b_scales": (lambda env: quant.fp8_gemm_ref(env.xq, env.xs, env.wq, -env.ws), ValueError,
                                       "fp8_gemm: b_scales:"),
    "fp8_gemm inf b_scales": (lambda env: gemm.fp8_gemm(env.xq, env.xs, env.wq, env.ws * INF), ValueError,
                              "fp8_gemm: b_scales:"),
    "fp8_gemm zero a_scales": (lambda env: gemm.fp8_gemm(env.xq, env.xs * 0, env.wq, env.ws), ValueError,
                               "fp8_gemm: a_scales:"),
    "fp8_gemm block_size 0": (lambda env: gemm.fp8_gemm(env.xq, env.xs, env.wq, env.ws, block_size=0), ValueError,
                              "block_size:"),
    "fp8_gemm out_dtype int": (lambda env: gemm.fp8_gemm(env.xq, env.xs, env.wq, env.ws, out_dtype=torch.int32),
                               ValueError, "out_dtype:"),
    "fp8_gemm a_scales None": (lambda env: gemm.fp8_gemm(env.xq, None, env.wq, env.ws), TypeError,
                               "fp8_gemm: a_scales"),
    "dequant_per_row scale shape": (lambda env: quant.dequant_per_row(env.xq, torch.ones(3, 1)), ValueError, "s:"),
    "fp8_to_float not fp8": (lambda env: quant.fp8_to_float(torch.ones(3)), ValueError, "q:"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_in_one_line_naming_it(env, name):
    call, kind, start = CASES[name]
    with pytest.raises(kind, match="^" + re.escape(start)) as err:
        call(env)
    assert type(err.value) is kind, name  # not a subclass raised deep inside torch
    assert "\n" not in str(err.value), str(err.value)


def test_what_can_be_read_unambiguously_is_converted(env):
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": np.int64(64), "norm_eps": np.float32(1e-6)})
    assert type(cfg.vocab_size) is int and cfg.vocab_size == 64 and type(cfg.norm_eps) is float
    ids = [3, 1, 4, 1, 5]
    want = generate(env.model, torch.tensor(ids), 3)
    assert torch.equal(generate(env.model, ids, 3), want)  # a list
    assert torch.equal(generate(env.model, np.array(ids), 3), want)  # a NumPy array
    assert torch.equal(speculative_generate(env.model, np.array(ids), 3)[0], want)  # greedy: the same tokens
    cache = env.model.new_cache(1)
    with torch.no_grad():
        env.model(torch.tensor([ids]), 0, cache)
        step = env.model(torch.tensor([[2]]), torch.tensor(5), cache).logits  # a 0-d integer tensor position
    assert step.shape == (1, 1, 64) and type(cache[0].filled) is int and cache[0].filled == 6
    assert expected_tokens_per_forward(0.5, 0) == 1.0  # no drafts: one token per forward


def test_greedy_speculation_still_rolls_back_within_the_filled_cache(env):
    """The filled-prefix check must not refuse speculative decoding's re-writes of rejected positions."""
    out, stats = speculative_generate(env.model, [5, 6, 7], 12)
    assert torch.equal(out, generate(env.model, [5, 6, 7], 12)) and stats.new_tokens == 12


def test_hf_values_that_are_good_still_read(env):
    cfg = ModelConfig.from_hf_config(HF)
    assert cfg.rope_factor == 4.0 and cfg.original_seq_len == 64 and cfg.beta_fast == 32
    assert ModelConfig.from_hf_config({**HF, "rope_scaling": {**HF["rope_scaling"], "factor": 1.0}}).rope_factor == 1
    assert ModelConfig.from_hf_config({**HF, "topk_method": "greedy"}).n_expert_groups == 1
    w = torch.randn(200, 136)
    q, s = quant.weight_quant_ref(w)  # the one block quantiser (hf.save_hf uses it)
    assert s.shape == (2, 2) and torch.all(s > 0)
    assert (quant.weight_dequant(q, s) - w).abs().max() <= w.abs().max() / 16
    assert math.isfinite(quant.fp8_gemm_ref(*quant.act_quant_ref(w), q, s).abs().max().item())
