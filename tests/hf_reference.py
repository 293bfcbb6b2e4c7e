"""An independent DeepSeek-V3 forward pass over a Hugging Face config dict and the release's tensor names,
to hold ``dsv3lib.hf.load_hf`` against (tests/test_hf_fidelity.py). It imports nothing from dsv3lib.

Written from transformers' ``modeling_deepseek_v3`` (RoPE as cos/sin with ``rotate_half`` and the
de-interleaving view under ``rope_interleave``; YaRN's inv_freq, ``attention_factor`` on cos/sin and
``mscale_all_dim`` on the softmax scale; the router's +1e-20; MTP layers are not run) and from DeepSeek's
``inference/model.py`` where transformers is narrower: softmax scores, dropped groups masked with -inf
(transformers fills 0.0, which differs only if a biased score is negative), ``greedy`` = plain top-k with
no correction bias. The config must hold every key it reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


# ------------------------------------------------------------------------------------------ forward
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_cos_sin(cfg: dict, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, d) cos and sin for positions 0..T-1, frequencies repeated as [f, f] (transformers' layout)."""
    d, base = cfg["qk_rope_head_dim"], cfg["rope_theta"]
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    inv_freq, attention_factor = 1.0 / pos_freqs, 1.0
    rs = cfg["rope_scaling"]
    if rs:  # yarn
        f = rs["factor"]
        orig = rs.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        ms, mad = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = rs.get("attention_factor")
        if attention_factor is None:
            attention_factor = yarn_mscale(f, ms) / yarn_mscale(f, mad) if ms and mad else yarn_mscale(f)

        def dim_of(rotations):  # the pair index that turns `rotations` times over the original context
            return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_of(rs.get("beta_fast") or 32)), 0)
        high = min(math.ceil(dim_of(rs.get("beta_slow") or 1)), d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / ((high + 0.001 if low == high else high) - low))
        extrapolate = 1 - ramp.clamp(0, 1)
        inv_freq = 1.0 / (f * pos_freqs) * (1 - extrapolate) + inv_freq * extrapolate
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos, sin, interleave: bool) -> torch.Tensor:
    """x (B, H, T, d). Interleaved weights: pairs (2i, 2i+1) are first gathered to (i, i + d/2)."""
    if interleave:
        B, H, T, d = x.shape
        x = x.view(B, H, T, d // 2, 2).transpose(4, 3).reshape(B, H, T, d)
    return x * cos + rotate_half(x) * sin


def attention(cfg: dict, W: dict, p: str, x: torch.Tensor, cos, sin) -> torch.Tensor:
    B, T, _ = x.shape
    H, eps = cfg["num_attention_heads"], cfg["rms_norm_eps"]
    nope, rope, vd, lora = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    if cfg["q_lora_rank"] is None:
        q = x @ W[p + "q_proj.weight"].T
    else:
        q = rms_norm(x @ W[p + "q_a_proj.weight"].T, W[p + "q_a_layernorm.weight"], eps) @ W[p + "q_b_proj.weight"].T
    q_pass, q_rot = q.view(B, T, H, nope + rope).transpose(1, 2).split([nope, rope], dim=-1)
    k_pass, k_rot = (x @ W[p + "kv_a_proj_with_mqa.weight"].T).split([lora, rope], dim=-1)
    kv = rms_norm(k_pass, W[p + "kv_a_layernorm.weight"], eps) @ W[p + "kv_b_proj.weight"].T
    k_pass, v = kv.view(B, T, H, nope + vd).transpose(1, 2).split([nope, vd], dim=-1)  # (B, H, T, ·)
    interleave = cfg.get("rope_interleave", True)
    q_rot = apply_rope(q_rot, cos, sin, interleave)
    k_rot = apply_rope(k_rot.view(B, 1, T, rope), cos, sin, interleave).expand(B, H, T, rope)
    scale = (nope + rope) ** -0.5
    rs = cfg["rope_scaling"]
    if rs and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    scores = torch.cat([q_pass, q_rot], -1) @ torch.cat([k_pass, k_rot], -1).transpose(-1, -2) * scale
    scores = scores + torch.full((T, T), float("-inf")).triu(1)
    out = scores.softmax(dim=-1, dtype=torch.float32) @ v  # (B, H, T, vd)
    return out.transpose(1, 2).reshape(B, T, H * vd) @ W[p + "o_proj.weight"].T


def mlp(W: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def moe(cfg: dict, W: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    """x (N, dim): routed experts by the router's weights, plus the shared experts."""
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    logits = x.float() @ W[p + "gate.weight"].float().T
    scores = logits.sigmoid() if cfg["scoring_func"] == "sigmoid" else logits.softmax(dim=-1)
    choice = scores
    if cfg["topk_method"] == "noaux_tc":  # the bias picks, groups ranked by the sum of their top 2
        G = cfg["n_group"]
        grouped = (scores + W[p + "gate.e_score_correction_bias"]).view(-1, G, E // G)
        keep = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg["topk_group"], dim=-1).indices
        dropped = torch.ones(grouped.shape[:2], dtype=torch.bool).scatter(1, keep, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
    idx = choice.topk(k, dim=-1).indices  # (N, k)
    w = scores.gather(1, idx)
    if cfg["norm_topk_prob"]:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg["routed_scaling_factor"]
    y = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.where(idx == e)
        if len(tok):
            y.index_add_(0, tok, mlp(W, f"{p}experts.{e}.", x[tok]) * w[tok, slot, None])
    return y + mlp(W, p + "shared_experts.", x)  # 0 shared experts: width 0, output 0


def forward(cfg: dict, W: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of the main model; the MTP layers (index ≥ num_hidden_layers) are not run."""
    B, T = tokens.shape
    eps = cfg["rms_norm_eps"]
    cos, sin = rope_cos_sin(cfg, T)
    h = W["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = h + attention(cfg, W, p + "self_attn.", rms_norm(h, W[p + "input_layernorm.weight"], eps), cos, sin)
        x = rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
        dense = i < cfg["first_k_dense_replace"]
        h = h + (mlp(W, p + "mlp.", x) if dense else moe(cfg, W, p + "mlp.", x.view(B * T, -1)).view(B, T, -1))
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return rms_norm(h, W["model.norm.weight"], eps) @ head.T


# ------------------------------------------------------------------------------------------ weights
def random_weights(cfg: dict, seed: int, mtp_layers: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under the release's names, scaled so activations stay O(1): matrices N(0, 1/fan_in),
    norms 1 ± 0.1, biases ±0.05. Includes the MTP layers (and their embedding/head copies) unless told not."""
    g = torch.Generator().manual_seed(seed)

    def mat(out, inn):
        return torch.randn(out, inn, generator=g) / math.sqrt(max(inn, 1))

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    d, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    nope, rope, vd, lora = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    W = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], d, generator=g), "model.norm.weight": norm(d)}
    if not cfg["tie_word_embeddings"]:
        W["lm_head.weight"] = mat(cfg["vocab_size"], d)
    for i in range(L + (cfg["num_nextn_predict_layers"] if mtp_layers else 0)):
        p = f"model.layers.{i}."
        W |= {p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d)}
        a = p + "self_attn."
        if cfg["q_lora_rank"] is None:
            W[a + "q_proj.weight"] = mat(H * (nope + rope), d)
        else:
            r = cfg["q_lora_rank"]
            W |= {a + "q_a_proj.weight": mat(r, d), a + "q_a_layernorm.weight": norm(r),
                  a + "q_b_proj.weight": mat(H * (nope + rope), r)}
        W |= {a + "kv_a_proj_with_mqa.weight": mat(lora + rope, d), a + "kv_a_layernorm.weight": norm(lora),
              a + "kv_b_proj.weight": mat(H * (nope + vd), lora), a + "o_proj.weight": mat(d, H * vd)}
        widths = {"": cfg["intermediate_size"]} if i < cfg["first_k_dense_replace"] else {
            **{f"experts.{e}.": cfg["moe_intermediate_size"] for e in range(cfg["n_routed_experts"])},
            "shared_experts.": cfg["moe_intermediate_size"] * cfg["n_shared_experts"]}
        for e, width in widths.items():
            m = f"{p}mlp.{e}"
            W |= {m + "gate_proj.weight": mat(width, d), m + "up_proj.weight": mat(width, d),
                  m + "down_proj.weight": mat(d, width)}
        if i >= cfg["first_k_dense_replace"]:
            W[p + "mlp.gate.weight"] = mat(cfg["n_routed_experts"], d) * 2  # logits ~ N(0, 4): spread scores
            if cfg["topk_method"] == "noaux_tc":
                W[p + "mlp.gate.e_score_correction_bias"] = 0.05 * torch.randn(cfg["n_routed_experts"], generator=g)
        if i >= L:  # an MTP layer: its own norms and projection, copies of embedding and head
            W |= {p + "enorm.weight": norm(d), p + "hnorm.weight": norm(d), p + "eh_proj.weight": mat(d, 2 * d),
                  p + "shared_head.norm.weight": norm(d), p + "embed_tokens.weight": W["model.embed_tokens.weight"],
                  p + "shared_head.head.weight": W.get("lm_head.weight", W["model.embed_tokens.weight"])}
    return W


def fp8_blocks(w: torch.Tensor, b: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's layout: e4m3 weight and float32 scale_inv per b×b block (amax / 448, edge blocks
    partial, 1 for an all-zero block)."""
    (out, inn), R, C = w.shape, -(-w.shape[0] // b), -(-w.shape[1] // b)
    pad = torch.zeros(R * b, C * b)
    pad[:out, :inn] = w
    amax = pad.view(R, b, C, b).abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    q = (pad.view(R, b, C, b) / s[:, None, :, None]).clamp(-448, 448).view(R * b, C * b)[:out, :inn]
    return q.to(torch.float8_e4m3fn), s


def write_checkpoint(path: Path, cfg: dict, W: dict, dtype=torch.float32, fp8: bool = False) -> dict:
    """config.json + two shards + index.json, as the release is laid out. Returns the weights the files
    hold, in float32 (rounded to ``dtype``, or dequantised where stored as FP8), to run :func:`forward` on."""
    path.mkdir()
    stored, held = {}, {}
    for n, t in W.items():
        if fp8 and n.endswith("proj.weight") and ".mlp.gate." not in n and "eh_proj" not in n and t.numel():
            q, s = fp8_blocks(t)
            stored |= {n: q, n + "_scale_inv": s}
            held[n] = q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: t.shape[0], : t.shape[1]]
        else:
            stored[n] = t.to(dtype) if "correction_bias" not in n else t
            held[n] = stored[n].float()
    quant = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    (path / "config.json").write_text(json.dumps(cfg | (quant if fp8 else {})))
    names = list(stored)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, part in shards.items():
        save_file({n: stored[n].contiguous().clone() for n in part}, path / file)  # no shared storage
    weight_map = {n: file for file, part in shards.items() for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return held
