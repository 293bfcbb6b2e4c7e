"""Absorbed-MLA decoding on a CUDA GPU (chapter 2): the Triton flash-decoding kernel against its peers,
all measured in the same run.

One decode step of one layer with DeepSeek-V3's per-layer widths (128 heads, latent 512 + RoPE 64,
no-RoPE/value head dims 128), bf16, two shapes: batch 64 × context 4096 and batch 16 × context 16384.

    kernel     dsv3lib.model.mla_decode.mla_decode_triton over the latent cache (best of CONFIGS)
    torch      the same absorbed computation in plain PyTorch: bmm + fp32 softmax + bmm
    sdpa       F.scaled_dot_product_attention over the expanded per-head cache (what MHA would cache)
    copy       a device-to-device copy of the latent cache (read + write), the bandwidth yardstick

Each path's figure is GB/s of *latent* cache per step (B·S·576·2 bytes over its time), so ratios between
paths are speed-ups; the SDPA path actually reads the expanded cache (B·H·S·320·2 bytes, in ``extra``).
Goal: the kernel reads the latent cache at ≥ 70% of copy bandwidth (copy GB/s counts read + write).
Before timing, the kernel and the torch path are checked against ``mla_decode_ref`` and SDPA against
the absorbed reference after W_UV.

    python bench/mla.py            # prints "no CUDA GPU: nothing to benchmark" and exits 0 without one
    python -m bench --only mla     # the same rows inside the one-table run (bench/run_all.py)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `bench` and `dsv3lib` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Row, Timer, max_rel_err  # noqa: E402

V3 = dict(H=128, C=512, R=64, D_NOPE=128, D_V=128)  # DeepSeek-V3 per-layer MLA widths
DRY = dict(H=16, C=64, R=16, D_NOPE=32, D_V=32)  # small widths for Triton's interpreter
SHAPES, DRY_SHAPES = [(64, 4096), (16, 16384)], [(2, 96)]  # (batch, context)


def softmax_scale(d: dict) -> float:
    """V3's scale with YaRN's mscale (factor 40, mscale_all_dim 1): ≈ 0.13523 at the V3 widths."""
    return (d["D_NOPE"] + d["R"]) ** -0.5 * (0.1 * math.log(40) + 1) ** 2


def make_inputs(B: int, S: int, d: dict, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    H, C, R = d["H"], d["C"], d["R"]
    cache = randn(B, S, C + R)  # LatentCache layout: [c_KV ; k_R] per token
    q_nope, q_pe = randn(B, H, d["D_NOPE"]), randn(B, H, R)
    w_uk, w_uv = randn(H, d["D_NOPE"], C, std=C ** -0.5), randn(H, d["D_V"], C, std=C ** -0.5)
    q_latent = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)
    lengths = torch.full((B,), S, dtype=torch.int32, device=device)
    return dict(cache=cache, q_nope=q_nope, q_pe=q_pe, q_latent=q_latent, w_uk=w_uk, w_uv=w_uv, lengths=lengths)


def torch_absorbed(q_latent, q_pe, kv, pe, scale):
    """Plain-PyTorch absorbed decode: (B, H, C) latent outputs."""
    scores = torch.bmm(q_latent, kv.transpose(1, 2)) + torch.bmm(q_pe, pe.transpose(1, 2))  # (B, H, S)
    probs = (scores.float() * scale).softmax(-1).to(kv.dtype)
    return torch.bmm(probs, kv)


def expand(inp, d: dict):
    """The MHA-equivalent cache: per-head keys [W_UK c ; k_R] (B, H, S, D_NOPE+R) and values W_UV c."""
    C, D_NOPE = d["C"], d["D_NOPE"]
    kv, pe = inp["cache"][..., :C], inp["cache"][..., C:]
    B, S = kv.shape[:2]
    k = torch.empty(B, d["H"], S, D_NOPE + d["R"], dtype=kv.dtype, device=kv.device)
    k[..., :D_NOPE] = torch.einsum("bsc,hdc->bhsd", kv, inp["w_uk"])
    k[..., D_NOPE:] = pe.unsqueeze(1)
    v = torch.einsum("bsc,hdc->bhsd", kv, inp["w_uv"]).contiguous()
    return k, v


def measure(timer: Timer, B: int, S: int, d: dict, sweep: bool) -> Row:
    """Check the three attention paths, then time each for one (batch, context)."""
    from dsv3lib.model.mla_decode import CONFIGS, mla_decode_ref, mla_decode_triton

    H, C, R = d["H"], d["C"], d["R"]
    scale = softmax_scale(d)
    inp = make_inputs(B, S, d, timer.device)
    kv, pe = inp["cache"][..., :C], inp["cache"][..., C:]
    ql, qp, lengths = inp["q_latent"], inp["q_pe"], inp["lengths"]
    latent_bytes = B * S * (C + R) * 2
    row = Row("mla_decode", f"B{B} x S{S}, H{H}, {C}+{R}", "GB/s", goal=">= 0.70x copy bandwidth",
              tol=2e-2)  # bf16 output: rounding of the result alone is ~4e-3

    # correctness first, on the first 4 sequences (the fp32 reference is memory-hungry)
    n = min(B, 4)
    ref = mla_decode_ref(ql[:n], qp[:n], kv[:n], pe[:n], lengths[:n], scale).float()
    row.rel_err = max_rel_err(mla_decode_triton(ql[:n], qp[:n], kv[:n], pe[:n], lengths[:n], scale), ref)
    row.extra["rel_err_torch"] = max_rel_err(torch_absorbed(ql[:n], qp[:n], kv[:n], pe[:n], scale), ref)

    def kernel(cfg=None):
        if cfg is None:
            return mla_decode_triton(ql, qp, kv, pe, lengths, scale)
        bh, bn, w, st = cfg
        return mla_decode_triton(ql, qp, kv, pe, lengths, scale, block_h=bh, block_n=bn, num_warps=w, num_stages=st)

    t_kernel, cfg = timer(kernel), None  # the default launch, then the sweep's best if it is faster
    row.extra["default_ms"] = t_kernel
    failed = []
    for c in CONFIGS if sweep else []:
        try:
            t = timer(lambda c=c: kernel(c))
        except Exception as e:  # noqa: BLE001  e.g. out of shared memory / registers for this config
            failed.append(f"{c}: {type(e).__name__}")
            continue
        if t < t_kernel:
            t_kernel, cfg = t, c
    if failed:
        row.notes.append(f"{len(failed)} of {len(CONFIGS)} launch configs failed, e.g. {failed[0]}")
    t_torch = timer(lambda: torch_absorbed(ql, qp, kv, pe, scale))
    dst = torch.empty_like(inp["cache"])
    t_copy = timer(lambda: dst.copy_(inp["cache"]))

    # SDPA over the expanded cache, after checking it computes the same attention
    k, v = expand(inp, d)
    q = torch.cat([inp["q_nope"], qp], -1).unsqueeze(2)  # (B, H, 1, D_NOPE + R)
    o_sdpa = F.scaled_dot_product_attention(q[:n], k[:n], v[:n], scale=scale)[:, :, 0]
    row.extra["rel_err_sdpa"] = max_rel_err(o_sdpa, torch.einsum("bhc,hdc->bhd", ref, inp["w_uv"].float()))
    t_sdpa = timer(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))  # k, v freed on return

    row.ours = latent_bytes / t_kernel / 1e6
    row.peers.update(torch=latent_bytes / t_torch / 1e6, sdpa=latent_bytes / t_sdpa / 1e6,
                     copy=2 * latent_bytes / t_copy / 1e6)
    row.set_ratio(["torch", "sdpa"])  # the speed-up over the faster attention peer
    row.extra.update(of_copy=row.ours / row.peers["copy"], config=cfg, ms=t_kernel, torch_ms=t_torch,
                     sdpa_ms=t_sdpa, copy_ms=t_copy,
                     sdpa_expanded_gbs=B * H * S * (d["D_NOPE"] + R + d["D_V"]) * 2 / t_sdpa / 1e6)
    row.notes.append(f"kernel reads the latent cache at {row.extra['of_copy']:.2f}x copy bandwidth; "
                     f"config (block_h, block_n, warps, stages) = {cfg or 'default'}")
    return row


def section(timer: Timer, dry: bool) -> list[Row]:
    """The MLA rows: V3 widths on a GPU (with the launch-config sweep), small widths in the interpreter."""
    rows = [measure(timer, B, S, DRY if dry else V3, sweep=not dry) for B, S in (DRY_SHAPES if dry else SHAPES)]
    if not dry:
        for r in rows:
            r.met = r.extra["of_copy"] >= 0.70
    return rows


def main() -> int:
    from bench.common import print_table

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (python -m bench --dry-run runs these rows on the CPU)")
        return 0
    print_table(section(Timer(torch.device("cuda"), rep_ms=200), dry=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
