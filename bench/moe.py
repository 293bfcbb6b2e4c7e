"""Benchmark (chapter 3): the MoE routed-expert computation on a CUDA GPU, against peers in the same run.

DeepSeek-V2-Lite-like layer: 8,192 tokens, dim 2048, 64 routed experts, top-6, expert width 1408, bf16.
Routing is computed once (by the layer's own gate) and held fixed; what is timed is the expert part:
dispatch (sort), three SwiGLU GEMMs per expert, weighting and combine. Paths:

  library grouped  MoE.routed_grouped after MoE.pack_experts: tokens sorted by expert, all experts in three
                   torch._grouped_mm calls reading each projection's packed (E, ·, ·) weight buffer in place
  grouped, stacks  the same without packing: the experts' weights are stacked (copied) on every call
  library sorted   MoE.routed: the same sort, one call per expert on a contiguous slice
  per-expert loop  peer: for each expert, find its tokens with a mask, run it, index_add back
  sort + grouped   peer: weights pre-stacked as (E, ·, ·) parameters, sort + torch._grouped_mm (torchtitan)

Every path is checked against the per-expert loop run in float32 on a float32 copy of the layer. Figures are
TFLOP/s (2 · N·k · 3 · dim · width per forward; 3× that for forward + backward); the goal is the library's
grouped path at ≥ 1.0× the sort + grouped_mm peer, forward.

    python bench/moe.py            # on a CUDA host; elsewhere prints "no CUDA GPU: nothing to benchmark"
    python bench/moe.py --cpu --tokens 256 --dim 128 --width 96 --experts 8 --topk 2   # smoke test
    python -m bench --only moe     # the same row inside the one-table run (bench/run_all.py)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `bench` and `dsv3lib` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Row, Timer, max_rel_err, print_table  # noqa: E402

SIZES = dict(tokens=8192, dim=2048, experts=64, topk=6, width=1408)
DRY_SIZES = dict(tokens=256, dim=128, experts=8, topk=2, width=96)


def loop_peer(moe, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The common per-expert loop (HF-style): a boolean mask per expert, no sort."""
    y = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        tok, slot = (indices == e).nonzero(as_tuple=True)
        if len(tok):
            y.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None].to(x.dtype))
    return y


class GroupedPeer(torch.nn.Module):
    """Experts stored stacked, as torchtitan does: w1, w3 (E, width, dim), w2 (E, dim, width)."""

    def __init__(self, moe):
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
        out = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offs)
        out = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out)


def measure(timer: Timer, tokens: int, dim: int, experts: int, topk: int, width: int,
            dtype: torch.dtype = torch.bfloat16, judge: bool = True) -> Row:
    from dsv3lib.config import ModelConfig
    from dsv3lib.model import MoE

    device = timer.device
    cfg = ModelConfig.preset("tiny", dim=dim, moe_inter_dim=width, n_routed_experts=experts,
                             n_activated_experts=topk, n_expert_groups=1, n_limited_groups=1, n_shared_experts=0)
    torch.manual_seed(0)
    moe32 = MoE(cfg)
    with torch.no_grad():
        moe32.gate.weight.normal_(std=0.02)
    moe32 = moe32.to(device)
    stacking = copy.deepcopy(moe32).to(dtype)
    moe = copy.deepcopy(stacking).pack_experts()
    peer = GroupedPeer(moe).to(device)
    x = torch.randn(tokens, dim, device=device).to(dtype)
    with torch.no_grad():
        routing = moe.gate(x)  # held fixed for every path
    weights, indices = routing.weights, routing.indices
    counts = torch.bincount(indices.flatten(), minlength=experts)
    row = Row("moe_experts", f"{tokens} tok, dim {dim}, {experts}e top-{topk}, w {width}, {str(dtype)[6:]}",
              "TFLOP/s", goal=">= 1.0x sort+grouped_mm (fwd)", tol=2e-2 if dtype == torch.bfloat16 else 1e-4)
    row.extra["tokens_per_expert"] = [counts.min().item(), counts.max().item()]

    paths = {
        "library grouped": lambda x: moe.routed_grouped(x, weights, indices),
        "grouped, stacks": lambda x: stacking.routed_grouped(x, weights, indices),
        "library sorted": lambda x: moe.routed(x, weights, indices),
        "per-expert loop": lambda x: loop_peer(moe, x, weights, indices),
        "sort+grouped_mm": lambda x: peer(x, weights, indices),
    }
    with torch.no_grad():
        ref = loop_peer(moe32, x.float(), weights.float(), indices)
        errs = {label: max_rel_err(fn(x), ref) for label, fn in paths.items()}
    row.rel_err = errs["library grouped"]
    row.extra["rel_err_paths"] = errs

    fwd_flop = 2 * tokens * topk * 3 * dim * width
    grad_out = torch.randn_like(x)
    fwd, fwd_bwd = {}, {}
    for label, fn in paths.items():
        with torch.no_grad():
            fwd[label] = fwd_flop / timer(lambda fn=fn: fn(x)) / 1e9
        xg = x.detach().requires_grad_(True)
        fwd_bwd[label] = 3 * fwd_flop / timer(lambda fn=fn, xg=xg: fn(xg).backward(grad_out)) / 1e9
    row.ours = fwd["library grouped"]
    row.peers = {k: fwd[k] for k in ("sort+grouped_mm", "per-expert loop")}
    row.set_ratio()
    row.extra.update(fwd_tflops=fwd, fwd_bwd_tflops=fwd_bwd,
                     packing_speedup=fwd["library grouped"] / fwd["grouped, stacks"],
                     fwd_bwd_vs_grouped_mm=fwd_bwd["library grouped"] / fwd_bwd["sort+grouped_mm"])
    if judge:
        row.met = row.ours / row.peers["sort+grouped_mm"] >= 1.0
    return row


def section(timer: Timer, dry: bool) -> list[Row]:
    """The MoE row: the issue's sizes in bf16 on a GPU; small sizes in float32 on the CPU for a dry run."""
    if dry:
        return [measure(timer, **DRY_SIZES, dtype=torch.float32, judge=False)]
    return [measure(timer, **SIZES)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in SIZES.items():
        p.add_argument(f"--{name}", type=int, default=value)
    p.add_argument("--cpu", action="store_true", help="run on the CPU anyway (float32; a smoke test at small sizes)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("no CUDA GPU: nothing to benchmark")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    row = measure(Timer(device), **{k: getattr(args, k) for k in SIZES}, dtype=dtype, judge=device.type == "cuda")
    print_table([row])
    paths = row.extra["fwd_tflops"]
    print(f"\n{'path':<18}{'fwd TFLOP/s':>12}{'fwd+bwd TFLOP/s':>17}{'rel.err':>10}")
    for label, tf in paths.items():
        print(f"{label:<18}{tf:>12.3g}{row.extra['fwd_bwd_tflops'][label]:>17.3g}"
              f"{row.extra['rel_err_paths'][label]:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
