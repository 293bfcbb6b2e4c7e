"""Every figure from the config, by formula: parameters, KV cache, weight memory, FLOPs, GPU-hours, dollars.

Chapter 0 ("DeepSeek-V3 in one page") uses these to check the headline numbers: 671B total and 37B
activated parameters (V3 report, arXiv 2412.19437, §1 and §4.2), 180K H800 GPU-hours per trillion tokens
and $5.576M (V3 Table 1), a 70,272-byte KV cache per token (ISCA'25, arXiv 2505.09343, Table 1) and
250 training GFLOPs per token (ISCA'25 Table 2).

Nothing here builds a model: every count is a closed-form expression in :class:`~dsv3lib.config.ModelConfig`
fields. ``tests/test_accounting.py`` checks each formula against ``numel()`` of small ``Transformer`` s, so
the arithmetic for the 671B model (never instantiated) is the arithmetic that matches real modules.

Conventions: parameters are ``nn.Parameter`` elements (the gate's correction ``bias`` is a buffer, set by
a balancing rule rather than by gradients, and is not counted); GB = 10⁹ bytes; a multiply-add is 2 FLOPs.
"""

from __future__ import annotations

from .config import ModelConfig

__all__ = [
    "H800_BF16_PEAK_FLOPS", "H800_FP8_PEAK_FLOPS", "RTX_4090_BYTES", "V3_GPU_HOURS",
    "param_counts", "kv_cache_bytes_per_token", "kv_cache_bytes_per_token_gqa", "weight_bytes",
    "memory_summary", "flops_per_token", "gpu_hours_per_trillion_tokens", "implied_mfu", "training_cost",
    "training_memory_per_gpu", "H800_HBM_BYTES_PER_S", "mla_decode_flops_per_byte",
]

# Hardware specifications (vendor data sheets; dense, i.e. without 2:4 sparsity). The H800 SXM is an H100
# SXM with cut-down NVLink (400 GB/s, ISCA §4.1); its Tensor Core peaks are the H100 SXM's.
H800_BF16_PEAK_FLOPS = 989.4e12  # BF16 dense Tensor Core peak, FLOP/s
H800_FP8_PEAK_FLOPS = 1978.9e12  # FP8 dense Tensor Core peak, FLOP/s ("theoretically 2×" BF16, V3 §3.3)
H800_HBM_BYTES_PER_S = 3.35e12  # HBM3 bandwidth, B/s (NVIDIA H100 SXM data sheet; the H800 SXM shares it)
RTX_4090_BYTES = 24 * 2**30  # one GeForce RTX 4090: "24 GB" of GDDR6X, which is 24 GiB (25.8e9 bytes)

# V3 Table 1: H800 GPU-hours of the final run (excludes earlier research and ablations, V3 §1).
V3_GPU_HOURS = {"pre_training": 2664e3, "context_extension": 119e3, "post_training": 5e3, "total": 2788e3}


# ----------------------------------------------------------------------------------------- per module
def _mla(cfg: ModelConfig, *, matmul_only: bool = False) -> int:
    """Parameters of one MLA module (V3 eq. 1–11). ``matmul_only`` drops the two latent RMSNorms."""
    d, h, r, c = cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    if r == 0:
        q = d * h * cfg.qk_head_dim  # wq
    else:
        q = d * r + r * h * cfg.qk_head_dim + (0 if matmul_only else r)  # wq_a, wq_b (+ q_norm)
    kv = d * (c + cfg.qk_rope_head_dim) + c * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # wkv_a, wkv_b
    kv += 0 if matmul_only else c  # kv_norm
    return q + kv + h * cfg.v_head_dim * d  # + wo


def _swiglu(dim: int, inter_dim: int) -> int:
    return 3 * dim * inter_dim  # w1, w3: dim→inter; w2: inter→dim


def _moe(cfg: ModelConfig) -> dict[str, int]:
    """One MoE layer's parameters, all and per token. ``n_shared_experts`` shared experts are stored as one
    MLP of width ``n_shared_experts·moe_inter_dim`` (the same count as separate experts)."""
    expert = _swiglu(cfg.dim, cfg.moe_inter_dim)
    gate = cfg.n_routed_experts * cfg.dim  # every token is scored against every expert
    return {
        "expert": expert, "gate": gate, "routed": cfg.n_routed_experts * expert,
        "shared": cfg.n_shared_experts * expert,
        "activated": gate + (cfg.n_activated_experts + cfg.n_shared_experts) * expert,
    }


