"""DeepSeekMoE: shared + fine-grained routed experts with a sigmoid, group-limited gate (chapters 0 and 3).

V3 §2.1.2 eq. 12–16. Affinities s = sigmoid(u·e_i). The per-expert correction bias b (auxiliary-loss-free
balancing) is added only to choose experts: groups are ranked by the sum of their top-2 biased scores
(``group_score="top2"``, as DeepSeek's released code and Hugging Face's ``deepseek_v3`` do; the paper's
wording, top ``n_activated_experts // n_limited_groups``, is ``"paper"``: the same for V3's 8 // 4), the best
``n_limited_groups`` groups are kept, and the top ``n_activated_experts`` experts are chosen inside them.
The weights use the raw s of the chosen experts, normalised to sum to 1 (``norm_topk_prob``) and multiplied
by ``route_scale``. No token is dropped.

The gate returns its decision as a :class:`Routing` (weights, indices, scores, token_shape); whoever needs
more than the weights and indices (load statistics, the auxiliary balancing losses of chapter 3) reads the
Routing through a forward hook on the gate (``gate.register_forward_hook(lambda gate, args, routing: ...)``),
as :mod:`dsv3lib.balancing` does: the gate keeps nothing about past forwards. :func:`sort_by_expert` and
:func:`combine` are the dispatch and combine steps shared by both expert paths and expert parallelism.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..fp8.grouped import grouped_experts
from ..wgrad import accumulate, current_sink
from .dtypes import keep_dtype

__all__ = ["MLP", "Routing", "Gate", "MoE", "sort_by_expert", "combine", "stacked_view"]


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) · w3 x). Dense FFN, routed expert and shared expert alike."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Routing(NamedTuple):
    """What a :class:`Gate` decided for N tokens: its forward's return value, also what its forward hooks see."""

    weights: torch.Tensor  # (N, topk) gate values g, in the input's dtype
    indices: torch.Tensor  # (N, topk) chosen experts, long
    scores: torch.Tensor  # (N, n_routed_experts) affinities s, float32, differentiable (the aux losses)
    token_shape: tuple[int, ...]  # how the N tokens were laid out, e.g. (B, T): the input's shape[:-1]


class Gate(nn.Module):
    """Router: picks ``n_activated_experts`` experts per token and their weights.

    ``bias`` is a buffer, not a parameter: no gradient reaches it; a balancing rule updates it between
    steps from the loads it reads in the returned :class:`Routing` (chapter 3, :mod:`dsv3lib.balancing`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.init_std)
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Casting the model (.to(torch.bfloat16)) must not round the bias: balancing moves it in steps of
        # ~1e-3, below bf16's resolution near 1 (the official code keeps it in fp32 too).
        return super()._apply(keep_dtype(fn, lambda t: t is self.bias), recurse)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s (N, n_routed_experts) in float32 (the gate runs in high precision, V3 §3.3.1)."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.cfg.score_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (N, topk) of the chosen experts, from biased scores under the group limit: a group's
        score is the sum of its ``cfg.group_score_k`` best biased scores (2 by default, module docstring)."""
        biased = scores + self.bias  # b changes which experts win, never their weights (eq. 16)
        if self.n_groups > 1:
            grouped = biased.view(-1, self.n_groups, self.cfg.experts_per_group)  # (N, n_groups, per group)
            k = min(self.cfg.group_score_k, grouped.size(-1))
            group_scores = grouped.topk(k, dim=-1).values.sum(-1)  # (N, n_groups)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor) -> Routing:
        """Args: x (..., dim), e.g. (B, T, dim) or (N, dim). Returns the :class:`Routing` of its
        N = x.numel() // dim tokens, flattened in order; ``token_shape`` is x.shape[:-1]."""
        scores = self.scores(x.reshape(-1, x.size(-1)))  # (N, n_routed_experts)
        indices = self.select(scores)
        weights = scores.gather(1, indices)  # raw affinities of the chosen experts (eq. 13)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # eq. 14
        weights = weights * self.cfg.route_scale
        return Routing(weights.to(x.dtype), indices, scores, tuple(x.shape[:-1]))


