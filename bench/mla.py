"""Absorbed-MLA decoding on a CUDA GPU (chapter 2): the Triton flash-decoding kernel against its peers,
all measured in the same run.

One decode step of one layer with DeepSeek-V3's per-layer widths (128 heads, latent 512 + RoPE 64,
no-RoPE/value head dims 128), bf16, two shapes: batch 64 × context 4096 and batch 16 × context 16384.

    kernel     dsv3lib.model.mla_decode.mla_decode_triton over the latent cache (best of CONFIGS)
    torch      the same absorbed computation in plain PyTorch: bmm + fp32 softmax + bmm
    sdpa       F.scaled_dot_product_attention over the expanded per-head cache (what MHA would cache)
    copy       a device-to-device copy of the latent cache (read + write), the bandwidth yardstick

For each: time per step (median), GB/s of cache read (latent: B·S·576·2 bytes; expanded: B·H·S·320·2),
the kernel's read bandwidth as a fraction of the copy's, and the kernel's speed-up over each peer.
Before timing, the three attention paths are checked against each other (after W_UV).

Usage: python bench/mla.py  (prints "no CUDA GPU: nothing to benchmark" and exits 0 without one)
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

H, C, R, D_NOPE, D_V = 128, 512, 64, 128, 128  # DeepSeek-V3 per-layer MLA widths
SHAPES = [(64, 4096), (16, 16384)]  # (batch, context)
SCALE = (D_NOPE + R) ** -0.5 * (0.1 * math.log(40) + 1) ** 2  # V3 with YaRN: ≈ 0.13523


def make_inputs(B: int, S: int, device="cuda", dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    cache = randn(B, S, C + R)  # LatentCache layout: [c_KV ; k_R] per token
    q_nope, q_pe = randn(B, H, D_NOPE), randn(B, H, R)
    w_uk, w_uv = randn(H, D_NOPE, C, std=C ** -0.5), randn(H, D_V, C, std=C ** -0.5)
    q_latent = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)
    lengths = torch.full((B,), S, dtype=torch.int32, device=device)
    return dict(cache=cache, q_nope=q_nope, q_pe=q_pe, q_latent=q_latent, w_uk=w_uk, w_uv=w_uv, lengths=lengths)


def torch_absorbed(q_latent, q_pe, kv, pe):
    """Plain-PyTorch absorbed decode: (B, H, C) latent outputs."""
    scores = torch.bmm(q_latent, kv.transpose(1, 2)) + torch.bmm(q_pe, pe.transpose(1, 2))  # (B, H, S)
    probs = (scores.float() * SCALE).softmax(-1).to(kv.dtype)
    return torch.bmm(probs, kv)


def expand(inp):
    """The MHA-equivalent cache: per-head keys [W_UK c ; k_R] (B, H, S, 192) and values W_UV c (B, H, S, 128)."""
    kv, pe = inp["cache"][..., :C], inp["cache"][..., C:]
    B, S = kv.shape[:2]
    k = torch.empty(B, H, S, D_NOPE + R, dtype=kv.dtype, device=kv.device)
    k[..., :D_NOPE] = torch.einsum("bsc,hdc->bhsd", kv, inp["w_uk"])
    k[..., D_NOPE:] = pe.unsqueeze(1)
    v = torch.einsum("bsc,hdc->bhsd", kv, inp["w_uv"]).contiguous()
    return k, v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=SCALE)  # (B, H, 1, D_V)


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")  # ms


def measure(B: int, S: int) -> dict:
    """Check the three attention paths against each other, then time each for one (batch, context)."""
    from dsv3lib.model.mla_decode import CONFIGS, mla_decode_ref, mla_decode_triton

    inp = make_inputs(B, S)
    kv, pe = inp["cache"][..., :C], inp["cache"][..., C:]
    ql, qp, lengths = inp["q_latent"], inp["q_pe"], inp["lengths"]
    latent_bytes = B * S * (C + R) * 2
    expanded_bytes = B * H * S * (D_NOPE + R + D_V) * 2

    # correctness first, on the first 4 sequences (the fp32 reference is memory-hungry)
    ref = mla_decode_ref(ql[:4], qp[:4], kv[:4], pe[:4], lengths[:4], SCALE).float()
    got = mla_decode_triton(ql[:4], qp[:4], kv[:4], pe[:4], lengths[:4], SCALE).float()
    tor = torch_absorbed(ql[:4], qp[:4], kv[:4], pe[:4]).float()
    for name, out in (("kernel", got), ("torch", tor)):
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g} against mla_decode_ref"

    def kernel(cfg=None):
        if cfg is None:
            return mla_decode_triton(ql, qp, kv, pe, lengths, SCALE)
        bh, bn, w, st = cfg
        return mla_decode_triton(ql, qp, kv, pe, lengths, SCALE, block_h=bh, block_n=bn, num_warps=w,
                                 num_stages=st)

    best = None  # the kernel: best launch configuration of the sweep
    for cfg in CONFIGS:
        try:
            t = bench(lambda cfg=cfg: kernel(cfg))
        except Exception as e:  # noqa: BLE001  e.g. out of shared memory / registers for this config
            print(f"  config {cfg} failed: {type(e).__name__}")
            continue
        if best is None or t < best[0]:
            best = (t, cfg)
    t_kernel, cfg = best
    t_default = bench(kernel)
    t_torch = bench(lambda: torch_absorbed(ql, qp, kv, pe))
    src = inp["cache"]
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src))

    # SDPA over the expanded cache (after checking it computes the same attention)
    k, v = expand(inp)
    q = torch.cat([inp["q_nope"], qp], -1).unsqueeze(2)  # (B, H, 1, 192)
    o_sdpa = sdpa(q[:4], k[:4], v[:4])[:, :, 0].float()
    o_lat = torch.einsum("bhc,hdc->bhd", ref, inp["w_uv"].float())
    err = ((o_sdpa - o_lat).norm() / o_lat.norm()).item()
    assert err < 3e-2, f"sdpa: relative error {err:.3g} against the absorbed reference"
    t_sdpa = bench(lambda: sdpa(q, k, v))  # the ~21 GB expanded cache is freed on return

    copy_gbs = 2 * latent_bytes / t_copy / 1e6  # read + write
    return dict(B=B, S=S, cfg=cfg, t_kernel=t_kernel, t_default=t_default, t_torch=t_torch, t_sdpa=t_sdpa,
                t_copy=t_copy, gbs_kernel=latent_bytes / t_kernel / 1e6, gbs_torch=latent_bytes / t_torch / 1e6,
                gbs_sdpa=expanded_bytes / t_sdpa / 1e6, copy_gbs=copy_gbs)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = [measure(B, S) for B, S in SHAPES]

    print(f"\n{'shape':>12} {'peer':>8} {'ms/step':>9} {'GB/s':>8} {'of copy':>8} {'kernel ×':>9}")
    for r in rows:
        shape = f"{r['B']}×{r['S']}"
        for name, t, gbs in (("kernel", r["t_kernel"], r["gbs_kernel"]), ("torch", r["t_torch"], r["gbs_torch"]),
                             ("sdpa", r["t_sdpa"], r["gbs_sdpa"]), ("copy", r["t_copy"], r["copy_gbs"])):
            print(f"{shape:>12} {name:>8} {t:9.4f} {gbs:8.0f} {gbs / r['copy_gbs']:8.2f} {t / r['t_kernel']:9.2f}")
        print(f"{'':>12} kernel config (block_h, block_n, warps, stages) = {r['cfg']}; "
              f"default launch {r['t_default']:.4f} ms")
    print("\nGB/s = cache bytes read per step / time (copy: read + write); 'of copy' = that / copy GB/s; "
          "'kernel ×' = peer time / kernel time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
