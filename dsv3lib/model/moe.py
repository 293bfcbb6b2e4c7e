"""DeepSeekMoE: shared + fine-grained routed experts with a sigmoid, group-limited gate (chapters 0 and 3).

V3 §2.1.2 eq. 12–16. Affinities s = sigmoid(u·e_i). The per-expert correction bias b (auxiliary-loss-free
balancing) is added only to choose experts: groups are ranked by the sum of their top
``n_activated_experts // n_limited_groups`` biased scores, the best ``n_limited_groups`` groups are kept,
and the top ``n_activated_experts`` experts are chosen inside them. The weights use the raw s of the
chosen experts, normalised to sum to 1 and multiplied by ``route_scale``. No token is dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .dtypes import keep_dtype

__all__ = ["MLP", "Gate", "MoE"]


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) · w3 x). Dense FFN, routed expert and shared expert alike."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router: picks ``n_activated_experts`` experts per token and their weights.

    ``bias`` is a buffer, not a parameter: no gradient reaches it; a balancing rule updates it between
    steps (chapter 3). ``last_counts`` holds the number of tokens each expert received in the latest
    forward pass, for such rules and for load statistics.
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
        self.register_buffer("last_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)

    def _apply(self, fn, recurse=True):
        # Casting the model (.to(torch.bfloat16)) must not round the bias: balancing moves it in steps of
        # ~1e-3, below bf16's resolution near 1 (the official code keeps it in fp32 too).
        return super()._apply(keep_dtype(fn, lambda t: t is self.bias), recurse)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s (N, n_routed_experts) in float32 (the gate runs in high precision, V3 §3.3.1)."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.cfg.score_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (N, topk) of the chosen experts, from biased scores under the group limit."""
        biased = scores + self.bias  # b changes which experts win, never their weights (eq. 16)
        if self.n_groups > 1:
            grouped = biased.view(-1, self.n_groups, self.cfg.experts_per_group)
            per_group = max(1, self.topk // self.topk_groups)  # V3: 8 // 4 = top-2 per group
            group_scores = grouped.topk(min(per_group, grouped.size(-1)), dim=-1).values.sum(-1)  # (N, n_groups)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (N, dim). Returns: weights (N, topk) in x's dtype, indices (N, topk) long."""
        scores = self.scores(x)
        indices = self.select(scores)
        weights = scores.gather(1, indices)  # raw affinities of the chosen experts (eq. 13)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # eq. 14
        weights = weights * self.cfg.route_scale
        self.last_counts = torch.bincount(indices.flatten(), minlength=self.weight.size(0)).detach()
        return weights.to(x.dtype), indices


class MoE(nn.Module):
    """h' = Σ shared(u) + Σ_i g_i · expert_i(u) (eq. 12; the residual is added by the block)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (
            MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        weights, indices = self.gate(x)
        y = self.routed(x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sorted dispatch: the (token, expert) pairs are sorted by expert so each expert runs once on a
        contiguous slice; the weighted outputs are added back to their tokens."""
        flat = indices.flatten()  # (N·topk,)
        order = flat.argsort(stable=True)
        token_of = order // indices.size(1)  # which token each sorted pair belongs to
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        xs = x[token_of]  # (N·topk, dim), grouped by expert
        chunks = xs.split(counts)
        out = torch.cat([self.experts[e](chunk) for e, chunk in enumerate(chunks) if len(chunk)])
        out = out * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, out)
