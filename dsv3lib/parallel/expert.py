"""Expert parallelism: the routed experts of the model's own MoE layers sharded over EP ranks (chapter 3).

V3 §3.2 trains with 64-way EP over 8 nodes; §3.2.2 limits each token to ≤ 4 nodes so that the
all-to-all over InfiniBand stays cheap. Here, as a transform of the single-device model
(:func:`shard_experts`), rank r of an EP group of size ep keeps experts
[r·E/ep, (r+1)·E/ep) of every :class:`~dsv3lib.model.MoE` and drops the rest. The gate and the shared
experts stay replicated; each rank routes its own tokens, then

1. dispatch: sorts its (token, expert) pairs by expert — hence by owning rank — exchanges the counts,
   and sends each rank its rows with one ``all_to_all_single`` of uneven splits;
2. runs each local expert once on a contiguous slice of what it received;
3. combine: sends the outputs back with the reverse ``all_to_all_single`` and adds them, weighted,
   to their tokens (plus the local shared experts).

The collectives are wrapped in :func:`all_to_all` (autograd: the backward is the reverse all-to-all),
so gradients flow to the input and the expert weights. Works with gloo (CPU) and NCCL (GPU).

Node-limited routing (V3 §2.1.2) and the IB bytes it saves: :func:`expected_groups_reached`,
:func:`groups_reached`, :func:`alltoall_bytes_per_token`, :func:`node_limited_traffic`.
"""

from __future__ import annotations

import math
import re
import time

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..fp8.grouped import grouped_experts
from ..model import MoE
from ..model.moe import combine, sort_by_expert

__all__ = [
    "all_to_all", "ExpertParallelMoE", "shard_experts", "global_names",
    "expected_groups_reached", "groups_reached", "alltoall_bytes_per_token", "node_limited_traffic",
]


# ---------------------------------------------------------------------------------------- all-to-all
class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, backward_group, log, name):
        ctx.splits, ctx.group, ctx.log, ctx.name = (out_splits, in_splits), backward_group, log, name
        return _all_to_all(x, out_splits, in_splits, group, log, name)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group, ctx.log, ctx.name + " grad"), *[None] * 6


def _all_to_all(x, out_splits, in_splits, group, log=None, name=""):
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if log is not None:
        log.append((t0, time.perf_counter(), name))
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None = None, *, backward_group: dist.ProcessGroup | None = None,
               log: list | None = None, name: str = "all-to-all") -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: rows ``in_splits[j]`` of x go to rank j, and
    ``out_splits[j]`` rows come from rank j. The gradient travels back by the reverse all-to-all, over
    ``backward_group`` if given (the same ranks in another group: backward collectives may then run in
    another thread than forward ones, as the overlapped pipeline does). ``log``: a list that gets
    ``(start, end, name)`` in ``time.perf_counter`` seconds for the forward and the backward exchange."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, backward_group or group, log, name)


