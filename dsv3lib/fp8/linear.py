"""``FP8Linear``: a Linear layer whose three GEMMs run in block-scaled FP8, and ``convert_to_fp8`` (chapter 1).

V3 §3.3 / Fig. 6: Fprop (y = x Wᵀ), Dgrad (dx = dy W) and Wgrad (dW = dyᵀ x) all take E4M3 inputs and
accumulate in FP32, with scales applied per 128-element K block:

=======  ==================  =========================  ===================  ====================
GEMM     out (M×N form)      A operand, 1×128 tiles      B operand            contraction (K)
=======  ==================  =========================  ===================  ====================
Fprop    y  (tokens, out)    x, along in-features        W, 128×128 blocks    in-features
Dgrad    dx (tokens, in)     dy, along out-features      Wᵀ, same blocks ᵀ    out-features
Wgrad    dW (out, in)        dyᵀ, along tokens           xᵀ, along tokens     tokens
=======  ==================  =========================  ===================  ====================

The input x is cached in FP8 (1×128 tiles) for the backward pass and re-tiled along tokens there
(dequantise, transpose, requantise: §3.5.2). On the CPU, which has no FP8 GEMM, the operands never become FP8
bytes: :mod:`~dsv3lib.fp8.grid` computes their E4M3 values in FP32 (by compiled kernels where a C compiler is
found, :mod:`~dsv3lib.fp8.cpu_kernels`) and the cache holds those (the same numbers, four times the bytes); layers
reading the same unchanged input share its quantisation, forward and for Wgrad (``grid.Recent``). The weight
parameter stays the FP32 master copy that the optimizer updates; its FP8 blocks are recomputed each forward.
Shapes need not be multiples of 128: the reference path zero-pads partial tiles, Wgrad pads tokens explicitly
(zeros add nothing).

``dgrad_quant="block"`` quantises dy for Dgrad in ``block_size``×``block_size`` blocks (tokens × out-features)
instead of 1×128 tiles: the variant V3 Appendix B.2 reports diverging on a ~16B MoE (activation gradients are
imbalanced across tokens, so one token's outlier sets the scale of 127 others). It exists for that experiment
(chapter 1); the default ``"tile"`` is what the paper trains with. Wgrad keeps its 128×1 tiles either way.

Zero-bubble pipelines (chapter 5) run Wgrad later: if a forward runs while a weight-gradient sink is set
(:mod:`dsv3lib.wgrad`; ``WeightGradStore.capture`` sets it), the backward returns dx and pushes the Wgrad
(and bias-grad) computation to the sink, which adds the same dW into ``.grad`` when it runs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from ..dispatch import use_triton
from ..wgrad import accumulate, current_sink
from . import gemm, grid, quant

__all__ = ["FP8LinearFunction", "FP8Linear", "convert_to_fp8", "fp8_linear", "DGRAD_QUANT"]

DGRAD_QUANT = ("tile", "block")  # how dy is scaled for Dgrad: 1×128 tiles (the paper) or 128×128 blocks (App. B.2)


def check_dgrad_quant(dgrad_quant: str) -> str:
    if dgrad_quant not in DGRAD_QUANT:
        raise ValueError(f"dgrad_quant: expected one of {DGRAD_QUANT}, got {dgrad_quant!r}")
    return dgrad_quant


def _block_quant_rows(dy: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (M, N) quantised in bs×bs blocks, its scales written out per row as (M, ceil(N/bs)) tile scales:
    every row of a block carries that block's scale, so the tile-scaled GEMM computes the block-scaled one."""
    q, s = gemm.weight_quant(dy, bs, name="FP8Linear grad_output")  # (M, N), (ceil(M/bs), ceil(N/bs))
    return q, s.repeat_interleave(bs, dim=0)[:dy.shape[0]]


def _tokens_last(ts: list[torch.Tensor], block: int) -> torch.Tensor:
    """(M, C_i) tensors → one contiguous (ΣC_i, Mp): each transposed so tokens come last (Wgrad contracts over
    them), stacked, zero-padded to Mp, a multiple of ``block``. One pass over the data."""
    M = ts[0].shape[0]
    if M % block == 0:
        return torch.cat([t.t() for t in ts])
    out = ts[0].new_zeros(sum(t.shape[1] for t in ts), M + (-M % block))
    row = 0
    for t in ts:
        out[row:row + t.shape[1], :M] = t.t()
        row += t.shape[1]
    return out


