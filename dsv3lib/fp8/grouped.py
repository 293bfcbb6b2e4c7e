"""All of a MoE layer's FP8 experts in one autograd call, on the reference (CPU) path (chapter 1).

``FP8Linear`` costs about a hundred small tensor ops per call, forward and backward. A MoE layer calls it three
times per routed expert (w1, w3, w2), so on a CPU a tiny model's FP8 step was mostly that overhead. Here one
call takes every expert's rows (sorted by expert, as ``MoE.routed`` lays them out) and does each step of
``FP8LinearFunction`` for all experts at once where the step is row-wise or block-wise — quantising tiles
and blocks, decoding FP8 — and only the GEMMs one expert at a time, as ``fp8_gemm_ref`` does them. Every
number is the one the per-expert calls give (tests/test_fp8_grouped.py checks outputs and gradients bit for
bit), including the corner cases: an expert with no rows gets no gradient (``.grad`` stays None, as when its
Linear is never called), and a weight-gradient sink (zero-bubble pipelines, :mod:`dsv3lib.wgrad`) gets the
dW of every expert that had rows.

A GPU runs the per-expert Triton kernels instead: :func:`grouped_experts` returns None there, and whenever
the experts are not plain bias-free ``FP8Linear`` MLPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dispatch import use_triton
from ..wgrad import accumulate, current_sink
from .gemm import _NEEDS
from .linear import FP8Linear
from .quant import (_cast, _group_scales, _groups, act_dequant, act_quant_ref, expand_b_scales, fp8_to_float,
                    tile_products)

__all__ = ["FP8GroupedLinearFunction", "fp8_grouped_linear", "grouped_experts"]

_ALIGN = 64  # bytes: the CPU allocator's alignment, which every GEMM operand of the per-expert path had


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a fresh copy if a slice left it off the allocator's alignment (a BLAS may take another
    code path, and so round differently, for an unaligned operand)."""
    return t if t.data_ptr() % _ALIGN == 0 else t.clone()


