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
from . import cpu_kernels
from .grid import (_kernel_status, grid_act, shared_act, tile_bmm, tile_products_fp32, token_tiles, values_of,
                   x_tiles)
from .quant import _absmax, _group_scales, _groups

__all__ = ["FP8GroupedLinearFunction", "fp8_grouped_linear", "grouped_experts"]

_ALIGN = 64  # bytes: the CPU allocator's alignment, which every GEMM operand of the per-expert path had


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a fresh copy if a slice left it off the allocator's alignment (a BLAS may take another
    code path, and so round differently, for an unaligned operand)."""
    return t if t.data_ptr() % _ALIGN == 0 else t.clone()


def _blocks(v: torch.Tensor, bs: int) -> list[torch.Tensor]:
    """Cut a decoded (E, R, C) stack (any strides) into FP32 contraction blocks: ``blocks[i][e]`` is block i of
    ``v[e]`` as a contiguous (R, width) tensor, the layout ``quant._k_blocks`` gives for the matrix ``v[e]``."""
    C = v.shape[-1]
    if C <= bs:
        return [v.contiguous()]
    whole = C // bs * bs
    full = v[..., :whole].unflatten(-1, (-1, bs)).movedim(-2, 1).contiguous()  # (E, nk, R, bs)
    out = [full[:, i] for i in range(whole // bs)]
    if whole < C:
        out.append(v[..., whole:].contiguous())
    return out


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[:] = a @ bᵀ`` computed as ``torch.mm`` of aligned operands computes it (into ``out`` itself where that
    is aligned too, else into a fresh tensor copied over: a copy changes no bit)."""
    a, b = _aligned(a), _aligned(b).t()
    if out.data_ptr() % _ALIGN == 0:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _rows_aligned(t: torch.Tensor) -> bool:
    """Whether every row of the 2-D (or each matrix's rows of a 3-D) ``t`` starts on the allocator's alignment."""
    return t.data_ptr() % _ALIGN == 0 and t.stride(-2) * t.element_size() % _ALIGN == 0 and (
        t.dim() == 2 or t.stride(0) * t.element_size() % _ALIGN == 0)


def _gemm(a_blocks, a_s: torch.Tensor, b_blocks, b_s: torch.Tensor, spans, n: int) -> torch.Tensor:
    """Every expert's ``fp8_gemm_ref`` at once, into one (R, n) FP32 tensor.

    a_blocks[i]: (R, width) block i of the rows (all experts); a_s: (R, nk) their tile scales; b_blocks[i]:
    (E, n, width) block i of each expert's B; b_s: (E, 1 or n, nk) B's row scales. Only the mm runs expert by
    expert (into its own rows): one ``torch._grouped_mm`` call, which on the CPU runs that loop of mm, when every
    expert's operands and output rows are aligned as a fresh tensor is (widths multiples of 16), else the loop
    here; each block's two scale multiplies and its add into the accumulator run once over all rows, element by
    element the same operations in the same order as the per-expert calls.
    """
    R = a_s.shape[0]
    counts = torch.tensor([r1 - r0 for r0, r1 in spans])
    owner = torch.repeat_interleave(torch.arange(len(spans)), counts)  # (R,): the expert of each row
    offs = None
    acc = None
    for i, (a_blk, b_blk) in enumerate(zip(a_blocks, b_blocks)):
        if n * a_blk.element_size() % _ALIGN == 0 and _rows_aligned(a_blk) and _rows_aligned(b_blk):
            offs = counts.cumsum(0).to(torch.int32) if offs is None else offs
            part = torch._grouped_mm(a_blk, b_blk.transpose(1, 2), offs=offs)  # (R, n)
        else:
            part = a_blk.new_empty(R, n)
            for e, (r0, r1) in enumerate(spans):
                if r1 > r0:
                    _mm_into(part[r0:r1], a_blk[r0:r1], b_blk[e])
        sb = b_s[:, :, i].index_select(0, owner)  # (R, 1 or n): each row's expert's scales
        if cpu_kernels.serves(part):  # the same multiplies and add, one pass
            cpu_kernels.scale_acc(part, a_s[:, i], sb, part if acc is None else acc, acc is None)
            acc = part if acc is None else acc
            continue
        part.mul_(a_s[:, i:i + 1]).mul_(sb)  # this block · its two scales
        acc = part.add_(0.0) if acc is None else acc.add_(part)  # 0.0 + part: as if acc had started at zero
    return acc


