"""dsv3lib.accounting: formulas vs numel() and FLOP counts of small real models; the paper's figures."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsv3lib.accounting import (
    H800_BF16_PEAK_FLOPS,
    H800_FP8_PEAK_FLOPS,
    H800_HBM_BYTES_PER_S,
    V3_GPU_HOURS,
    flops_per_token,
    gpu_hours_per_trillion_tokens,
    implied_mfu,
    kv_cache_bytes_per_token,
    kv_cache_bytes_per_token_gqa,
    memory_summary,
    mla_decode_flops_per_byte,
    param_counts,
    training_cost,
    weight_bytes,
)
from dsv3lib.config import ModelConfig
from dsv3lib.model import Transformer

V3 = ModelConfig.preset("deepseek-v3")

SMALL = {  # name -> overrides of the tiny preset; each is built for real and counted with numel()
    "tiny": {},
    "plain_wq": dict(q_lora_rank=0),
    "no_dense": dict(n_dense_layers=0),
    "no_shared": dict(n_shared_experts=0),
    "two_shared": dict(n_shared_experts=2),
    "tied": dict(tie_embeddings=True),
    "mtp0": dict(n_mtp_modules=0),
    "mtp2": dict(n_mtp_modules=2),
    "all_dense_mtp0": dict(n_layers=2, n_dense_layers=2, n_mtp_modules=0),
    "all_dense_mtp1": dict(n_layers=2, n_dense_layers=2, n_mtp_modules=1),
    "odd_sizes": dict(dim=48, inter_dim=72, n_heads=3, q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=8,
                      qk_rope_head_dim=6, v_head_dim=10, moe_inter_dim=20, n_routed_experts=6,
                      n_activated_experts=3, n_expert_groups=3, n_limited_groups=2, vocab_size=97),
}


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() lists a tied weight once


@pytest.fixture(scope="module", params=list(SMALL))
def built(request):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", **SMALL[request.param])
    return cfg, Transformer(cfg)


def test_total_plus_mtp_is_every_parameter(built):
    cfg, model = built
    c = param_counts(cfg)
    assert c["total"] + c["mtp_total"] == numel(model)
    assert c["mtp_total"] == numel(model.mtp)
    assert c["mtp_per_module"] * cfg.n_mtp_modules == c["mtp_total"]


def test_total_matches_model_without_mtp(built):
    cfg, _ = built
    torch.manual_seed(0)
    assert param_counts(cfg)["total"] == numel(Transformer(cfg.replace(n_mtp_modules=0)))


def test_breakdown_matches_modules(built):
    cfg, model = built
    c = param_counts(cfg)
    moe = [layer.ffn for layer in model.layers if layer.layer_id >= cfg.n_dense_layers]
    dense = [layer.ffn for layer in model.layers if layer.layer_id < cfg.n_dense_layers]
    block_norms = sum(numel(layer.attn_norm) + numel(layer.ffn_norm) for layer in model.layers)
    assert c["embedding"] == numel(model.embed)
    assert c["head"] == (0 if cfg.tie_embeddings else numel(model.head))
    assert c["attention"] == sum(numel(layer.attn) for layer in model.layers)
    assert c["dense_ffn"] == sum(numel(f) for f in dense)
    assert c["routed_experts"] == sum(numel(f.experts) for f in moe)
    assert c["shared_experts"] == sum(numel(f.shared_experts) for f in moe if f.shared_experts is not None)
    assert c["gates"] == sum(numel(f.gate) for f in moe)
    assert c["norms"] == block_norms + numel(model.norm)
    parts = ["embedding", "head", "attention", "dense_ffn", "routed_experts", "shared_experts", "gates",
             "norms"]
    assert sum(c[k] for k in parts) == c["total"]


def test_gate_bias_is_a_buffer_not_a_parameter(built):
    cfg, model = built
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("gate.bias") for n in names)


def _activated_from_modules(cfg, blocks) -> int:
    """What one token touches in these blocks, counted from the real modules."""
    n = 0
    for layer in blocks:
        n += numel(layer.attn) + numel(layer.attn_norm) + numel(layer.ffn_norm)
        if layer.layer_id < cfg.n_dense_layers:
            n += numel(layer.ffn)
        else:
            ffn = layer.ffn
            n += numel(ffn.gate) + cfg.n_activated_experts * numel(ffn.experts[0])
            n += numel(ffn.shared_experts) if ffn.shared_experts is not None else 0
    return n


def test_activated_matches_modules(built):
    cfg, model = built
    c = param_counts(cfg)
    body = _activated_from_modules(cfg, model.layers) + numel(model.norm)
    head = model.head.weight.numel()  # the head multiplies every token, tied or not
    assert c["activated"] == c["activated_no_embedding"] == body + head
    assert c["activated_with_embedding"] == body + numel(torch.nn.ModuleList([model.embed, model.head]))
    mtp = sum(_activated_from_modules(cfg, [m.block]) + numel(m.enorm) + numel(m.hnorm) + numel(m.eh_proj)
              + numel(m.norm) for m in model.mtp)
    assert c["mtp_activated"] == mtp


def test_matmul_flops_match_flop_counter():
    """Forward matmul FLOPs counted by torch equal our formula / 3 (training = 3 × forward); attention
    runs unmasked on CPU (full T keys), which is twice our causal average of T/2."""
    cfg = ModelConfig.preset("tiny", n_mtp_modules=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, T = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    f = flops_per_token(cfg, T, include_mtp=False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(tokens, mtp=False)
    mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    assert mm == f["matmul"] / 3 * B * T
    assert counter.get_total_flops() - mm == 2 * f["attention"] / 3 * B * T

    counter_mtp = FlopCounterMode(display=False)
    with counter_mtp, torch.no_grad():
        model(tokens, mtp=True)
    mtp_mm = counter_mtp.get_flop_counts()["Global"][torch.ops.aten.mm] - mm
    f_mtp = flops_per_token(cfg, T, include_attention=False)
    assert mtp_mm == f_mtp["mtp"] / 3 * B * (T - 1)  # depth 1 runs on T-1 positions


# --------------------------------------------------------------------------------- DeepSeek-V3 figures
def test_v3_parameter_counts():
    c = param_counts(V3)
    assert c["total"] == 671_026_404_352  # "671B" (V3 §1)
    assert abs(c["total"] - 671.0e9) < 1.5e9
    # "37B activated" (V3 §1) = 36.63B: head counted, embedding not (README_WEIGHTS: "36.6B (including
    # 0.9B for the output Head)")
    assert c["activated"] == 36_625_603_584
    assert abs(c["activated"] - 36.6e9) < 0.05e9 and abs(c["activated"] - 37e9) < 1e9
    assert c["activated_with_embedding"] - c["activated"] == 129280 * 7168  # 0.93B embedding
    # README_WEIGHTS "11.5B unique" MTP params; ours also counts eh_proj (2·7168² = 0.10B): 11.61B
    assert abs(c["mtp_total"] - 11.5e9) < 0.15e9
    assert abs(c["mtp_total"] - 2 * 7168**2 - 11.5e9) < 0.02e9
    assert c["embedding"] == c["head"] == 926_679_040


def test_v3_kv_cache_bytes():
    assert kv_cache_bytes_per_token(V3) == 70_272 == 576 * 61 * 2  # ISCA Table 1
    assert kv_cache_bytes_per_token(V3, "mha") == 128 * (192 + 128) * 61 * 2 == 4_997_120
    assert kv_cache_bytes_per_token(V3, "mla", bytes_per_element=1) == 35_136
    assert kv_cache_bytes_per_token_gqa(126, 8, 128) == 516_096  # LLaMA-3.1 405B
    assert kv_cache_bytes_per_token_gqa(80, 8, 128) == 327_680  # Qwen-2.5 72B
    assert round(516_096 / 70_272, 2) == 7.34 and round(327_680 / 70_272, 2) == 4.66


def test_kv_cache_bad_kind():
    with pytest.raises(ValueError, match="^kind:"):
        kv_cache_bytes_per_token(V3, kind="gqa")


def test_v3_weight_memory():
    assert weight_bytes(V3, 2) == 2 * 671_026_404_352
    s = memory_summary(V3)
    assert round(s["bf16_gb"]) == 1342 and round(s["fp8_gb"]) == 671
    assert s["fp8_over_two_rtx4090"] > 13  # all experts must be resident: far beyond two 24 GB cards
    assert memory_summary(V3, include_mtp=True)["fp8_gb"] == pytest.approx(682.64, abs=0.01)


def test_v3_flops_per_token_matches_isca():
    f = flops_per_token(V3, 4096, include_mtp=False)
    assert f["total"] == pytest.approx(250e9, rel=0.01)  # ISCA Table 2: 250 GFLOPs/token, head in, MTP out
    assert f["attention"] == 3 * 61 * 128 * 320 * 4096
    assert flops_per_token(V3, include_attention=False, include_mtp=False)["total"] == f["matmul"]
    with_mtp = flops_per_token(V3, 4096)
    assert 9e9 < with_mtp["mtp"] < 11e9 and with_mtp["total"] == pytest.approx(260.6e9, rel=0.001)


def test_v3_gpu_hours_and_mfu():
    mfu = implied_mfu(V3)  # 180K H800 GPU-hours per trillion tokens (V3 §1)
    assert 0.40 < mfu < 0.41
    assert gpu_hours_per_trillion_tokens(V3, mfu=mfu) == pytest.approx(180e3)
    assert implied_mfu(V3, peak_flops=H800_FP8_PEAK_FLOPS) == pytest.approx(mfu / 2, rel=1e-3)
    assert H800_BF16_PEAK_FLOPS == 989.4e12
    # pre-training: 14.8T tokens at 180K GPU-h/T ≈ 2664K GPU-h (Table 1)
    assert 14.8 * 180e3 == pytest.approx(V3_GPU_HOURS["pre_training"], rel=1e-3)
    with pytest.raises(ValueError, match="^mfu:"):
        gpu_hours_per_trillion_tokens(V3, mfu=0)


def test_training_cost():
    assert training_cost(V3_GPU_HOURS["total"]) == pytest.approx(5.576e6)  # V3 Table 1
    assert training_cost(2664e3) == pytest.approx(5.328e6)
    assert sum(v for k, v in V3_GPU_HOURS.items() if k != "total") == V3_GPU_HOURS["total"]


def test_training_memory_per_gpu_counts_real_modules():
    """One GPU holds everything; with ep = n_routed_experts each GPU holds 1/E of the experts (counted on a model)."""
    from dsv3lib.model import MoE, Transformer

    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    from dsv3lib import accounting

    one = accounting.training_memory_per_gpu(cfg, gpus=1, pp=1, ep=1, dualpipe=False)
    assert one["params"] == total and one["weights"] == 2 * total / 1e9
    assert one["total"] == pytest.approx((2 + 4 + 8) * total / 1e9)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    E = cfg.n_routed_experts
    sharded = accounting.training_memory_per_gpu(cfg, gpus=E, pp=1, ep=E, dualpipe=True)
    assert sharded["params"] == pytest.approx(2 * (total - experts + experts / E))


def test_mla_decode_flops_per_byte():
    """V3 decode roofline (chapter 2): 2·128·1088 FLOP per 1,152-byte BF16 latent; the H800 ridge ≈ 295."""
    assert mla_decode_flops_per_byte(V3) == pytest.approx(2 * 128 * (512 + 576) / 1152)  # ≈ 241.8
    ridge = H800_BF16_PEAK_FLOPS / H800_HBM_BYTES_PER_S
    assert ridge == pytest.approx(295.3, abs=0.1)
    assert mla_decode_flops_per_byte(V3) < ridge < mla_decode_flops_per_byte(V3, queries=2)
    assert mla_decode_flops_per_byte(V3, bytes_per_element=1) == pytest.approx(2 * mla_decode_flops_per_byte(V3))
    assert mla_decode_flops_per_byte(V3, "naive") == pytest.approx(1.0)
    assert mla_decode_flops_per_byte(V3, "naive", queries=2, bytes_per_element=1) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="^form:"):
        mla_decode_flops_per_byte(V3, "mqa")


def test_mla_decode_flops_per_byte_matches_counted_flops():
    """The absorbed FLOPs per cached token are what the library's decode step does: count a real step at two
    cache lengths; the difference is the attention over the extra tokens."""
    from dsv3lib.model import MLA, LatentCache, precompute_freqs_cis

    cfg = ModelConfig.preset("tiny")
    layer = MLA(cfg).eval()
    freqs = precompute_freqs_cis(cfg)
    per_token = {}
    for T in (1, 2):
        counted = []
        for S in (32, 64):
            cache = LatentCache.empty(cfg, 1, S)
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                layer(torch.randn(1, T, cfg.dim), S - T, freqs[S - T:S], cache)
            counted.append(fc.get_total_flops())
        per_token[T] = (counted[1] - counted[0]) / 32
    bytes_per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # fp32 cache
    for T in (1, 2):
        assert per_token[T] / bytes_per_token == pytest.approx(
            mla_decode_flops_per_byte(cfg, queries=T, bytes_per_element=4))