def _blocks(q: torch.Tensor, bs: int) -> list[torch.Tensor]:
    """Decode an (E, R, C) FP8 stack (any strides) into FP32 contraction blocks: ``blocks[i][e]`` is block i of
    ``q[e]`` as a contiguous (R, width) tensor, the layout ``quant._k_blocks`` gives for the matrix ``q[e]``."""
    C = q.shape[-1]
    if C <= bs:
        return [fp8_to_float(q)]
    whole = C // bs * bs
    full = fp8_to_float(q[..., :whole].unflatten(-1, (-1, bs)).movedim(-2, 1))  # (E, nk, R, bs) contiguous
    out = [full[:, i] for i in range(whole // bs)]
    if whole < C:
        out.append(fp8_to_float(q[..., whole:]))
    return out


def _gemm(a_blocks, a_s: torch.Tensor, b_blocks, b_s: torch.Tensor) -> torch.Tensor:
    """``fp8_gemm_ref``'s accumulation on decoded blocks; a_s (M, nk) tile scales, b_s (N or 1, nk) row scales."""
    one = a_s.shape[1] == 1
    acc = None
    for i, (a_blk, b_blk) in enumerate(zip(a_blocks, b_blocks)):
        sa, sb = (a_s, b_s.t()) if one else (a_s[:, i:i + 1], b_s[:, i])
        part = torch.mm(_aligned(a_blk), _aligned(b_blk).t()).mul_(sa).mul_(sb)  # this block · its two scales
        acc = part.add_(0.0) if acc is None else acc.add_(part)
    return acc


def _row_scales(b_s: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    return b_s if b_s.shape[0] in (1, n) else expand_b_scales(b_s, n, bs)


def _stacked_weight_quant(weights, bs: int, name: str):
    """``weight_quant_ref`` of each (N, K) weight, in one pass over the stack: (E, N, K) FP8 and (E, nn, nk)
    scales. Each weight is padded and blocked on its own, so no block straddles two experts."""
    w = torch.stack([t if t.dtype == torch.float32 else t.float() for t in weights])  # (E, N, K)
    N, K = w.shape[1:]
    wb, pad_n = _groups(w, 1, bs)  # (E, nn, bn, K)
    wb, pad_k = _groups(wb, 3, bs)  # (E, nn, bn, nk, bk)
    s = _group_scales(wb.abs().amax(dim=(2, 4)), False, name)  # (E, nn, nk)
    y = (wb / s[:, :, None, :, None]).flatten(3).flatten(1, 2)
    return _cast(y[:, :N, :K] if pad_n or pad_k else y), s


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Rows ``x[r0:r1]`` of expert e (spans from ``counts``) times ``weights[e]``ᵀ, as one FP8Linear each."""

    @staticmethod
    def forward(ctx, x, counts, block_size, *weights):
        bs, (N, K) = block_size, weights[0].shape
        ends = torch.tensor(counts).cumsum(0).tolist()
        spans = [(end - c, end) for c, end in zip(counts, ends)]
        xq, xs = act_quant_ref(x, bs, name="FP8 experts input")  # (R, K), (R, nk)
        wq, ws = _stacked_weight_quant(weights, bs, "FP8 expert weights")  # (E, N, K), (E, nn, nk)
        xb, wb = _blocks(xq.unsqueeze(0), bs), _blocks(wq, bs)
        outs = [_gemm([b[0, r0:r1] for b in xb], xs[r0:r1], [b[e] for b in wb], _row_scales(ws[e], N, bs))
                for e, (r0, r1) in enumerate(spans) if r1 > r0]  # Fprop, expert by expert
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.spans, ctx.block_size, ctx.w_dtype = spans, bs, weights[0].dtype
        leaves = all(isinstance(w, nn.Parameter) for w in weights)
        ctx.sink = current_sink() if leaves else None
        ctx.weights = weights if ctx.sink is not None else None
        y = torch.cat(outs) if outs else x.new_zeros(0, N, dtype=torch.float32)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        bs, spans = ctx.block_size, ctx.spans
        N, K = wq.shape[1:]
        dy2 = dy.float()  # (R, N)
        dx = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy (1×128 along N) @ W_e, expert by expert
            dyq, dys = act_quant_ref(dy2, bs, name="FP8 experts grad_output")
            db, wtb = _blocks(dyq.unsqueeze(0), bs), _blocks(wq.transpose(1, 2), bs)  # Wᵀ: (E, K, N)
            parts = [_gemm([b[0, r0:r1] for b in db], dys[r0:r1], [b[e] for b in wtb],
                           _row_scales(ws[e].t(), K, bs)) for e, (r0, r1) in enumerate(spans) if r1 > r0]
            dx = (torch.cat(parts) if parts else dy2.new_zeros(0, K)).to(dy.dtype)
        need = [ctx.needs_input_grad[3 + e] and r1 > r0 for e, (r0, r1) in enumerate(spans)]
        w_dtype = ctx.w_dtype

        def grads():  # Wgrad: dy_eᵀ @ x_e, both quantised along tokens (128×1 tiles), per expert with rows
            dws = [None] * len(spans)
            if not any(need):
                return dws
            x_hp = act_dequant(xq, xs, bs)  # (R, K): re-tile the cached FP8 input
            width = [(r1 - r0) + (-(r1 - r0) % bs) if n else 0 for n, (r0, r1) in zip(need, spans)]
            t = dy2.new_zeros(N + K, sum(width))  # every expert's [dyᵀ; xᵀ] in its own whole tiles
            starts = torch.tensor([0] + width).cumsum(0).tolist()
            for e, (r0, r1) in enumerate(spans):
                if need[e]:
                    c = starts[e]
                    t[:N, c:c + r1 - r0] = dy2[r0:r1].t()
                    t[N:, c:c + r1 - r0] = x_hp[r0:r1].t()
            tq, ts = act_quant_ref(t, bs, name="FP8 experts grad_output")  # (N + K, Σ Mp), (N + K, Σ Mp/128)
            parts = tile_products(tq, ts, N, bs)  # (tiles, N, K): every tile whole, its own scaled product
            experts = [e for e in range(len(spans)) if need[e]]
            first = torch.tensor([starts[e] // bs for e in experts])
            n_tiles = torch.tensor([width[e] // bs for e in experts])
            acc = parts[first].add_(0.0)  # tile by tile into each expert's FP32 sum, in fp8_gemm_ref's order
            for i in range(1, int(n_tiles.max())):
                more = (n_tiles > i).nonzero().flatten()
                acc[more] = acc[more] + parts[first[more] + i]
            for j, e in enumerate(experts):
                dws[e] = acc[j].to(w_dtype)
            return dws

        if any(need) and ctx.sink is not None:
            weights = ctx.weights

            def later():  # the W op: each expert's dW, added into its .grad as autograd would
                for w, dw in zip(weights, grads()):
                    if dw is not None:
                        accumulate(w, dw)

            if ctx.sink.push(later):
                return (dx, None, None) + (None,) * len(spans)
        return (dx, None, None) + tuple(grads())


def fp8_grouped_linear(x: torch.Tensor, counts: list[int], weights: list[torch.Tensor],
                       block_size: int = 128) -> torch.Tensor:
    """``cat([fp8_linear(x_e, weights[e]) for each expert e])`` for ``x`` (R, K) whose rows come grouped by
    expert, ``counts[e]`` rows each (R = Σ counts); the same bits, far fewer ops."""
    if len(counts) != len(weights) or sum(counts) != x.shape[0]:
        raise ValueError(f"fp8_grouped_linear: counts {list(counts)} must give one row count per weight "
                         f"({len(weights)}) summing to x's {x.shape[0]} rows")
    return FP8GroupedLinearFunction.apply(x, tuple(int(c) for c in counts), block_size, *weights)


def grouped_experts(experts: nn.ModuleList, x: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
    """The routed experts' SwiGLU, ``w2(silu(w1 x) · w3 x)``, for rows grouped by expert, as three grouped FP8
    calls — or None when the per-expert calls must run: on the Triton path, with no rows at all, or unless every expert's w1, w2
    and w3 are bias-free :class:`FP8Linear` layers with one block size and the paper's Dgrad tiles."""
    layers = [(e.w1, e.w2, e.w3) for e in experts]
    if not layers or sum(counts) == 0 or use_triton(x, **_NEEDS):  # no rows: the caller's own corner case
        return None
    bs = layers[0][0].block_size if type(layers[0][0]) is FP8Linear else None
    if not all(type(m) is FP8Linear and m.bias is None and m.block_size == bs and m.dgrad_quant == "tile"
               for trio in layers for m in trio):
        return None
    w1, w2, w3 = ([trio[i].weight for trio in layers] for i in range(3))
    h = F.silu(fp8_grouped_linear(x, counts, w1, bs)) * fp8_grouped_linear(x, counts, w3, bs)
    return fp8_grouped_linear(h, counts, w2, bs)
