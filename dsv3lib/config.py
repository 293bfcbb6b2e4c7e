"""Model configuration: one documented dataclass, presets as data (chapter 0).

Field names follow DeepSeek's official inference code (``inference/model.py``, ``ModelArgs``) so the code
can be read side by side with it; :meth:`ModelConfig.from_hf_config` / :meth:`ModelConfig.to_hf_config`
translate to and from the Hugging Face ``config.json`` of ``deepseek-ai/DeepSeek-V3``.

Every inconsistent value raises ``ValueError`` in ``__post_init__`` with the field's name first, so a
bad config fails when it is built, not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelConfig", "PRESETS"]

_SCORE_FUNCS = ("sigmoid", "softmax")
_GROUP_SCORES = ("top2", "paper")
_ATTN_IMPLS = ("absorb", "naive")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3-style model.

    Read with paper arXiv 2412.19437 (V3) §2 and §4.2. Derived quantities are properties
    (``qk_head_dim``, ``n_moe_layers``, ``yarn_active``, ``softmax_scale``).
    """

    # vocabulary and sequence
    vocab_size: int = 256
    max_seq_len: int = 256  # longest sequence the model accepts (RoPE table length)

    # trunk
    dim: int = 128  # hidden size d
    inter_dim: int = 384  # hidden width of the dense SwiGLU FFN (first n_dense_layers layers)
    n_layers: int = 4
    n_dense_layers: int = 1  # the first n_dense_layers use a dense FFN, the rest MoE
    norm_eps: float = 1e-6

    # mla (V3 §2.1.1)
    n_heads: int = 4
    q_lora_rank: int = 64  # 0 = no query compression (DeepSeek-V2-Lite style wq)
    kv_lora_rank: int = 64  # d_c: the joint KV latent that inference caches
    qk_nope_head_dim: int = 32  # per-head query/key part without RoPE
    qk_rope_head_dim: int = 16  # decoupled RoPE part (one key shared by all heads)
    v_head_dim: int = 32
    # how attention runs *with a cache* (chapter 2): "absorb" caches only the normed latent c_KV and the
    # shared RoPE key (kv_lora_rank + qk_rope_head_dim numbers per token per layer) and folds wkv_b into
    # the query and output, as DeepSeek's inference code does; "naive" caches expanded per-head K and V.
    # Weights are the same either way; a forward without a cache (training) always expands (naive),
    # which is cheaper for whole sequences. See dsv3lib.model.mla.
    attn_impl: str = "absorb"

    # moe (V3 §2.1.2)
    moe_inter_dim: int = 64  # hidden width of each routed/shared expert
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    n_activated_experts: int = 4  # K_r, routed experts per token
    n_expert_groups: int = 4  # groups (≙ nodes) the routed experts are split into
    n_limited_groups: int = 2  # groups a token may reach (node-limited routing)
    score_func: str = "sigmoid"  # V3: sigmoid; V2: softmax
    route_scale: float = 1.0  # multiplies the normalised routing weights (V3 code: 2.5)
    norm_topk_prob: bool = True  # normalise the selected weights to sum to 1 before route_scale
    # how a group's rank is scored for node-limited routing (chapter 3): "top2" sums its two highest biased
    # scores, as DeepSeek's released inference/model.py and Hugging Face's deepseek_v3 do (the default, and
    # what every checkpoint assumes); "paper" sums its top n_activated_experts // n_limited_groups, the
    # paper's K_r/M wording (V3 §2.1.2). They agree when that ratio is 2, as in V3 (8 // 4).
    group_score: str = "top2"

    # rope / yarn (V3 §4.3; applied to the decoupled RoPE dims only)
    rope_theta: float = 10000.0
    rope_factor: float = 40.0  # YaRN scale s
    original_seq_len: int = 4096  # context the base model was trained on; YaRN is active beyond it
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0  # YaRN attention-temperature coefficient: m = 0.1·mscale·ln(s) + 1

    # mtp (V3 §2.2)
    n_mtp_modules: int = 1  # depth D of multi-token prediction (0 = none)

    # initialisation
    init_std: float = 0.02  # V3 §4.2 uses 0.006 at d=7168
    tie_embeddings: bool = False  # V3 keeps embedding and output head separate

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: no-RoPE part + RoPE part (V3: 128 + 64 = 192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_expert_groups

    @property
    def group_score_k(self) -> int:
        """How many of a group's highest biased scores are summed to rank it (``group_score``)."""
        if self.group_score == "top2":
            return 2
        return max(1, self.n_activated_experts // self.n_limited_groups)

    @property
    def yarn_active(self) -> bool:
        """YaRN rescales RoPE only when the model must run past its original context (official code)."""
        return self.max_seq_len > self.original_seq_len

    @property
    def yarn_mscale(self) -> float:
        """m = 0.1·mscale·ln(s) + 1 if YaRN is active, else 1 (V3 §4.3: √t = 0.1 ln s + 1)."""
        if not self.yarn_active or self.rope_factor <= 1:
            return 1.0
        return 0.1 * self.mscale * math.log(self.rope_factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale 1/√(qk_head_dim), times m² under YaRN (V3: 1/√192 · 1.3689² ≈ 0.13523)."""
        return self.qk_head_dim**-0.5 * self.yarn_mscale**2

    # --------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        positive = [
            "vocab_size", "max_seq_len", "dim", "inter_dim", "n_layers", "n_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "original_seq_len", "beta_fast",
            "beta_slow",
        ]
        for name in positive:
            _check_int(self, name, minimum=1)
        for name in ["n_dense_layers", "q_lora_rank", "n_shared_experts", "n_mtp_modules"]:
            _check_int(self, name, minimum=0)
        for name in ["norm_eps", "rope_theta", "rope_factor", "route_scale", "init_std", "mscale"]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
            if type(value) not in (int, float):  # a NumPy scalar (from_dict of loaded data): store a float
                object.__setattr__(self, name, float(value))
        if self.rope_factor < 1:
            raise ValueError(f"rope_factor: must be >= 1 (YaRN stretches the context, 1 = off), got {self.rope_factor}")
        for name in ["norm_topk_prob", "tie_embeddings"]:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers: {self.n_dense_layers} exceeds n_layers={self.n_layers}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.beta_slow > self.beta_fast:
            raise ValueError(f"beta_slow: {self.beta_slow} must not exceed beta_fast={self.beta_fast}")
        if self.attn_impl not in _ATTN_IMPLS:
            raise ValueError(f"attn_impl: must be one of {_ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.score_func not in _SCORE_FUNCS:
            raise ValueError(f"score_func: must be one of {_SCORE_FUNCS}, got {self.score_func!r}")
        if self.group_score not in _GROUP_SCORES:
            raise ValueError(f"group_score: must be one of {_GROUP_SCORES}, got {self.group_score!r}")
        for name in ["moe_inter_dim", "n_routed_experts", "n_activated_experts", "n_expert_groups",
                     "n_limited_groups"]:
            _check_int(self, name, minimum=1)  # sizes even where unused; how they fit only where used
        if self.n_moe_layers > 0 or self.n_mtp_modules > 0:  # MTP blocks are MoE blocks too
            self._validate_moe()

    def _validate_moe(self) -> None:
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError(f"n_activated_experts: {self.n_activated_experts} exceeds "
                             f"n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError(f"n_expert_groups: n_routed_experts={self.n_routed_experts} is not divisible "
                             f"into {self.n_expert_groups} groups")
        if self.n_limited_groups > self.n_expert_groups:
            raise ValueError(f"n_limited_groups: {self.n_limited_groups} exceeds "
                             f"n_expert_groups={self.n_expert_groups}")
        reachable = self.n_limited_groups * self.experts_per_group
        if self.n_activated_experts > reachable:
            raise ValueError(f"n_activated_experts: {self.n_activated_experts} exceeds the {reachable} experts "
                             f"reachable in n_limited_groups={self.n_limited_groups} groups")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration from :data:`PRESETS`, optionally with fields overridden."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; choose from {sorted(PRESETS)}")
        _check_names(overrides, "override")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        _check_names(changes, "change")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict of ModelConfig fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a ModelConfig field")
        return cls(**d)

    # ------------------------------------------------------- Hugging Face config
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face DeepseekV3 ``config.json`` dict, read the way Hugging Face transformers'
        ``deepseek_v3`` reads it (DeepSeek's own ``inference/model.py`` agrees wherever both apply).

        Keys the dict lacks take ``DeepseekV3Config``'s defaults (DeepSeek-V3's values, 4096 positions,
        plain RoPE). Keys that describe the run or the files, not the function (``bos_token_id``,
        ``quantization_config``, ``rope_interleave``, ...), are ignored here; :mod:`dsv3lib.hf` reads the
        file-layout ones. A value whose logits the library cannot reproduce raises ``ValueError`` with one
        line that starts with the Hugging Face key (and ours in brackets where they differ).
        """
        if not isinstance(hf, dict):
            raise TypeError(f"hf: expected the dict of a config.json, got {type(hf).__name__}")
        _check_hf_constants(hf)
        kw: dict[str, Any] = dict(PRESETS["deepseek-v3"], max_seq_len=4096)
        for ours, theirs in _HF_FIELDS.items():
            if theirs in hf and hf[theirs] is None and theirs not in _HF_NULLABLE:
                raise ValueError(f"{theirs}: null is not supported")
            if theirs in hf and hf[theirs] is not None:
                kw[ours] = hf[theirs]
        if "q_lora_rank" in hf and hf["q_lora_rank"] is None:  # no query compression: one wq
            kw["q_lora_rank"] = 0
        if "n_shared_experts" in hf and hf["n_shared_experts"] is None:  # as DeepSeek's remote code reads it
            kw["n_shared_experts"] = 0
        method = hf.get("topk_method", "noaux_tc")
        if method == "greedy":  # plain top-k over all experts, no correction bias (DeepSeek-V2-Lite)
            kw.update(n_expert_groups=1, n_limited_groups=1)
        elif method != "noaux_tc":  # noaux_tc: bias for the choice, groups ranked by their top-2 (V3)
            why = " (DeepSeek-V2: groups ranked by their best score, no bias)" * (method == "group_limited_greedy")
            raise ValueError(f"topk_method: {method!r}{why} is not supported; expected 'noaux_tc' or 'greedy'")
        max_len = kw["max_seq_len"]
        if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
            raise ValueError(f"max_position_embeddings (max_seq_len): must be an integer >= 1, got {max_len!r}")
        kw.update(_hf_rope(hf, max_len))
        if "n_routed_experts" in hf and hf["n_routed_experts"] is None:  # a dense model
            kw.update(n_dense_layers=kw["n_layers"], n_mtp_modules=0, n_routed_experts=1,
                      n_activated_experts=1, n_expert_groups=1, n_limited_groups=1)
        ints = {f.name for f in dataclasses.fields(cls) if f.type == "int"}
        kw = {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in kw.items()}
        try:
            return cls(**kw, group_score="top2")
        except ValueError as err:  # name the key the reader wrote, not only ours
            field, _, rest = str(err).partition(":")
            theirs = _HF_FIELDS.get(field) or _HF_YARN_FIELDS.get(field)
            theirs = f"rope_scaling.{theirs}" if field in _HF_YARN_FIELDS else theirs
            raise ValueError(f"{theirs} ({field}):{rest}" if theirs and theirs != field else str(err)) from None

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face DeepseekV3 ``config.json`` dict describing this model. ``group_score="paper"``
        raises where it routes differently from the released top-2 rule (config.json cannot say it)."""
        epg = self.experts_per_group
        ranked = (self.n_moe_layers or self.n_mtp_modules) and self.n_limited_groups < self.n_expert_groups
        if ranked and min(self.group_score_k, epg) != min(2, epg):
            raise ValueError(f"group_score: {self.group_score!r} ranks groups by their top {self.group_score_k}; "
                             f"a Hugging Face config.json can only mean the released top-2 rule")
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_act": "silu",
            "num_key_value_heads": self.n_heads,
            "moe_layer_freq": 1,
            "topk_method": "noaux_tc",
            "attention_bias": False,
        }
        for ours, theirs in _HF_FIELDS.items():
            hf[theirs] = getattr(self, ours)
        if self.q_lora_rank == 0:
            hf["q_lora_rank"] = None
        # Hugging Face applies YaRN whenever rope_scaling is present; we (like DeepSeek's code) only when
        # max_seq_len > original_seq_len. So an inactive YaRN is written as null, which reads back as
        # the equivalent rope_factor=1, original_seq_len=max_seq_len.
        hf["rope_scaling"] = None
        if self.yarn_active:
            hf["rope_scaling"] = {"type": "yarn", "mscale_all_dim": self.mscale,
                                  **{theirs: getattr(self, ours) for ours, theirs in _HF_YARN_FIELDS.items()}}
        return hf


_HF_FIELDS = {  # ours -> Hugging Face DeepseekV3Config
    "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "norm_topk_prob": "norm_topk_prob",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "n_mtp_modules": "num_nextn_predict_layers",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",  # the released file says 0.02; V3 §4.2 trained with 0.006
}

_HF_NULLABLE = ("q_lora_rank", "n_shared_experts", "n_routed_experts")  # null has a meaning for these

_HF_CONSTANTS = {  # keys the library implements one value of: {key: that value}
    "hidden_act": "silu",
    "attention_bias": False,
    "moe_layer_freq": 1,  # transformers ignores it, DeepSeek's remote code makes layers dense by it
}

_HF_YARN_FIELDS = {  # ours -> keys of config.json's rope_scaling
    "rope_factor": "factor",
    "original_seq_len": "original_max_position_embeddings",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "mscale": "mscale",
}


def _check_hf_constants(hf: dict[str, Any]) -> None:
    if hf.get("model_type", "deepseek_v3") != "deepseek_v3":  # V2's keys mean other things (its greedy routing,
        # no MTP); missing keys would silently take V3's values
        raise ValueError(f"model_type: {hf['model_type']!r} is not supported; only 'deepseek_v3' "
                         "(topk_method 'noaux_tc' or 'greedy')")
    archs = hf.get("architectures") or []
    if any("DeepseekV2" in str(a) for a in (archs if isinstance(archs, list) else [archs])):
        raise ValueError(f"architectures: {archs!r} is DeepSeek-V2's; only DeepseekV3ForCausalLM is supported")
    for key, want in _HF_CONSTANTS.items():
        if key in hf and hf[key] != want:
            raise ValueError(f"{key}: only {want!r} is supported, got {hf[key]!r}")
    heads = hf.get("num_attention_heads", PRESETS["deepseek-v3"]["n_heads"])
    if hf.get("num_key_value_heads") not in (None, heads):  # MLA's keys are per head (kv_b_proj)
        raise ValueError(f"num_key_value_heads: must equal num_attention_heads={heads}, "
                         f"got {hf['num_key_value_heads']!r}")


def _hf_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature m = 0.1·mscale·ln(s) + 1 (1 for s ≤ 1), as both releases compute it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _hf_rope(hf: dict[str, Any], max_seq_len: int) -> dict[str, Any]:
    """Our RoPE fields from ``rope_scaling`` (``rope_parameters`` in transformers 5), as transformers reads it.

    Transformers multiplies the whole logit by m(mscale_all_dim)² and, through cos/sin, the RoPE dims' part
    once more by a² with a = m(mscale)/m(mscale_all_dim) (or ``attention_factor``). DeepSeek's code has one
    ``mscale`` and a = 1, the only case we implement. It also applies YaRN only past the original context.
    """
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    scaling = hf.get(key) or {}
    if not isinstance(scaling, dict):
        raise TypeError(f"{key}: expected a dict or null, got {type(scaling).__name__}")
    for name in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "attention_factor",
                 "beta_fast", "beta_slow", "rope_theta"):
        value = scaling.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value)):
            raise ValueError(f"{key}.{name}: must be a finite number, got {value!r}")
    theta = scaling.get("rope_theta", hf.get("rope_theta", PRESETS["deepseek-v3"]["rope_theta"]))
    plain = dict(rope_theta=theta, rope_factor=1.0, original_seq_len=max_seq_len)  # RoPE over the whole context
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return plain
    if kind != "yarn":
        raise ValueError(f"{key}.type: only 'yarn' is supported, got {kind!r}")
    if "factor" not in scaling:
        raise ValueError(f"{key}.factor: missing (YaRN needs its scale)")
    factor = scaling["factor"]
    if factor is None or factor < 1:
        raise ValueError(f"{key}.factor: must be >= 1 (YaRN stretches the context), got {factor!r}")
    original = _get(scaling, "original_max_position_embeddings", max_seq_len)
    mscale, all_dim, a = scaling.get("mscale"), scaling.get("mscale_all_dim"), scaling.get("attention_factor")
    if a is None:
        a = _hf_mscale(factor, mscale) / _hf_mscale(factor, all_dim) if mscale and all_dim else _hf_mscale(factor, 1)
    if abs(a - 1) > 1e-12:
        field = "attention_factor" if "attention_factor" in scaling else "mscale_all_dim"
        raise ValueError(f"{key}.{field}: transformers would scale the RoPE dims' logits by {a * a:.6g} apart from "
                         f"the rest; only mscale == mscale_all_dim is supported")
    if factor == 1:  # YaRN with scale 1 leaves every frequency as it is
        return plain
    if scaling.get("truncate", True) is not True:
        raise ValueError(f"{key}.truncate: only true (DeepSeek's rounding of the ramp ends) is supported")
    if max_seq_len <= original:
        raise ValueError(f"{key}.original_max_position_embeddings: {original} >= max_position_embeddings="
                         f"{max_seq_len}; transformers would apply YaRN there, DeepSeek's code (and ours) not")
    if factor > 1 and not all_dim:
        raise ValueError(f"{key}.mscale_all_dim: {all_dim!r}; YaRN without attention temperature is not supported")
    return dict(rope_theta=theta, rope_factor=factor, original_seq_len=original, mscale=all_dim if factor > 1 else 1.0,
                beta_fast=_get(scaling, "beta_fast", 32), beta_slow=_get(scaling, "beta_slow", 1))


def _get(d: dict[str, Any], key: str, default: Any) -> Any:
    """``d[key]``, or ``default`` where it is missing or null (a present 0 stays 0 and fails validation)."""
    value = d.get(key)
    return default if value is None else value


def _check_int(cfg: ModelConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if type(value) is not int:  # a NumPy integer (from_dict of loaded data): store an int
        object.__setattr__(cfg, name, value := int(value))
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _check_names(kw: dict[str, Any], what: str) -> None:
    """Raise ``TypeError`` naming the first keyword of ``kw`` that is not a ModelConfig field."""
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise TypeError(f"{unknown[0]}: not a ModelConfig field (in this {what})")


# Presets are data. "tiny" trains on 2 CPU cores in minutes (chapter 0); "deepseek-v3" is the released
# 671B model (HF config.json of deepseek-ai/DeepSeek-V3; V3 §4.2), used for arithmetic, never instantiated.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},  # the dataclass defaults above are the tiny model
    "deepseek-v3": dict(
        vocab_size=129280, max_seq_len=163840,
        dim=7168, inter_dim=18432, n_layers=61, n_dense_layers=3, norm_eps=1e-6,
        n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128,
        moe_inter_dim=2048, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
        n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", route_scale=2.5, norm_topk_prob=True,
        rope_theta=10000.0, rope_factor=40.0, original_seq_len=4096, beta_fast=32, beta_slow=1, mscale=1.0,
        n_mtp_modules=1, init_std=0.006, tie_embeddings=False,
    ),
}