class MoE(nn.Module):
    """h' = Σ shared(u) + Σ_i g_i · expert_i(u) (eq. 12; the residual is added by the block).

    Two interchangeable expert paths, same signature: :meth:`routed` (one call per expert on its
    contiguous slice, the reference) and :meth:`routed_grouped` (all experts in three grouped GEMMs,
    no host sync); ``grouped_mm = True`` makes forward use the latter (chapter 3 benchmarks both).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (
            MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts > 0 else None
        )
        self.grouped_mm = False  # forward through routed_grouped instead of routed

    def pack_experts(self) -> MoE:
        """Store each projection's routed-expert weights (all w1, all w2, all w3) in one (E, out, in) buffer, every
        expert's weight a slice of it, so :meth:`routed_grouped` hands the grouped GEMMs a view of the buffer
        instead of stacking (copying) every expert weight on every call (bench/README.md weighs that copy against
        the GEMMs). The parameters stay the same objects with the same values and gradients; what moves them
        (``.to``, ``copy.deepcopy``) gives each its own storage again, and the path then stacks as before until
        packed again. Returns the module."""
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                params = [getattr(e, name).weight for e in self.experts]
                if params and stacked_view(params) is None:
                    buffer = torch.stack([p.detach() for p in params])
                    for p, part in zip(params, buffer.unbind(0)):
                        p.data = part
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        routing = self.gate(x)
        x = x.reshape(-1, shape[-1])  # (N, dim)
        y = (self.routed_grouped if self.grouped_mm else self.routed)(x, routing.weights, routing.indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sorted dispatch: the (token, expert) pairs are sorted by expert so each expert runs once on a
        contiguous slice; the weighted outputs are added back to their tokens."""
        order, token_of, counts = sort_by_expert(indices, len(self.experts))
        xs, counts = x[token_of], counts.tolist()  # (N·topk, dim), grouped by expert
        out = grouped_experts(self.experts, xs, counts)  # FP8 experts on the CPU: the same bits, fewer ops
        if out is None:
            out = torch.cat([self.experts[e](chunk) for e, chunk in enumerate(xs.split(counts)) if len(chunk)])
        return combine(out, weights, order, token_of)

    def routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Same result as :meth:`routed`, with every expert's w1, w3 and w2 applied as three grouped GEMMs
        (``torch._grouped_mm`` over the expert-sorted rows, group boundaries ``offs``). The expert weights
        are stacked on each call unless :meth:`pack_experts` has put them in one buffer; either way gradients
        reach each expert's own Linear (under a zero-bubble capture they wait for ``W``, as linear layers' do).
        CUDA needs bf16 and sm90+; the CPU kernel takes float32 too."""
        order, token_of, counts = sort_by_expert(indices, len(self.experts))
        offs = counts.cumsum(0).to(torch.int32)  # group ends
        xs = x[token_of]  # (N·topk, dim), grouped by expert
        w1, w2, w3 = ([getattr(e, name).weight for e in self.experts] for name in ("w1", "w2", "w3"))
        h = F.silu(_grouped_linear(xs, w1, offs)) * _grouped_linear(xs, w3, offs)  # (N·topk, inter)
        out = _grouped_linear(h, w2, offs)  # (N·topk, dim)
        return combine(out, weights, order, token_of)


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch order of the N·topk (token, expert) pairs of ``indices`` (N, topk): sorted by expert, stably
    (within an expert, in token order). Returns ``order`` (N·topk,), the flat pair index of each sorted
    slot; ``token_of`` (N·topk,), its token (rows ``x[token_of]`` come grouped by expert); ``counts``
    (n_experts,) long, the size of each expert's group."""
    flat = indices.flatten()  # (N·topk,)
    order = flat.argsort(stable=True)
    token_of = order // indices.size(1)
    return order, token_of, torch.bincount(flat, minlength=n_experts)


def combine(out: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`sort_by_expert`: expert outputs ``out`` (N·topk, dim), in sorted order, times
    their gate weights (``weights`` (N, topk)), added up per token. Returns (N, dim)."""
    out = out * weights.flatten()[order].unsqueeze(-1)
    return out.new_zeros(weights.size(0), out.size(-1)).index_add_(0, token_of, out)


def stacked_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The (E, out, in) view of ``weights`` when they are consecutive slices of one buffer (as
    :meth:`MoE.pack_experts` leaves them), detached from autograd; ``None`` when they are not."""
    w0 = weights[0]
    if w0.dim() != 2 or not w0.is_contiguous():
        return None
    n, ptr, start = w0.numel(), w0.untyped_storage().data_ptr(), w0.storage_offset()
    for e, w in enumerate(weights):
        if (w.shape != w0.shape or w.dtype != w0.dtype or w.device != w0.device or not w.is_contiguous()
                or w.untyped_storage().data_ptr() != ptr or w.storage_offset() != start + e * n):
            return None
    return w0.detach().as_strided((len(weights), *w0.shape), (n, w0.shape[1], 1))


def _grouped_linear(x: torch.Tensor, weights: list, offs: torch.Tensor) -> torch.Tensor:
    """Rows of group e (ending at ``offs[e]``) times expert e's ``weights[e]``ᵀ (out, in): one grouped GEMM.
    Packed weights (:meth:`MoE.pack_experts`) are read in place; otherwise they are stacked. While a
    weight-gradient sink is set (a zero-bubble pipeline's forward, :mod:`dsv3lib.wgrad`), the experts' dW may
    wait for the ``W`` op."""
    sink, packed = current_sink(), stacked_view(weights)
    if sink is None and packed is None:
        return torch._grouped_mm(x, torch.stack(weights).transpose(-2, -1), offs=offs)  # autograd does the rest
    return _GroupedLinear.apply(x, offs, sink, packed, *weights)


class _GroupedLinear(torch.autograd.Function):
    """:func:`_grouped_linear` with its own backward: dX now; the per-expert dW now or, with a sink, pushed to
    it. The same GEMMs autograd runs for ``torch._grouped_mm`` over stacked weights (so the same bits, packed
    or not, deferred or not: tests/test_moe_grouped.py, tests/test_weight_grad.py). ``packed``: the weights'
    :func:`stacked_view`, or None to stack them."""

    @staticmethod
    def forward(ctx, x, offs, sink, packed, *weights):
        w = torch.stack(weights) if packed is None else packed  # (E, out, in)
        ctx.save_for_backward(x, offs, w)
        ctx.sink, ctx.weights = sink, weights
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # (rows, out)

    @staticmethod
    def backward(ctx, dy):
        x, offs, w = ctx.saved_tensors
        dx = torch._grouped_mm(dy, w, offs=offs) if ctx.needs_input_grad[0] else None  # (rows, in)
        need = ctx.needs_input_grad[4:]
        weights = ctx.weights

        def grads():  # dW_e = dy_eᵀ x_e for every expert (zeros for an idle one), (E, out, in)
            return torch._grouped_mm(dy.t(), x, offs=offs).unbind(0)

        def later():
            for p, g, n in zip(weights, grads(), need):
                if n:
                    accumulate(p, g)

        if not any(need) or (ctx.sink is not None and ctx.sink.push(later)):
            return (dx, None, None, None) + (None,) * len(weights)
        return (dx, None, None, None) + tuple(g if n else None for g, n in zip(grads(), need))
