"""Load balancing of the routed experts: the loss-free bias, the auxiliary losses, MaxVio (chapters 0 and 3).

V3 §2.1.2; Wang et al. 2024 (arXiv 2408.15664) Algorithm 1. After each optimizer step, every routed
expert's bias moves by a fixed amount γ toward balance, using the loads of the batch just trained on:

    b_i ← b_i + γ · sign(mean_j load_j − load_i)

The bias only decides which experts are chosen (:class:`~dsv3lib.model.Gate`); the gate weights use
the raw affinities, so no gradient flows through it and the language-model loss is not distorted.

For comparison, the auxiliary losses α Σ_i f_i P_i that push the router itself toward balance:
:func:`sequence_balance_loss` (V3 eq. 17–20, the complementary per-sequence loss, α = 1e-4) and
:func:`batch_balance_loss` (the conventional Switch/GShard-style loss over the whole batch, Wang et al.
eq. 2, α = 1e-3). :func:`balance_loss` sums either over every gate of a model. Metrics: MaxVio
(Wang et al. eq. 4) per batch (:class:`LoadRecorder`) and over a validation set
(:func:`global_max_violation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed
from torch import nn

from .data import eval_batches
from .model import Gate

__all__ = [
    "BiasBalancer", "max_violation", "sequence_balance_loss", "batch_balance_loss", "balance_loss",
    "record_routing", "gates_of", "LoadRecorder", "GlobalLoad", "global_max_violation",
]


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = (max_i load_i − mean load) / mean load (Wang et al. eq. 4); 0 when perfectly balanced."""
    load = counts.float()
    mean = load.mean()
    if mean == 0:
        raise ValueError("counts: no tokens were routed")
    return ((load.max() - mean) / mean).item()


class BiasBalancer:
    """Callback for :func:`dsv3lib.train.train`: updates every gate's bias from its latest loads.

    Args:
        model: any module containing :class:`Gate` s (the main layers and the MTP blocks alike).
        gamma: bias update speed γ. V3 used 0.001 over ~14T tokens; the tiny model, trained for a few
            hundred steps, needs a faster 0.01 to balance within its run (chapter 3 compares speeds).
        reduce_loads: sum each gate's counts over the ranks of ``group`` (torch.distributed) before the
            update: the load of the whole batch (V3 §2.1.2), and the same bias on every rank, as a
            replicated gate (expert / data parallelism) needs.
    """

    def __init__(self, model: nn.Module, gamma: float = 1e-3, *, reduce_loads: bool = False, group=None):
        if not gamma > 0:
            raise ValueError(f"gamma: must be > 0, got {gamma}")
        self.gamma = gamma
        self.gates = gates_of(model)
        self.reduce_loads, self.group = reduce_loads, group

    @torch.no_grad()
    def update(self) -> None:
        for gate in self.gates:
            load = gate.last_counts.float()
            if self.reduce_loads:
                torch.distributed.all_reduce(load, group=self.group)
            gate.bias += self.gamma * torch.sign(load.mean() - load)

    def __call__(self, info=None) -> None:
        self.update()

    def max_violations(self) -> list[float]:
        """MaxVio of each gate's latest batch."""
        return [max_violation(g.last_counts) for g in self.gates]