def _x_token_tiles(xg: torch.Tensor, xs: torch.Tensor, bs: int, mp: int):
    """x re-tiled along tokens for Wgrad (V3 §3.5.2: dequantise the cached FP8 input, requantise along tokens):
    x_hp = xg·s, what ``act_dequant`` gives, zero-padded to ``mp`` tokens, then :func:`~dsv3lib.fp8.grid.token_tiles`.
    Sibling layers that read the same input share it (``grid.x_tiles``)."""
    def make():
        M, K = xg.shape
        p = xg.new_empty(mp, K)
        p[M:] = 0  # padded tokens: zeros add nothing
        torch.mul(xg, xs if K <= bs else xs.repeat_interleave(bs, dim=-1)[:, :K], out=p[:M])  # x_hp
        return grid.token_tiles(p, bs, "FP8Linear input", inplace=True)  # finite by construction

    return grid.x_tiles.get((xg, xs), ("linear", bs, mp), make)


def _cpu_wgrad(dy2: torch.Tensor, xg: torch.Tensor, xs: torch.Tensor, bs: int) -> torch.Tensor:
    """Wgrad on the CPU path from x's E4M3 values ``xg`` (M, K) and tile scales ``xs``: dy and x_hp each
    quantised along tokens (128×1 tiles, zero rows up to whole tiles), tile products, summed tile by tile."""
    M, N = dy2.shape
    mp = M + (-M % bs)
    name = "FP8Linear grad_output"
    if mp == M:
        dv, ds = grid.token_tiles(dy2, bs, name)
    else:
        p = dy2.new_zeros(mp, N)
        p[:M] = dy2
        dv, ds = grid.token_tiles(p, bs, name, inplace=True)
    xv, xts = _x_token_tiles(xg, xs, bs, mp)
    return grid.wgrad_values(dv, ds, xv, xts)


class FP8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ (+ b) with Fprop, Dgrad and Wgrad as block-scaled FP8 GEMMs (FP32 accumulation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_size: int,
                dgrad_quant: str = "tile"):
        N, K = weight.shape
        x2 = x.reshape(-1, K)  # (M, K)
        if x.device.type == "cpu" and weight.numel() and not use_triton(x, **gemm._NEEDS):
            # no FP8 GEMM here: the operands' E4M3 values in FP32, without FP8 bytes (grid.py)
            quant.check_block_size(block_size)
            xq, xs = grid.shared_act(x2, block_size, "FP8Linear input")  # (M, K) values, (M, K/128)
            wq, ws = grid.grid_weight(weight, block_size, "FP8Linear weight")  # (N, K) values, (N/128, K/128)
            y = grid.gemm_values(grid.split_k(xq, block_size), xs, grid.split_k(wq, block_size), ws, block_size)
        else:
            xq, xs = gemm.act_quant(x2, block_size, name="FP8Linear input")  # (M, K), (M, K/128)
            wq, ws = gemm.weight_quant(weight, block_size, name="FP8Linear weight")  # (N, K), (N/128, K/128)
            y = gemm.fp8_gemm(xq, xs, wq, ws, block_size=block_size)  # Fprop, (M, N) fp32
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(xq, xs, wq, ws)  # FP8 tensors, or on the CPU path their values in FP32 (4× the bytes)
        ctx.dgrad_quant = dgrad_quant
        ctx.block_size, ctx.has_bias, ctx.x_shape, ctx.w_dtype = block_size, bias is not None, x.shape, weight.dtype
        leaves = isinstance(weight, nn.Parameter) and (bias is None or isinstance(bias, nn.Parameter))
        ctx.sink = current_sink() if leaves else None  # a zero-bubble B: Wgrad may wait for W
        ctx.params = (weight, bias) if ctx.sink is not None else None  # to add into their .grad then
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        bs = ctx.block_size
        N, K = wq.shape
        dy2 = dy.reshape(-1, N).float()  # (M, N)
        cpu = wq.dtype == torch.float32  # the forward kept E4M3 values, not FP8 bytes
        dx = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy (1×128 along N) @ W; Wᵀ's blocks are W's blocks transposed
            if ctx.dgrad_quant == "block" and dy2.shape[0]:
                dyq, dys = _block_quant_rows(dy2, bs)
                dyb = quant._k_blocks(dyq, bs) if cpu else None
            elif cpu:
                dyq, dys = grid.grid_act(dy2, bs, "FP8Linear grad_output")
                dyb = grid.split_k(dyq, bs)
            else:
                dyq, dys = gemm.act_quant(dy2, bs, name="FP8Linear grad_output")
            if cpu:
                dx = grid.gemm_values(dyb, dys, grid.split_k(wq.t(), bs), ws.t(), bs)  # (M, K)
            else:
                dx = gemm.fp8_gemm(dyq, dys, wq.t(), ws.t(), block_size=bs)  # (M, K); Wᵀ (K, N) as a view
            dx = dx.to(dy.dtype).reshape(ctx.x_shape)
        need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        w_dtype = ctx.w_dtype

        def grads():
            dw = db = None
            if need_w and dy2.shape[0] == 0:  # no tokens (an idle expert)
                dw = torch.zeros(N, K, dtype=torch.float32, device=dy.device)
            elif need_w and cpu:  # Wgrad: dyᵀ @ x, both quantised along tokens (128×1 tiles of dy and x)
                dw = _cpu_wgrad(dy2, xq, xs, bs)
            elif need_w:
                x_hp = quant.act_dequant(xq, xs, bs)  # (M, K): re-tile the cached FP8 input
                # dyᵀ (N, Mp) and xᵀ (K, Mp) stacked: the same tiles along tokens, so one quantiser call for both
                # (x_hp is finite by construction: only dy can hold a NaN)
                tq, ts = gemm.act_quant(_tokens_last([dy2, x_hp], bs), bs, name="FP8Linear grad_output")
                dw = gemm.wgrad(tq, ts, N, bs)  # (N, K) fp32 for the master W: dyᵀ tiles · xᵀ tiles
            if dw is not None:
                dw = dw.to(w_dtype)
            if need_b:
                db = dy2.sum(0)
            return dw, db

        if (need_w or need_b) and ctx.sink is not None:
            (weight, bias), store = ctx.params, ctx.sink

            def later():  # the W op: the same dW (and db), added into .grad as autograd would
                dw, db = grads()
                if dw is not None:
                    accumulate(weight, dw)
                if db is not None:
                    accumulate(bias, db.to(bias.dtype))

            if store.push(later):
                return (dx, None, None, None, None)[:len(ctx.needs_input_grad)]
        dw, db = grads()
        return (dx, dw, db, None, None)[:len(ctx.needs_input_grad)]  # apply() may leave dgrad_quant out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               block_size: int = 128, dgrad_quant: str = "tile") -> torch.Tensor:
    """Functional form of :class:`FP8Linear`."""
    return FP8LinearFunction.apply(x, weight, bias, block_size, check_dgrad_quant(dgrad_quant))


