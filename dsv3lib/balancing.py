"""Load balancing of the routed experts: the loss-free bias, the auxiliary losses, MaxVio (chapters 0 and 3).

V3 §2.1.2; Wang et al. 2024 (arXiv 2408.15664) Algorithm 1. After each optimizer step, every routed
expert's bias moves by a fixed amount γ toward balance, using the loads of the batch just trained on:

    b_i ← b_i + γ · sign(mean_j load_j − load_i)

The bias only decides which experts are chosen (:class:`~dsv3lib.model.Gate`); the gate weights use
the raw affinities, so no gradient flows through it and the language-model loss is not distorted.

For comparison, the auxiliary losses α Σ_i f_i P_i that push the router itself toward balance:
:func:`sequence_balance_loss` (V3 eq. 17–20, the complementary per-sequence loss, α = 1e-4) and
:func:`batch_balance_loss` (the conventional Switch/GShard-style loss over the whole batch, Wang et al.
eq. 2, α = 1e-3). :func:`balance_loss` sums either over the gate forwards of a step. Metrics: MaxVio
(Wang et al. eq. 4) per batch (:class:`LoadRecorder`) and over a validation set
(:func:`global_max_violation`).

Reading the router. A :class:`~dsv3lib.model.Gate` keeps no state about its forwards: it returns a
:class:`~dsv3lib.model.Routing` (weights, indices, scores, token_shape), and this module reads it through
forward hooks registered on the gates, each removable by its handle:

- :class:`LoadMeter` adds up each gate's expert counts over every forward since its last ``reset()``
  (a pipelined step runs a gate once per micro-batch); ``counts()`` gives them as one (n_gates, E)
  tensor, to sum over processes if needed and hand to :meth:`BiasBalancer.update` or
  :meth:`LoadRecorder.record`. :func:`dsv3lib.train.train` resets one at the start of each step and passes
  the step's loads to its callbacks (``StepInfo.loads``).
- :func:`capture_routing` is a context manager that collects the routings of the forwards run inside it
  (scores with their graph), for :func:`balance_loss`; once the loss is built, nothing keeps them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed
from torch import nn

from .data import eval_batches
from .model import Gate, Routing, eval_mode

__all__ = [
    "LoadMeter", "BiasBalancer", "max_violation", "sequence_balance_loss", "batch_balance_loss",
    "capture_routing", "balance_loss", "gates_of", "LoadRecorder", "AffinityRecorder", "GlobalLoad",
    "global_max_violation",
]


def gates_of(model: nn.Module) -> list[Gate]:
    """Every gate of ``model`` in module order (main layers, then MTP blocks)."""
    return [m for m in model.modules() if isinstance(m, Gate)]


def _gate_names(model: nn.Module) -> list[str]:
    """The MoE layer of each gate of :func:`gates_of`, e.g. ``layers.1.ffn``."""
    return [n.removesuffix(".gate") for n, m in model.named_modules() if isinstance(m, Gate)]


class LoadMeter:
    """Expert loads of every gate of ``model``: tokens each expert received, summed over all forward passes
    since the last :meth:`reset` (or since construction), read from each gate's :class:`Routing` by a forward
    hook. A context manager; :meth:`close` removes the hooks.

    ``gates`` and ``names`` list the gates (:func:`gates_of` order) and their MoE layers. To sum the loads
    over processes (data or expert parallel replicas of the gates)::

        loads = meter.counts()
        torch.distributed.all_reduce(loads, group=group)  # or BiasBalancer(..., reduce_loads=True)
        balancer.update(loads)
    """

    def __init__(self, model: nn.Module):
        self.gates = gates_of(model)
        self.names = _gate_names(model)
        self._totals: list[torch.Tensor | None] = [None] * len(self.gates)  # None: the gate has not run
        self._handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, i: int):
        def count(gate: Gate, args, routing: Routing) -> None:
            c = torch.bincount(routing.indices.flatten(), minlength=gate.bias.size(0))  # (E,)
            self._totals[i] = c if self._totals[i] is None else self._totals[i] + c
        return count

    def counts(self) -> torch.Tensor:
        """(n_gates, E) long, a new tensor: each gate's expert loads since the last reset (zeros for a gate
        that has not run)."""
        if not self.gates:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.stack([torch.zeros_like(g.bias, dtype=torch.long) if t is None else t
                            for g, t in zip(self.gates, self._totals)])

    def reset(self) -> None:
        """Start counting afresh (the hooks stay)."""
        self._totals = [None] * len(self.gates)

    def close(self) -> None:
        """Remove the hooks; the counts so far stay readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LoadMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = (max_i load_i − mean load) / mean load (Wang et al. eq. 4); 0 when perfectly balanced."""
    load = counts.float()
    mean = load.mean()
    if mean == 0:
        raise ValueError("counts: no tokens were routed")
    return ((load.max() - mean) / mean).item()


class BiasBalancer:
    """Callback for :func:`dsv3lib.train.train`: updates every gate's bias from the loads of the step
    (``StepInfo.loads``); outside ``train``, call :meth:`update` with a :class:`LoadMeter`'s counts.

    Args:
        model: any module containing :class:`Gate` s (the main layers and the MTP blocks alike).
        gamma: bias update speed γ. V3 used 0.001 over ~14T tokens; the tiny model, trained for a few
            hundred steps, needs a faster 0.01 to balance within its run (chapter 3 compares speeds).
        reduce_loads: sum the loads over the ranks of ``group`` (torch.distributed) before the
            update: the load of the whole batch (V3 §2.1.2), and the same bias on every rank, as a
            replicated gate (expert / data parallelism) needs. Leave it off when the loads passed to
            :meth:`update` are already summed over the ranks.
    """

    def __init__(self, model: nn.Module, gamma: float = 1e-3, *, reduce_loads: bool = False, group=None):
        if not gamma > 0:
            raise ValueError(f"gamma: must be > 0, got {gamma}")
        self.gamma = gamma
        self.gates = gates_of(model)
        self.reduce_loads, self.group = reduce_loads, group

    @torch.no_grad()
    def update(self, loads: torch.Tensor) -> None:
        """b ← b + γ · sign(mean load − load) for every gate, from ``loads`` (n_gates, E): row i is the
        expert counts of gate i (:func:`gates_of` order), e.g. :meth:`LoadMeter.counts`."""
        E = self.gates[0].bias.size(0) if self.gates else 0
        if loads.shape != (len(self.gates), E):
            raise ValueError(f"loads: expected shape ({len(self.gates)}, {E}) (gates, experts), "
                             f"got {tuple(loads.shape)}")
        load = loads.to(torch.float32, copy=True)  # the caller's loads stay as they were
        if self.reduce_loads:
            torch.distributed.all_reduce(load, group=self.group)
        for gate, row in zip(self.gates, load):
            gate.bias += self.gamma * torch.sign(row.mean() - row)

    def __call__(self, info) -> None:
        self.update(info.loads)


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
        scores: (N, E) affinities s with grad (``Routing.scores``).
        indices: (N, K) chosen experts (``Routing.indices``). V3 writes the indicator on top-K of the
            unbiased s; we count the experts actually chosen (biased, group-limited), which is the load.
        token_shape: the token layout, (B, T) or (T,); the last entry is the sequence length
            (``Routing.token_shape``).
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


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[list[Routing]]:
    """Collect the :class:`Routing` of every gate forward of ``model`` run inside the ``with`` block, in
    call order (a gate run twice appears twice)::

        with capture_routing(model) as routings:
            out = model(tokens)
        loss = task_loss(out) + balance_loss(routings, "sequence", alpha)

    The hooks are removed on leaving the block. The routings hold the scores' graph: build the loss from
    them and let the list go (a step that keeps it keeps the graph)."""
    routings: list[Routing] = []
    handles = [g.register_forward_hook(lambda gate, args, routing: routings.append(routing))
               for g in gates_of(model)]
    try:
        yield routings
    finally:
        for h in handles:
            h.remove()


def balance_loss(routings: list[Routing], kind: str = "sequence", alpha: float = 1e-4) -> torch.Tensor:
    """Sum over ``routings`` (:func:`capture_routing`: one per gate forward) of the ``"sequence"``
    (:func:`sequence_balance_loss`) or ``"batch"`` (:func:`batch_balance_loss`) loss."""
    if kind not in ("sequence", "batch"):
        raise ValueError(f"kind: must be 'sequence' or 'batch', got {kind!r}")
    if not routings:
        raise ValueError("routings: none captured; run the forward inside `with capture_routing(model)`")
    if kind == "sequence":
        terms = [sequence_balance_loss(r.scores, r.indices, r.token_shape, alpha) for r in routings]
    else:
        terms = [batch_balance_loss(r.scores, r.indices, alpha) for r in routings]
    return torch.stack(terms).sum()


# ------------------------------------------------------------------------------------------ metrics
class LoadRecorder:
    """Callback for :func:`dsv3lib.train.train`: after every step, the expert loads of every gate.

    ``loads[step][layer]`` is the count vector of that gate over the step's (training) forwards
    (``StepInfo.loads``), ``max_vio[step]`` the MaxVio_batch of each gate; :meth:`heatmap` gives one
    gate's (steps, E) loads for a plot.
    """

    def __init__(self, model: nn.Module):
        self.names = _gate_names(model)
        self.steps: list[int] = []
        self.loads: list[torch.Tensor] = []  # each (n_gates, E) long
        self.max_vio: list[list[float]] = []

    def record(self, loads: torch.Tensor, step: int | None = None) -> None:
        """Keep ``loads`` (n_gates, E), e.g. :meth:`LoadMeter.counts`, as the loads of ``step``."""
        if loads.size(0) != len(self.names):
            raise ValueError(f"loads: {loads.size(0)} rows for {len(self.names)} gates")
        counts = loads.detach().to("cpu", copy=True)
        self.steps.append(len(self.steps) + 1 if step is None else step)
        self.loads.append(counts)
        self.max_vio.append([max_violation(c) for c in counts])

    def __call__(self, info) -> None:
        self.record(info.loads, info.step)

    def heatmap(self, gate: int = 0, normalize: bool = True) -> torch.Tensor:
        """(steps, E) loads of gate number ``gate``; normalised to load / mean load (1 = balanced)."""
        h = torch.stack([step[gate] for step in self.loads]).float()
        return h / h.mean(-1, keepdim=True) if normalize else h

    def mean_max_vio(self) -> list[float]:
        """MaxVio_batch per step, averaged over the gates (as Wang et al. Fig. 3)."""
        return [sum(v) / len(v) for v in self.max_vio]


class AffinityRecorder:
    """Callback for :func:`dsv3lib.train.train`: the mean router affinity s (over tokens, experts and gates) of
    each step's training forwards, in ``steps`` and ``mean``. Chapter 3 uses it to ask whether a batch-wise
    auxiliary loss on sigmoid gates lowers every affinity instead of rebalancing them. Call :meth:`remove`
    when done (it hooks every gate)."""

    def __init__(self, model: nn.Module):
        self.steps: list[int] = []
        self.mean: list[float] = []
        self._sum, self._n = 0.0, 0
        self._hooks = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, Gate)]
        if not self._hooks:
            raise ValueError("model: has no MoE gate to record")

    def _hook(self, module: nn.Module, args, out: Routing) -> None:
        if module.training:
            self._sum += out.scores.detach().float().mean().item()
            self._n += 1

    def __call__(self, info) -> None:
        self.steps.append(info.step)
        self.mean.append(self._sum / max(self._n, 1))
        self._sum, self._n = 0.0, 0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


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
    device = next(model.parameters()).device
    with eval_mode(model), LoadMeter(model) as meter:
        main = [i for i, n in enumerate(meter.names) if not n.startswith("mtp.")]
        if not main:
            raise ValueError("model: has no MoE gate")
        for x, _ in eval_batches(tokens, batch_size, seq_len, max_batches=max_batches):
            model(x.to(device), mtp=False)
    totals = meter.counts()[main].cpu()
    return GlobalLoad([meter.names[i] for i in main], totals, [max_violation(c) for c in totals])
