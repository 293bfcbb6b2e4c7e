"""ModelConfig: validation names the field, presets hold the released values, HF config.json maps exactly."""

import math

import pytest

from dsv3lib.config import PRESETS, ModelConfig

# config.json of deepseek-ai/DeepSeek-V3 on Hugging Face (auto_map omitted), keys and values as released.
HF_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

V3_VALUES = dict(  # V3 §4.2 and the released config
    vocab_size=129280, max_seq_len=163840, dim=7168, inter_dim=18432, n_layers=61, n_dense_layers=3,
    norm_eps=1e-6, n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, moe_inter_dim=2048, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
    n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", route_scale=2.5, norm_topk_prob=True,
    rope_theta=10000.0, rope_factor=40.0, original_seq_len=4096, beta_fast=32, beta_slow=1, mscale=1.0,
    n_mtp_modules=1, init_std=0.006, tie_embeddings=False,
)

POSITIVE_INTS = ["vocab_size", "max_seq_len", "dim", "inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                 "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "original_seq_len", "beta_fast",
                 "beta_slow", "moe_inter_dim", "n_routed_experts", "n_activated_experts", "n_expert_groups",
                 "n_limited_groups"]
NON_NEGATIVE_INTS = ["n_dense_layers", "q_lora_rank", "n_shared_experts", "n_mtp_modules"]
POSITIVE_NUMBERS = ["norm_eps", "rope_theta", "rope_factor", "route_scale", "init_std", "mscale"]


def raises_for(field):
    return pytest.raises(ValueError, match=f"^{field}:")


@pytest.mark.parametrize("field", POSITIVE_INTS)
@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", None])
def test_positive_ints(field, bad):
    with raises_for(field):
        ModelConfig(**{field: bad})


@pytest.mark.parametrize("field", NON_NEGATIVE_INTS)
@pytest.mark.parametrize("bad", [-1, 1.0, False, "0"])
def test_non_negative_ints(field, bad):
    with raises_for(field):
        ModelConfig(**{field: bad})


@pytest.mark.parametrize("field", NON_NEGATIVE_INTS)
def test_zero_is_allowed(field):
    assert getattr(ModelConfig(**{field: 0}), field) == 0


@pytest.mark.parametrize("field", POSITIVE_NUMBERS)
@pytest.mark.parametrize("bad", [0, 0.0, -1e-3, True, "1.0", None, float("nan")])
def test_positive_numbers(field, bad):
    with raises_for(field):
        ModelConfig(**{field: bad})


@pytest.mark.parametrize("overrides, field", [
    (dict(n_routed_experts=16, n_expert_groups=3), "n_expert_groups"),  # 16 experts not divisible into 3
    (dict(n_activated_experts=17), "n_activated_experts"),  # more active than routed
    (dict(n_limited_groups=5), "n_limited_groups"),  # more limited groups than groups
    (dict(n_activated_experts=9, n_limited_groups=2), "n_activated_experts"),  # 2 groups × 4 reach only 8
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),  # RoPE rotates pairs
    (dict(n_dense_layers=5), "n_dense_layers"),  # > n_layers=4
    (dict(beta_fast=1, beta_slow=2), "beta_slow"),
    (dict(score_func="softplus"), "score_func"),
    (dict(score_func="Sigmoid"), "score_func"),
    (dict(group_score="top3"), "group_score"),
])
def test_consistency_rules(overrides, field):
    with raises_for(field):
        ModelConfig(**overrides)


def test_moe_fields_ignored_without_moe_layers():
    cfg = ModelConfig(n_layers=2, n_dense_layers=2, n_mtp_modules=0, n_routed_experts=6, n_expert_groups=4)
    assert cfg.n_moe_layers == 0
    with raises_for("n_expert_groups"):  # an MTP block is an MoE block, so MTP re-enables the checks
        cfg.replace(n_mtp_modules=1)


def test_replace_validates_again():
    with raises_for("n_heads"):
        ModelConfig().replace(n_heads=0)


def test_unknown_preset():
    with raises_for("preset"):
        ModelConfig.preset("deepseek-v4")


def test_from_dict_unknown_field():
    with raises_for("n_experts"):
        ModelConfig.from_dict({"dim": 64, "n_experts": 8})
    cfg = ModelConfig.preset("deepseek-v3")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_config_is_frozen():
    with pytest.raises(Exception):
        ModelConfig().dim = 3


def test_presets():
    assert set(PRESETS) >= {"tiny", "deepseek-v3"}
    assert ModelConfig.preset("tiny") == ModelConfig()
    v3 = ModelConfig.preset("deepseek-v3")
    assert v3 == ModelConfig(**V3_VALUES)
    for k, v in V3_VALUES.items():
        assert getattr(v3, k) == v, k
    assert ModelConfig.preset("tiny", dim=64).dim == 64


def test_v3_derived():
    v3 = ModelConfig.preset("deepseek-v3")
    assert v3.qk_head_dim == 192 and v3.n_moe_layers == 58 and v3.experts_per_group == 32
    assert v3.yarn_active
    assert v3.yarn_mscale == pytest.approx(0.1 * math.log(40) + 1)
    assert v3.yarn_mscale == pytest.approx(1.3689, abs=1e-4)
    assert v3.softmax_scale == pytest.approx(0.13523, abs=1e-5)  # paper-facts §1: (1/√192)·m²
    assert v3.softmax_scale == pytest.approx(192**-0.5 * v3.yarn_mscale**2)