# ------------------------------------------------------------------------------------ the EP layer
class ExpertParallelMoE(nn.Module):
    """One rank's share of a :class:`~dsv3lib.model.MoE`: its local routed experts, the replicated gate
    and shared experts (the very modules of ``moe``, not copies). Same forward signature as MoE.

    Every rank must build it from identical weights and call it the same number of times (each call is
    two collectives, forward and backward alike). ``last_recv_counts`` (ep, E/ep): rows this rank's
    experts received from each source rank in the latest forward. ``backward_group``: the backward's
    all-to-alls go over this group (same ranks) instead. Set ``comm_log`` to a list to record every
    exchange as ``(start, end, name)`` (``time.perf_counter`` seconds).

    ``batch_sources`` (default True): each local expert runs once on the rows from every source rank, the
    fewest and biggest GEMMs (what production does). False: once per source rank, so every GEMM sees exactly
    the rows a single process would feed it for that rank's tokens; a CPU GEMM's rounding depends on how many
    rows it gets, so only this way is the output bit for bit the one-process model's (the tests, chapter 5).
    """

    def __init__(self, moe: MoE, group: dist.ProcessGroup | None = None, *,
                 backward_group: dist.ProcessGroup | None = None, batch_sources: bool = True):
        super().__init__()
        self.group, self.backward_group, self.batch_sources = group, backward_group, batch_sources
        self.comm_log: list | None = None
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts = len(moe.experts)
        if self.n_experts % self.ep_size:
            raise ValueError(f"n_routed_experts: {self.n_experts} experts do not split over {self.ep_size} ranks")
        self.n_local = self.n_experts // self.ep_size
        self.first = self.ep_rank * self.n_local  # global id of local expert 0
        self.cfg = moe.cfg
        self.gate = moe.gate
        self.experts = nn.ModuleList(moe.experts[self.first:self.first + self.n_local])
        self.shared_experts = moe.shared_experts
        self.last_recv_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        routing = self.gate(x)
        x = x.reshape(-1, shape[-1])  # (N, dim)
        y = self.routed(x, routing.weights, routing.indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ep, n_local = self.ep_size, self.n_local
        order, token_of, counts = sort_by_expert(indices, self.n_experts)  # by expert, hence by owning rank
        send = counts.view(ep, n_local)  # (dest rank, local expert)
        recv = torch.empty_like(send)  # (source rank, local expert)
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send, group=self.group)  # 1. exchange the counts
        if self.comm_log is not None:
            self.comm_log.append((t0, time.perf_counter(), "counts"))
        self.last_recv_counts = recv
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()

        kw = {"backward_group": self.backward_group, "log": self.comm_log}
        xr = all_to_all(x[token_of], recv_splits, send_splits, self.group, name="dispatch", **kw)  # (R, dim)
        # 2. the local experts on what arrived, ordered (source rank, local expert)
        if self.batch_sources:  # regroup by local expert: one contiguous slice each
            local_id = torch.arange(n_local, device=x.device).repeat(ep).repeat_interleave(recv.flatten())
            perm = local_id.argsort(stable=True)
            xs, rows = xr[perm], recv.sum(0).tolist()
            out = grouped_experts(self.experts, xs, rows)  # FP8 on the CPU: one call, the per-expert bits
            outs = [out] if out is not None else [self.experts[e](c) for e, c in enumerate(xs.split(rows)) if len(c)]
        else:  # one slice per (source, expert), as the source's own process would run it
            outs = [self.experts[j % n_local](c) for j, c in enumerate(xr.split(recv.flatten().tolist())) if len(c)]
        out = torch.cat(outs) if outs else xr[:0]
        if torch.is_grad_enabled() and not out.requires_grad and self.experts[0].w1.weight.requires_grad:
            out = out + 0 * self.experts[0].w1.weight.sum()  # no rows here: still join the backward collective
        if self.batch_sources:
            out = out[perm.argsort()]  # back to (source, expert) order

        out = all_to_all(out, send_splits, recv_splits, self.group, name="combine", **kw)  # 3. (N·topk, dim)
        return combine(out, weights, order, token_of)


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None, *,
                  backward_group: dist.ProcessGroup | None = None, batch_sources: bool = True) -> nn.Module:
    """Replace every :class:`~dsv3lib.model.MoE` inside ``model`` (main layers and MTP blocks) by its
    :class:`ExpertParallelMoE` shard, in place; returns ``model``. Non-local experts are dropped."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if isinstance(model, MoE):
        raise TypeError("model: wrap a lone MoE with ExpertParallelMoE(moe) instead")
    for name, moe in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, ExpertParallelMoE(moe, group, backward_group=backward_group,
                                                batch_sources=batch_sources))
    return model


def global_names(module: nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{name in the unsharded model: parameter}`` of a sharded model or stage: local expert j of a shard is
    global expert ``first + j``."""
    firsts = {name: m.first for name, m in module.named_modules() if isinstance(m, ExpertParallelMoE)}
    out = {}
    for name, q in module.named_parameters():
        m = re.match(r"(.*)\.experts\.(\d+)\.(.*)", name)
        if m and m.group(1) in firsts:
            name = f"{m.group(1)}.experts.{firsts[m.group(1)] + int(m.group(2))}.{m.group(3)}"
        out[name] = q
    return out


# ------------------------------------------------------------------ node-limited routing and bytes
def expected_groups_reached(n_experts: int, n_groups: int, topk: int, limit: int | None = None) -> float:
    """Expected number of distinct groups (≙ nodes) a token's top-k experts lie in, when the k experts are
    a uniformly random k-subset: of all experts (``limit=None``), or of the experts of ``limit`` groups
    (node-limited routing; the bound is ``limit``). G·(1 − C(E − E/G, k) / C(E, k))."""
    per = n_experts // n_groups
    g, e = (n_groups, n_experts) if limit is None else (limit, limit * per)
    if topk > e:
        raise ValueError(f"topk: {topk} experts do not fit in {g} groups of {per}")
    return g * (1 - math.comb(e - per, topk) / math.comb(e, topk))


def groups_reached(indices: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Measured: (N,) number of distinct expert groups each token's chosen experts ``indices`` (N, k) hit."""
    groups = indices // cfg.experts_per_group
    hit = torch.zeros(indices.size(0), cfg.n_expert_groups, dtype=torch.bool, device=indices.device)
    return hit.scatter_(1, groups, True).sum(1)


def alltoall_bytes_per_token(cfg: ModelConfig, nodes: float, dispatch_bytes: int = 1,
                             combine_bytes: int = 2) -> float:
    """Bytes one token sends over IB per MoE layer: one copy per node reached (V3 §3.2.2 sends a token once
    per node, then forwards it over NVLink), dispatched in FP8 (1 B) and combined in BF16 (2 B)."""
    return nodes * cfg.dim * (dispatch_bytes + combine_bytes)


def node_limited_traffic(cfg: ModelConfig, dispatch_bytes: int = 1, combine_bytes: int = 2) -> dict[str, float]:
    """Nodes reached and IB bytes per token per MoE layer, with and without the group limit, for uniformly
    random routing (groups ≙ nodes, as in V3: 8 groups × 32 experts, ≤ 4 nodes)."""
    E, G, k, M = cfg.n_routed_experts, cfg.n_expert_groups, cfg.n_activated_experts, cfg.n_limited_groups
    free = expected_groups_reached(E, G, k)
    limited = expected_groups_reached(E, G, k, M)
    b = dict(dispatch_bytes=dispatch_bytes, combine_bytes=combine_bytes)
    return {
        "nodes_unlimited": free, "nodes_limited": limited, "nodes_limit": float(M),
        "bytes_unlimited": alltoall_bytes_per_token(cfg, free, **b),
        "bytes_limited": alltoall_bytes_per_token(cfg, limited, **b),
        "bytes_limit": alltoall_bytes_per_token(cfg, M, **b),
        "bytes_all_nodes": alltoall_bytes_per_token(cfg, G, **b),
    }
