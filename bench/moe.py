"""Benchmark (chapter 3): the MoE routed-expert computation on a CUDA GPU, against peers in the same run.

DeepSeek-V2-Lite-like layer: 8,192 tokens, dim 2048, 64 routed experts, top-6, expert width 1408, bf16.
Routing is computed once (by the layer's own gate) and held fixed; what is timed is the expert part:
dispatch (sort), three SwiGLU GEMMs per expert, weighting and combine. Paths:

  library sorted   MoE.routed: tokens sorted by expert, one call per expert on a contiguous slice
  library grouped  MoE.routed_grouped: the same sort, all experts in three torch._grouped_mm calls
  per-expert loop  peer: for each expert, find its tokens with a mask, run it, index_add back
  sort + grouped   peer: weights pre-stacked as (E, ·, ·) parameters, sort + torch._grouped_mm

Prints ms, TFLOP/s (2 · N·k · 3 · dim · width per forward; 3× that for forward+backward) and the ratio to
the grouped-GEMM peer. Reference (H200, forward): per-expert loop ≈ 11.0 ms (77 TFLOP/s); sort +
torch._grouped_mm ≈ 3.2 ms (265 TFLOP/s).

    python bench/moe.py            # on a CUDA host; elsewhere prints "no CUDA GPU: nothing to benchmark"
    python bench/moe.py --cpu --tokens 256 --dim 128 --width 96 --experts 8 --topk 2   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from dsv3lib.config import ModelConfig
from dsv3lib.model import MoE


def loop_peer(moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The common per-expert loop (HF-style): a boolean mask per expert, no sort."""
    y = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        tok, slot = (indices == e).nonzero(as_tuple=True)
        if len(tok):
            y.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
    return y


class GroupedPeer(torch.nn.Module):
    """Experts stored stacked, as torchtitan does: w1, w3 (E, width, dim), w2 (E, dim, width)."""

    def __init__(self, moe: MoE):
        super().__init__()
        stack = lambda name: torch.nn.Parameter(torch.stack([getattr(e, name).weight.detach() for e in moe.experts]))
        self.w1, self.w2, self.w3 = stack("w1"), stack("w2"), stack("w3")

    def forward(self, x, weights, indices):
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        token_of = order // indices.size(1)
        offs = torch.bincount(flat, minlength=self.w1.size(0)).cumsum(0).to(torch.int32)
        xs = x[token_of]
        h = F.silu(torch._grouped_mm(xs, self.w1.transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(xs, self.w3.transpose(-2, -1), offs=offs)
        out = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offs) * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, out)


def timeit(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Mean wall time in ms over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--width", type=int, default=1408)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cpu", action="store_true", help="run on the CPU anyway (a smoke test at small sizes)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("no CUDA GPU: nothing to benchmark")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16

    cfg = ModelConfig.preset("tiny", dim=args.dim, moe_inter_dim=args.width, n_routed_experts=args.experts,
                             n_activated_experts=args.topk, n_expert_groups=1, n_limited_groups=1,
                             n_shared_experts=0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.02)
    moe = moe.to(device=device, dtype=dtype)
    peer = GroupedPeer(moe).to(device)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    with torch.no_grad():
        routing = moe.gate(x)  # held fixed for every path
    weights, indices = routing.weights, routing.indices
    grad_out = torch.randn_like(x)
    counts = torch.bincount(indices.flatten(), minlength=args.experts)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: {args.tokens} tokens, dim {args.dim}, {args.experts} experts, "
          f"top-{args.topk}, width {args.width}, bf16; tokens per expert {counts.min().item()}–{counts.max().item()}")

    paths = {
        "library sorted": lambda x: moe.routed(x, weights, indices),
        "library grouped": lambda x: moe.routed_grouped(x, weights, indices),
        "per-expert loop": lambda x: loop_peer(moe, x, weights, indices),
        "sort + grouped_mm": lambda x: peer(x, weights, indices),
    }
    with torch.no_grad():  # all paths compute the same thing
        ref = paths["per-expert loop"](x).float()
        for label, fn in paths.items():
            err = (fn(x).float() - ref).abs().max().item() / ref.abs().max().item()
            assert err < 2e-2, f"{label}: relative error {err:.3g} against the per-expert loop"

    fwd_flop = 2 * args.tokens * args.topk * 3 * args.dim * args.width
    rows = []
    for label, fn in paths.items():
        with torch.no_grad():
            f_ms = timeit(lambda fn=fn: fn(x), device, args.warmup, args.iters)
        xg = x.detach().requires_grad_(True)
        b_ms = timeit(lambda fn=fn, xg=xg: fn(xg).backward(grad_out), device, args.warmup, args.iters)
        rows.append((label, f_ms, b_ms))
    peer_f, peer_b = rows[-1][1], rows[-1][2]
    print(f"{'path':<20}{'fwd ms':>9}{'TFLOP/s':>9}{'vs peer':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'vs peer':>9}")
    for label, f_ms, b_ms in rows:
        print(f"{label:<20}{f_ms:>9.3f}{fwd_flop / f_ms / 1e9:>9.1f}{peer_f / f_ms:>8.2f}x"
              f"{b_ms:>12.3f}{3 * fwd_flop / b_ms / 1e9:>9.1f}{peer_b / b_ms:>8.2f}x")
    print("vs peer: the grouped-GEMM peer's time divided by this path's (> 1: faster than the peer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