class FP8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose forward and backward GEMMs are block-scaled FP8.

    ``weight`` (and ``bias``) are ordinary FP32 parameters — the master copy the optimizer sees; the
    gradient arriving in ``weight.grad`` is the FP32 output of the Wgrad GEMM. ``dgrad_quant``: see the module
    docstring ("tile", the paper's; "block", App. B.2's diverging variant).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block_size: int = 128,
                 dgrad_quant: str = "tile", device=None, dtype=torch.float32):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.block_size, self.dgrad_quant = block_size, check_dgrad_quant(dgrad_quant)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 128, dgrad_quant: str = "tile") -> FP8Linear:
        """An FP8Linear sharing ``linear``'s parameters (made FP32 if they are not already)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.block_size = linear.in_features, linear.out_features, block_size
        new.dgrad_quant = check_dgrad_quant(dgrad_quant)
        w = linear.weight
        new.weight = w if w.dtype == torch.float32 else nn.Parameter(w.detach().float())
        b = linear.bias
        new.bias = b if b is None or b.dtype == torch.float32 else nn.Parameter(b.detach().float())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.block_size, self.dgrad_quant)

    def extra_repr(self) -> str:
        extra = "" if self.dgrad_quant == "tile" else f", dgrad_quant={self.dgrad_quant!r}"
        return super().extra_repr() + f", block_size={self.block_size}" + extra


DEFAULT_SKIP = ("head", "*.head", "*embed*", "*gate*")


def convert_to_fp8(model: nn.Module, *, skip: Iterable[str] = DEFAULT_SKIP, block_size: int = 128,
                   dgrad_quant: str = "tile") -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for an :class:`FP8Linear` sharing its parameters, in place.

    What the paper keeps in high precision stays as it is (V3 §3.3.1): the embedding (an ``nn.Embedding``),
    the output head (the Linear named ``head``, matched by ``skip``), the MoE router (``Gate`` uses
    ``F.linear`` on its own weight, not an ``nn.Linear``), norms and attention operators (not Linears).
    ``skip``: fnmatch patterns on qualified module names; ``dgrad_quant``: see :class:`FP8Linear`. Call it
    before creating the optimizer.
    Returns the model; ``model.fp8_converted`` lists the swapped names.

    A MoE's ``routed_grouped`` path multiplies the stacked expert weights directly (``torch._grouped_mm``),
    bypassing the Linear modules, so a model with ``grouped_mm = True`` anywhere is refused.
    """
    grouped = [n for n, m in model.named_modules() if getattr(m, "grouped_mm", False)]
    if grouped:
        raise ValueError(f"convert_to_fp8: {grouped[0]}.grouped_mm is True; its grouped GEMMs would bypass "
                         "FP8Linear. Set grouped_mm = False to train the experts in FP8")
    skip, dgrad_quant = tuple(skip), check_dgrad_quant(dgrad_quant)
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or any(fnmatch.fnmatchcase(full, p) for p in skip):
                continue
            setattr(module, child_name, FP8Linear.from_linear(child, block_size, dgrad_quant))
            converted.append(full)
    model.fp8_converted = converted
    return model