def _row_scales(b_s: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    """(E, nb, nk) block scales of a stack of (n, ·) B matrices as (E, 1 or n, nk) row scales."""
    return b_s if b_s.shape[1] in (1, n) else b_s.repeat_interleave(bs, 1)[:, :n]


def _stacked_weight_grid(weights, bs: int, name: str):
    """``weight_quant_ref`` of each (N, K) weight, in one pass over the stack, as the FP8 values in FP32 (E, N, K)
    and (E, nn, nk) scales (see :mod:`~dsv3lib.fp8.grid`). Each weight is padded and blocked on its own, so no
    block straddles two experts. The compiled CPU kernel does it where it serves, else
    :func:`_stacked_weight_grid_ref`."""
    w = torch.stack([t if t.dtype == torch.float32 else t.float() for t in weights])  # (E, N, K)
    if not cpu_kernels.serves(w):
        return _stacked_weight_grid_ref(w, bs, name)
    v, s, status = cpu_kernels.weight_blocks(w, bs)
    return (v, s) if status == 0 else _kernel_status(status, w, name, lambda: _stacked_weight_grid_ref(w, bs, name))


def _stacked_weight_grid_ref(w: torch.Tensor, bs: int, name: str):
    """:func:`_stacked_weight_grid` of the (E, N, K) FP32 stack ``w``, in PyTorch."""
    N, K = w.shape[1:]
    wb, pad_n = _groups(w, 1, bs)  # (E, nn, bn, K)
    wb, pad_k = _groups(wb, 3, bs)  # (E, nn, bn, nk, bk)
    s, lo = _group_scales(_absmax(wb, (2, 4)), False, name)  # (E, nn, nk)
    y = (wb / s[:, :, None, :, None]).flatten(3).flatten(1, 2)
    return values_of(y[:, :N, :K] if pad_n or pad_k else y, s, lo), s


def _by_expert_tiles(src: torch.Tensor, spans, first, n_tiles, bs: int, scales: torch.Tensor | None = None):
    """Each expert's rows of ``src`` (R, C) in its own whole tiles of tokens, zero rows after them: (tiles·bs, C),
    times ``scales`` (R, 1 or C) on the way if given (x_hp = x's values · their scales, as ``act_dequant``)."""
    out = src.new_empty(sum(n_tiles) * bs, src.shape[1])
    for (r0, r1), f, n in zip(spans, first, n_tiles):
        if n:
            c, rows = f * bs, r1 - r0
            if scales is None:
                out[c:c + rows] = src[r0:r1]
            else:
                torch.mul(src[r0:r1], scales[r0:r1], out=out[c:c + rows])
            out[c + rows:c + n * bs] = 0  # padded tokens: zeros add nothing
    return out


def _expert_token_tiles(xd: torch.Tensor, xs: torch.Tensor, dy: torch.Tensor, spans, need, bs: int):
    """Wgrad's token tiles for every expert that needs its dW: dy and x_hp laid out with each expert's tokens
    zero-padded to whole tiles, quantised along tokens as one ``act_quant_ref`` call of the tokens-last stack
    [dyᵀ; xᵀ] would (:func:`~dsv3lib.fp8.grid.token_tiles`). x enters as its FP8 values ``xd`` and tile scales
    ``xs``; its re-tiled form is shared by sibling calls on the same rows (``grid.x_tiles``: w1 and w3). Returns
    (dy values, dy scales, x values, x scales) and each kept expert's first tile and tile count."""
    K = xd.shape[1]
    first, n_tiles = [], []
    for e, (r0, r1) in enumerate(spans):
        first.append(sum(n_tiles))
        n_tiles.append(-(-(r1 - r0) // bs) if need[e] else 0)

    def x_part():
        x_scales = xs if K <= bs else xs.repeat_interleave(bs, dim=-1)[:, :K]  # (R, 1 or K)
        px = _by_expert_tiles(xd, spans, first, n_tiles, bs, x_scales)
        return token_tiles(px, bs, "FP8 experts input", inplace=True)  # finite by construction

    xv, xts = x_tiles.get((xd, xs), ("experts", bs, tuple(spans), tuple(need)), x_part)
    pdy = _by_expert_tiles(dy, spans, first, n_tiles, bs)
    dv, dts = token_tiles(pdy, bs, "FP8 experts grad_output", inplace=True)
    keep = [e for e in range(len(spans)) if need[e]]
    return (dv, dts, xv, xts), [first[e] for e in keep], [n_tiles[e] for e in keep]


def _expert_sums(tiles, first: list[int], n_tiles: list[int]) -> list[torch.Tensor]:
    """Each expert's dW (N, K) in FP32 from the token tiles (dy's and x's values and scales,
    :func:`_expert_token_tiles`): its tiles' products summed tile by tile from zero, in ``fp8_gemm_ref``'s order."""
    dv, dts, xv, xts = tiles
    if cpu_kernels.serves(dv):
        parts = tile_bmm(dv, xv)  # (tiles, N, K), unscaled: the kernel scales and sums
        out = parts.new_empty(len(first), *parts.shape[1:])  # one dW per kept expert
        for j, (f, n) in enumerate(zip(first, n_tiles)):
            cpu_kernels.tile_sum(parts[f:f + n], dts[f:f + n], xts[f:f + n], out[j])
        return list(out.unbind(0))
    parts = tile_products_fp32(dv, dts, xv, xts)
    acc = parts[first].add_(0.0)  # tile by tile into each expert's FP32 sum
    for i in range(1, max(n_tiles)):
        more = [j for j, n in enumerate(n_tiles) if n > i]
        acc.index_add_(0, torch.tensor(more), parts[[first[j] + i for j in more]])
    return list(acc.unbind(0))


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Rows ``x[r0:r1]`` of expert e (spans from ``counts``) times ``weights[e]``ᵀ, as one FP8Linear each.

    The FP8 values of the input and weights are computed once, in the forward, in FP32 without FP8 bytes
    (:mod:`~dsv3lib.fp8.grid`), and kept for Dgrad and Wgrad: the numbers FP8 tensors decode to, four times
    the bytes."""

    @staticmethod
    def forward(ctx, x, counts, block_size, *weights):
        bs, N = block_size, weights[0].shape[0]
        ends = torch.tensor(counts).cumsum(0).tolist()
        spans = [(end - c, end) for c, end in zip(counts, ends)]
        xd, xs = shared_act(x, bs, "FP8 experts input")  # (R, K) FP8 values in FP32, (R, nk); w1, w3 share
        wd, ws = _stacked_weight_grid(weights, bs, "FP8 expert weights")  # (E, N, K) values, (E, nn, nk)
        y = _gemm([b[0] for b in _blocks(xd.unsqueeze(0), bs)], xs, _blocks(wd, bs), _row_scales(ws, N, bs),
                  spans, N)  # Fprop
        ctx.save_for_backward(xd, xs, wd, ws)
        ctx.spans, ctx.block_size, ctx.w_dtype = spans, bs, weights[0].dtype
        leaves = all(isinstance(w, nn.Parameter) for w in weights)
        ctx.sink = current_sink() if leaves else None
        ctx.weights = weights if ctx.sink is not None else None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xd, xs, wd, ws = ctx.saved_tensors
        bs, spans = ctx.block_size, ctx.spans
        N, K = wd.shape[1:]
        dy2 = dy.float()  # (R, N)
        dx = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy (1×128 along N) @ W_e; Wᵀ's blocks are W's blocks transposed
            dyd, dys = grid_act(dy2, bs, "FP8 experts grad_output")
            dx = _gemm([b[0] for b in _blocks(dyd.unsqueeze(0), bs)], dys,
                       _blocks(wd.transpose(1, 2), bs), _row_scales(ws.transpose(1, 2), K, bs), spans, K)
            dx = dx.to(dy.dtype)
        need = [ctx.needs_input_grad[3 + e] and r1 > r0 for e, (r0, r1) in enumerate(spans)]
        w_dtype = ctx.w_dtype

        def grads():  # Wgrad: dy_eᵀ @ x_e, both quantised along tokens (128×1 tiles), per expert with rows
            dws = [None] * len(spans)
            if not any(need):
                return dws
            tiles, first, n_tiles = _expert_token_tiles(xd, xs, dy2, spans, need, bs)  # dy's and x's token tiles
            sums = _expert_sums(tiles, first, n_tiles)
            for j, e in enumerate(e for e in range(len(spans)) if need[e]):
                dws[e] = sums[j].to(w_dtype)
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
    calls — or None when the per-expert calls must run: on the Triton path, with no rows at all, or unless every
    expert's w1, w2 and w3 are bias-free :class:`FP8Linear` layers with one block size and the paper's Dgrad tiles."""
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