def test_tiny_has_no_yarn():
    tiny = ModelConfig.preset("tiny")
    assert not tiny.yarn_active and tiny.yarn_mscale == 1.0
    assert tiny.softmax_scale == pytest.approx(tiny.qk_head_dim**-0.5)
    assert ModelConfig(max_seq_len=8192, original_seq_len=4096).yarn_active
    assert ModelConfig(max_seq_len=8192, original_seq_len=4096, rope_factor=1.0).yarn_mscale == 1.0


def test_real_hf_config_maps_to_preset():
    cfg = ModelConfig.from_hf_config(HF_DEEPSEEK_V3)
    # HF carries no init std (its initializer_range 0.02 is not V3's 0.006, §4.2): everything else is equal
    assert cfg.init_std == ModelConfig().init_std
    assert cfg.replace(init_std=0.006) == ModelConfig.preset("deepseek-v3")


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3"])
def test_hf_round_trip(name):
    cfg = ModelConfig.preset(name)
    hf = cfg.to_hf_config()
    back = ModelConfig.from_hf_config(hf)
    if not cfg.yarn_active:  # written as rope_scaling: null, read back as the same plain RoPE
        assert hf["rope_scaling"] is None
        cfg = cfg.replace(rope_factor=1.0, original_seq_len=cfg.max_seq_len)
    assert back == cfg
    assert hf["num_key_value_heads"] == hf["num_attention_heads"] == cfg.n_heads


def test_hf_round_trip_plain_wq():
    cfg = ModelConfig(q_lora_rank=0)
    hf = cfg.to_hf_config()
    assert hf["q_lora_rank"] is None  # HF spells "no query compression" as null
    assert ModelConfig.from_hf_config(hf) == cfg.replace(rope_factor=1.0, original_seq_len=cfg.max_seq_len)


def test_to_hf_config_matches_real_keys():
    hf = ModelConfig.preset("deepseek-v3").to_hf_config()
    for key, value in HF_DEEPSEEK_V3.items():
        if key in hf and key != "initializer_range":
            assert hf[key] == value, key
    not_model = {"attention_dropout", "aux_loss_alpha", "bos_token_id", "eos_token_id", "ep_size",
                 "initializer_range", "pretraining_tp", "quantization_config", "seq_aux", "torch_dtype",
                 "transformers_version", "use_cache"}
    model_keys = set(HF_DEEPSEEK_V3) - not_model
    assert model_keys <= set(hf), model_keys - set(hf)


def test_hf_config_without_rope_scaling():
    hf = {k: v for k, v in HF_DEEPSEEK_V3.items() if k != "rope_scaling"}
    cfg = ModelConfig.from_hf_config(hf)
    assert not cfg.yarn_active and cfg.rope_factor == 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5)


def test_hf_config_other_rope_scaling_rejected():
    hf = {**HF_DEEPSEEK_V3, "rope_scaling": {"type": "linear", "factor": 4.0}}
    with raises_for("rope_scaling.type"):
        ModelConfig.from_hf_config(hf)


def test_group_score_default_is_the_released_top2():
    assert ModelConfig().group_score == "top2" and ModelConfig.preset("deepseek-v3").group_score_k == 2
    cfg = ModelConfig(n_routed_experts=16, n_activated_experts=6, n_expert_groups=4, n_limited_groups=2)
    assert cfg.group_score_k == 2 and cfg.replace(group_score="paper").group_score_k == 3  # K_r/M = 6 // 2


def test_hf_config_as_transformers_5_writes_it():
    """transformers 5 writes rope_parameters (rope_theta inside) and float betas/factor."""
    scaling = dict(HF_DEEPSEEK_V3["rope_scaling"], beta_fast=32.0, beta_slow=1.0, factor=40.0)
    hf = {k: v for k, v in HF_DEEPSEEK_V3.items() if k not in ("rope_scaling", "rope_theta")}
    cfg = ModelConfig.from_hf_config({**hf, "rope_parameters": {**scaling, "rope_theta": 10000.0}})
    assert cfg.replace(init_std=0.006) == ModelConfig.preset("deepseek-v3")
    assert isinstance(cfg.beta_fast, int)
    plain = ModelConfig.from_hf_config({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert plain.rope_theta == 5e5 and not plain.yarn_active


def test_hf_config_defaults_and_nulls():
    hf = {k: v for k, v in HF_DEEPSEEK_V3.items() if k not in ("max_position_embeddings", "rope_scaling")}
    assert ModelConfig.from_hf_config(hf).max_seq_len == 4096  # DeepseekV3Config's default
    assert ModelConfig.from_hf_config({**HF_DEEPSEEK_V3, "n_shared_experts": None}).n_shared_experts == 0
    greedy = ModelConfig.from_hf_config({**HF_DEEPSEEK_V3, "topk_method": "greedy"})
    assert greedy.n_expert_groups == greedy.n_limited_groups == 1  # greedy: top-k over all experts