# ------------------------------------------------------------------------------------------ parameters
def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of ``Transformer(cfg)``, by formula (it is never instantiated).

    Breakdown of the main model (``total`` is their sum; MTP modules are not part of it):

    ============== ====================================================================================
    embedding      vocab_size·dim
    head           vocab_size·dim, or 0 if ``tie_embeddings`` (the head then reuses the embedding)
    attention      all MLA modules of the main layers, their q_norm/kv_norm included
    dense_ffn      the SwiGLU FFNs of the first ``n_dense_layers`` layers
    routed_experts all routed experts of all MoE layers
    shared_experts all shared experts of all MoE layers
    gates          the router matrices (n_routed_experts × dim per MoE layer; the bias is a buffer)
    norms          attn_norm and ffn_norm of every layer, plus the final norm
    ============== ====================================================================================

    Activated parameters, per token:

    - ``activated``: the parameters a token's forward pass multiplies with: every layer's attention,
      the dense FFN or the gate + ``n_shared_experts`` shared + ``n_activated_experts`` routed experts,
      the norms, and the output head; **not** the embedding table, from which a token reads one row.
      DeepSeek-V3: 36.63B. This is the "37B activated" of the V3 report: README_WEIGHTS.md of
      deepseek-ai/DeepSeek-V3 gives "36.6B (including 0.9B for the output Head)" in its revised
      wording (as copied in tenstorrent/tt-metal). An earlier wording, "36.7B (including 0.9B for Embedding
      and 0.9B for the output Head)", matches no consistent count: adding the embedding gives 37.55B.
    - ``activated_with_embedding``: ``activated`` + the embedding table (37.55B for V3).
    - ``activated_no_embedding``: the same number as ``activated``, spelled out for readers who ask.
      With tied embeddings the shared matrix is counted once, as the head.

    MTP (V3 §2.2), for all ``n_mtp_modules`` modules together:

    - ``mtp_total``: the modules' own parameters: enorm, hnorm, eh_proj (2·dim → dim), one MLA + MoE
      block, and its final norm (the checkpoint's shared_head.norm). The embedding and the output head
      are shared with the main model and not counted. ``total + mtp_total`` = all of the model's
      parameters. DeepSeek-V3: 11.61B; README_WEIGHTS.md says "11.5B unique", which is our figure minus
      eh_proj's 0.10B. Our reading of Hugging Face's "685B = 671B + 14B MTP": 671.0B + 11.6B + a second
      copy of embedding and head (1.85B) that the checkpoint stores in layer 61, plus FP8 scales.
    - ``mtp_activated``: the same with only the activated experts (V3: 0.69B; the README's "2.4B
      including the shared embedding and head" is again ours + 1.85B − eh_proj).

    Per-layer figures: ``attention_per_layer``, ``dense_ffn_per_layer``, ``expert`` (one routed or shared
    expert), ``moe_per_layer`` (gate + all experts), ``moe_activated_per_layer``, ``mtp_per_module``.
    """
    d, v = cfg.dim, cfg.vocab_size
    att = _mla(cfg)
    norms_per_layer = 2 * d
    dense = _swiglu(d, cfg.inter_dim)
    moe = _moe(cfg)
    n_dense, n_moe = cfg.n_dense_layers, cfg.n_moe_layers

    c = {
        "embedding": v * d,
        "head": 0 if cfg.tie_embeddings else v * d,
        "attention": cfg.n_layers * att,
        "dense_ffn": n_dense * dense,
        "routed_experts": n_moe * moe["routed"],
        "shared_experts": n_moe * moe["shared"],
        "gates": n_moe * moe["gate"],
        "norms": cfg.n_layers * norms_per_layer + d,
    }
    c["total"] = sum(c.values())

    layers_activated = cfg.n_layers * (att + norms_per_layer) + n_dense * dense + n_moe * moe["activated"] + d
    c["activated"] = layers_activated + v * d  # + head (tied or not, its matrix multiplies every token)
    c["activated_no_embedding"] = c["activated"]
    c["activated_with_embedding"] = c["activated"] + (0 if cfg.tie_embeddings else v * d)

    # MTP block k has layer_id n_layers + k ≥ n_dense_layers, so it is always an MLA + MoE block.
    mtp_io = 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, final norm
    mtp_module = mtp_io + att + norms_per_layer + moe["gate"] + moe["routed"] + moe["shared"]
    mtp_module_activated = mtp_io + att + norms_per_layer + moe["activated"]
    c["mtp_total"] = cfg.n_mtp_modules * mtp_module
    c["mtp_activated"] = cfg.n_mtp_modules * mtp_module_activated

    c.update(
        attention_per_layer=att, dense_ffn_per_layer=dense, expert=moe["expert"],
        moe_per_layer=moe["gate"] + moe["routed"] + moe["shared"],
        moe_activated_per_layer=moe["activated"], mtp_per_module=mtp_module,
    )
    return c


# ------------------------------------------------------------------------------------------- KV cache
def kv_cache_bytes_per_token(cfg: ModelConfig, kind: str = "mla", bytes_per_element: int = 2) -> int:
    """Inference cache per token, summed over the main layers (MTP excluded).

    - ``"mla"``: what MLA caches: the KV latent c_KV and the shared RoPE key k_R, i.e.
      (kv_lora_rank + qk_rope_head_dim) numbers per layer (V3 eq. 1, 3). DeepSeek-V3 in BF16:
      (512 + 64)·61·2 = 70,272 bytes (ISCA Table 1).
    - ``"mha"``: the same attention with keys and values expanded per head and cached, as naive
      multi-head attention would: n_heads·(qk_head_dim + v_head_dim) per layer (V3: 4,997,120 bytes).
    """
    if kind == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    elif kind == "mha":
        per_layer = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        raise ValueError(f"kind: must be 'mla' or 'mha', got {kind!r}")
    return per_layer * cfg.n_layers * bytes_per_element


def kv_cache_bytes_per_token_gqa(n_layers: int, n_kv_heads: int, head_dim: int,
                                 bytes_per_element: int = 2) -> int:
    """K and V caches of grouped-query attention, for comparing published models (ISCA Table 1, BF16):
    LLaMA-3.1 405B (126 layers, 8 KV heads of 128) 516,096 B; Qwen-2.5 72B (80, 8, 128) 327,680 B."""
    return 2 * n_layers * n_kv_heads * head_dim * bytes_per_element


def mla_decode_flops_per_byte(cfg: ModelConfig, form: str = "absorbed", queries: int = 1,
                              bytes_per_element: float = 2) -> float:
    """Arithmetic intensity of one decode step's attention over the cache: FLOPs per byte of cache read.

    Per layer and cached token (so independent of context length and layer count), for ``queries`` query
    tokens of one sequence that read the same cache in one step (2 when MTP's draft token is verified):

    - ``"absorbed"``: the cache holds (kv_lora_rank + qk_rope_head_dim) numbers; each head scores its
      latent and rope queries against them and mixes kv_lora_rank of them as the value:
      2·n_heads·(2·kv_lora_rank + qk_rope_head_dim) FLOPs per query. V3, BF16, one query:
      2·128·(512 + 576) / 1,152 B ≈ 241.8 FLOP/B.
    - ``"naive"``: the cache holds n_heads·(qk_head_dim + v_head_dim) expanded numbers, each used once per
      query: 2 FLOPs per number, i.e. 2/bytes_per_element FLOP/B per query (V3, BF16: 1.0).

    Projections, softmax and the output map are not counted (they do not read the cache).
    """
    if queries < 1:
        raise ValueError(f"queries: must be >= 1, got {queries}")
    if form == "absorbed":
        numbers = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        flops = 2 * cfg.n_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    elif form == "naive":
        numbers = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        flops = 2 * numbers
    else:
        raise ValueError(f"form: must be 'absorbed' or 'naive', got {form!r}")
    return queries * flops / (numbers * bytes_per_element)


# ------------------------------------------------------------------------------------- weight memory
def weight_bytes(cfg: ModelConfig, bytes_per_param: float, *, include_mtp: bool = False) -> float:
    """Bytes to hold the weights, every parameter at ``bytes_per_param`` (2 = BF16, 1 = FP8)."""
    c = param_counts(cfg)
    return (c["total"] + (c["mtp_total"] if include_mtp else 0)) * bytes_per_param


def memory_summary(cfg: ModelConfig, *, include_mtp: bool = False) -> dict[str, float]:
    """Weight memory in GB (10⁹ B): all parameters must be resident, since any token may pick any expert.

    DeepSeek-V3: 1342 GB in BF16, 671 GB in FP8, against 51.5 GB on two RTX 4090s (26× and 13× short).
    Even the 36.6B activated parameters alone take 73 GB in BF16. Every parameter is priced at the same
    width; the released FP8 checkpoint keeps the embedding, head, norms and gates in BF16 and adds one
    FP32 scale per 128×128 block, a few GB more.
    """
    c = param_counts(cfg)
    two_4090 = 2 * RTX_4090_BYTES / 1e9
    s = {
        "params": float(c["total"] + (c["mtp_total"] if include_mtp else 0)),
        "bf16_gb": weight_bytes(cfg, 2, include_mtp=include_mtp) / 1e9,
        "fp8_gb": weight_bytes(cfg, 1, include_mtp=include_mtp) / 1e9,
        "activated_bf16_gb": c["activated"] * 2 / 1e9,
        "activated_fp8_gb": c["activated"] / 1e9,
        "two_rtx4090_gb": two_4090,
    }
    s["bf16_over_two_rtx4090"] = s["bf16_gb"] / two_4090
    s["fp8_over_two_rtx4090"] = s["fp8_gb"] / two_4090
    return s


def training_memory_per_gpu(cfg: ModelConfig, *, gpus: int = 2048, pp: int = 16, ep: int = 64,
                            dualpipe: bool = True) -> dict[str, float]:
    """Bytes of training state per GPU (no activations) for V3's layout (§3.2): ``pp``-way pipeline, ``ep``-way
    expert parallelism, ZeRO-1 data parallelism over the rest, no tensor parallelism (chapter 6).

    A pipeline rank holds 1/pp of the non-expert parameters and 1/(pp·ep) of the routed experts, twice under
    DualPipe (Table 2's 2× parameters). Per parameter it holds a BF16 working copy (2 B; the FP8 GEMMs quantise
    from it) and an FP32 gradient (4 B); the FP32 master weight and the BF16 AdamW moments (4 + 2 + 2 B,
    §3.3.3) are sharded over the data-parallel ranks holding the same parameter (ZeRO-1): gpus/pp of them for
    non-expert parameters, gpus/(pp·ep) for experts. Layers are spread evenly (61 layers over 16 stages is an
    average of 3.8). Returns GB (10⁹ B) per GPU: ``weights``, ``grads``, ``optimizer``, ``total``, and the
    parameters held (``params``)."""
    c = param_counts(cfg)
    total = c["total"] + c["mtp_total"]
    experts = cfg.n_routed_experts * _swiglu(cfg.dim, cfg.moe_inter_dim) * (cfg.n_layers - cfg.n_dense_layers
                                                                          + cfg.n_mtp_modules)
    copies = 2 if dualpipe else 1
    dense_local, expert_local = (total - experts) / pp * copies, experts / (pp * ep) * copies
    local = dense_local + expert_local
    optimizer = 8 * (dense_local / (gpus // pp) + expert_local / max(1, gpus // (pp * ep)))
    out = {"params": local, "weights": 2 * local / 1e9, "grads": 4 * local / 1e9, "optimizer": optimizer / 1e9}
    out["total"] = out["weights"] + out["grads"] + out["optimizer"]
    return out


# ------------------------------------------------------------------------------------------------ FLOPs
def _attention_flops_forward(cfg: ModelConfig, seq_len: int) -> float:
    """Score (q·k) and mixing (p·v) FLOPs of one layer per query token: causal, so on average seq_len/2 keys;
    2·n_heads·(qk_head_dim + v_head_dim)·seq_len/2 (the naive per-head form, as in training)."""
    return 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2


def flops_per_token(cfg: ModelConfig, seq_len: int = 4096, *, include_attention: bool = True,
                    include_mtp: bool = True) -> dict[str, float]:
    """Training FLOPs per token: forward 2 per multiply-add, backward 4 (input and weight gradients).

    - ``matmul`` = 6 × the weight elements a token multiplies with in the main model: attention
      projections, dense FFN or gate + shared + activated routed experts, and the output head. The
      embedding (a lookup) and the norms (element-wise) are left out.
    - ``attention`` = 3 × the forward q·k and p·v FLOPs of every main layer at ``seq_len``
      (see ``_attention_flops_forward``); 0 if not ``include_attention``.
    - ``mtp`` = the same two terms for the MTP modules, their use of the shared head included
      (each module computes a full vocabulary of logits); 0 if not ``include_mtp``.
    - ``total`` = their sum.

    Left out: softmax, norms, activations, the router's top-k, the loss, optimizer updates, recomputation
    (V3 recomputes norms and MLA up-projections, §3.2.3) and wasted work (pipeline bubbles).

    DeepSeek-V3 at 4096 tokens: matmul 219.8 + attention 30.7 = 250.5 GFLOPs without MTP, which is
    ISCA Table 2's 250 GFLOPs/token: that figure counts the output head but not the MTP module
    (with MTP: 260.7).
    """
    moe = _moe(cfg)
    d, v = cfg.dim, cfg.vocab_size
    matmul = (cfg.n_layers * _mla(cfg, matmul_only=True) + cfg.n_dense_layers * _swiglu(d, cfg.inter_dim)
              + cfg.n_moe_layers * moe["activated"] + v * d)
    att = 3 * cfg.n_layers * _attention_flops_forward(cfg, seq_len) if include_attention else 0.0
    mtp = 0.0
    if include_mtp:
        mtp_matmul = 2 * d * d + _mla(cfg, matmul_only=True) + moe["activated"] + v * d
        mtp_att = 3 * _attention_flops_forward(cfg, seq_len) if include_attention else 0.0
        mtp = cfg.n_mtp_modules * (6.0 * mtp_matmul + mtp_att)
    out = {"matmul": 6.0 * matmul, "attention": float(att), "mtp": mtp}
    out["total"] = out["matmul"] + out["attention"] + out["mtp"]
    return out


def gpu_hours_per_trillion_tokens(cfg: ModelConfig, *, mfu: float, peak_flops: float = H800_BF16_PEAK_FLOPS,
                                  seq_len: int = 4096, include_mtp: bool = True) -> float:
    """GPU-hours to train on 10¹² tokens: 10¹²·flops_per_token / (peak_flops·mfu) / 3600.

    ``mfu`` is the model-FLOPs utilisation: useful FLOPs (those of :func:`flops_per_token`) per second,
    as a fraction of ``peak_flops`` (default: H800 BF16 dense, 989.4 TFLOP/s; pass
    ``H800_FP8_PEAK_FLOPS`` = 1978.9 TFLOP/s to measure against the FP8 peak). V3 reports 180K
    H800 GPU-hours per trillion tokens (§1, Table 1).
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu: must be in (0, 1], got {mfu!r}")
    flops = flops_per_token(cfg, seq_len, include_mtp=include_mtp)["total"]
    return 1e12 * flops / (peak_flops * mfu) / 3600


def implied_mfu(cfg: ModelConfig, gpu_hours_per_trillion: float = 180e3,
                peak_flops: float = H800_BF16_PEAK_FLOPS, *, seq_len: int = 4096,
                include_mtp: bool = True) -> float:
    """The utilisation that a reported GPU-hours-per-trillion-tokens figure implies (inverse of
    :func:`gpu_hours_per_trillion_tokens`). Same FLOP count and peak conventions.

    DeepSeek-V3 (180K GPU-h/T, seq 4096, MTP included): 40.7% of the H800's BF16 peak, 20.3% of its FP8
    peak (39.1% / 19.5% without MTP). Most GEMMs ran in FP8 (V3 §3.3) while attention, the head,
    gating and norms stayed BF16/FP32, so the true utilisation of the hardware lies between the two.
    """
    flops = flops_per_token(cfg, seq_len, include_mtp=include_mtp)["total"]
    return 1e12 * flops / (gpu_hours_per_trillion * 3600 * peak_flops)


def training_cost(gpu_hours: float, usd_per_gpu_hour: float = 2.0) -> float:
    """Dollars at a rental price; V3 Table 1 assumes $2 per H800 GPU-hour: 2.788M h → $5.576M.
    The final run only: not the cluster's purchase price, research or ablations (V3 §1)."""
    return gpu_hours * usd_per_gpu_hour