# --------------------------------------------------------------------------------- auxiliary losses
def _hits(picks: torch.Tensor, n_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., M) chosen expert indices -> (..., n_experts) how often each was chosen (no gradient)."""
    return torch.zeros(*picks.shape[:-1], n_experts, device=picks.device, dtype=dtype).scatter_add_(
        -1, picks, torch.ones(picks.shape, device=picks.device, dtype=dtype))


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, token_shape: tuple[int, ...],
                          alpha: float = 1e-4) -> torch.Tensor:
    """Complementary sequence-wise balance loss (V3 eq. 17–20), averaged over the sequences.

    For each sequence of T tokens: f_i = N_r/(K_r·T) · #{t : t chose i} (1 for every expert when
    balanced; no gradient), P_i = (1/T) Σ_t s'_i,t with s' the affinities normalised over all experts,
    L = α Σ_i f_i P_i. The gradient flows only through P (the scores).

    Args:
        scores: (N, E) affinities s with grad (``Gate.last_scores``).
        indices: (N, K) chosen experts (``Gate.last_indices``). V3 writes the indicator on top-K of the
            unbiased s; we count the experts actually chosen (biased, group-limited), which is the load.
        token_shape: the token layout, (B, T) or (T,); the last entry is the sequence length.
    """
    N, E = scores.shape
    K = indices.size(-1)
    T = token_shape[-1] if len(token_shape) else N
    if T < 1 or N % T:
        raise ValueError(f"token_shape: {tuple(token_shape)} does not lay out {N} tokens")
    s = scores.view(N // T, T, E)
    p = (s / s.sum(-1, keepdim=True)).mean(1)  # (B, E) eq. 19–20
    f = _hits(indices.reshape(N // T, T * K), E, scores.dtype) * (E / (K * T))  # (B, E) eq. 18
    return alpha * (f * p).sum(-1).mean()


def batch_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float = 1e-3, *,
                       normalize: bool = False) -> torch.Tensor:
    """Conventional batch-level auxiliary loss (Switch/GShard style; Wang et al. eq. 2).

    Over all N tokens of the batch: f_i = E/(K·N) · #{t : t chose i}, P_i = mean_t s_i,t,
    L = α Σ_i f_i P_i; gradient only through P. ``normalize=True`` uses s' = s / Σ_j s_j as V3's
    sequence loss does (then this is V3 §4.5.3's batch-wise variant).
    """
    N, E = scores.shape
    K = indices.size(-1)
    s = scores / scores.sum(-1, keepdim=True) if normalize else scores
    f = _hits(indices.flatten(), E, scores.dtype) * (E / (K * N))
    return alpha * (f * s.mean(0)).sum()


def gates_of(model: nn.Module) -> list[Gate]:
    """Every gate of ``model`` in module order (main layers, then MTP blocks)."""
    return [m for m in model.modules() if isinstance(m, Gate)]


def record_routing(model: nn.Module, on: bool = True) -> list[Gate]:
    """Make every gate keep (or stop keeping) its scores, indices and token shape; returns the gates."""
    gates = gates_of(model)
    for g in gates:
        g.record = on
        if not on:
            g.last_scores = g.last_indices = g.last_shape = None
    return gates


def balance_loss(model: nn.Module, kind: str = "sequence", alpha: float = 1e-4) -> torch.Tensor:
    """Sum over the gates that recorded the latest forward (:func:`record_routing`) of the
    ``"sequence"`` (:func:`sequence_balance_loss`) or ``"batch"`` (:func:`batch_balance_loss`) loss."""
    if kind not in ("sequence", "batch"):
        raise ValueError(f"kind: must be 'sequence' or 'batch', got {kind!r}")
    terms = []
    for g in gates_of(model):
        if g.last_scores is None:
            continue
        if kind == "sequence":
            terms.append(sequence_balance_loss(g.last_scores, g.last_indices, g.last_shape, alpha))
        else:
            terms.append(batch_balance_loss(g.last_scores, g.last_indices, alpha))
    if not terms:
        raise ValueError("model: no gate recorded its routing; call record_routing(model) before the forward")
    return torch.stack(terms).sum()


# ------------------------------------------------------------------------------------------ metrics
class LoadRecorder:
    """Callback for :func:`dsv3lib.train.train`: after every step, the expert loads of every gate.

    ``loads[step][layer]`` is the count vector of that gate's latest (training) forward, ``max_vio[step]``
    the MaxVio_batch of each gate; :meth:`heatmap` gives one gate's (steps, E) loads for a plot.
    """

    def __init__(self, model: nn.Module):
        self.gates = gates_of(model)
        self.names = [n.removesuffix(".gate") for n, m in model.named_modules() if isinstance(m, Gate)]
        self.steps: list[int] = []
        self.loads: list[torch.Tensor] = []  # each (n_gates, E) long
        self.max_vio: list[list[float]] = []

    def record(self, step: int | None = None) -> None:
        counts = torch.stack([g.last_counts.detach().cpu() for g in self.gates])
        self.steps.append(len(self.steps) + 1 if step is None else step)
        self.loads.append(counts)
        self.max_vio.append([max_violation(c) for c in counts])

    def __call__(self, info=None) -> None:
        self.record(getattr(info, "step", None))

    def heatmap(self, gate: int = 0, normalize: bool = True) -> torch.Tensor:
        """(steps, E) loads of gate number ``gate``; normalised to load / mean load (1 = balanced)."""
        h = torch.stack([step[gate] for step in self.loads]).float()
        return h / h.mean(-1, keepdim=True) if normalize else h

    def mean_max_vio(self) -> list[float]:
        """MaxVio_batch per step, averaged over the gates (as Wang et al. Fig. 3)."""
        return [sum(v) / len(v) for v in self.max_vio]


@dataclass
class GlobalLoad:
    """Expert loads accumulated over a validation set: ``counts`` (n_gates, E), one row per MoE layer."""

    names: list[str]
    counts: torch.Tensor
    max_vio: list[float]  # MaxVio_global of each layer

    @property
    def mean_max_vio(self) -> float:
        """MaxVio_global averaged over the layers (Wang et al. Table 2)."""
        return sum(self.max_vio) / len(self.max_vio)


@torch.no_grad()
def global_max_violation(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 16, seq_len: int = 128,
                         max_batches: int | None = None) -> GlobalLoad:
    """Run ``model`` (a :class:`~dsv3lib.model.Transformer`) over the deterministic windows of ``tokens``
    (:func:`~dsv3lib.data.eval_batches`), add up each main-layer gate's expert counts, and return the
    MaxVio_global of each layer: (max_i load_i − mean load) / mean load over the whole set."""
    named = [(n.removesuffix(".gate"), m) for n, m in model.named_modules()
             if isinstance(m, Gate) and not n.startswith("mtp.")]
    if not named:
        raise ValueError("model: has no MoE gate")
    totals = torch.zeros(len(named), named[0][1].weight.size(0), dtype=torch.long)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for x, _ in eval_batches(tokens, batch_size, seq_len, max_batches=max_batches):
            model(x.to(device), mtp=False)
            for i, (_, g) in enumerate(named):
                totals[i] += g.last_counts.cpu()
    finally:
        model.train(was_training)
    return GlobalLoad([n for n, _ in named], totals, [max_violation(c) for c in totals])
