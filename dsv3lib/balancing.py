"""Auxiliary-loss-free load balancing: a per-expert bias nudged after every step (chapters 0 and 3).

V3 §2.1.2; Wang et al. 2024 (arXiv 2408.15664) Algorithm 1. After each optimizer step, every routed
expert's bias moves by a fixed amount γ toward balance, using the loads of the batch just trained on:

    b_i ← b_i + γ · sign(mean_j load_j − load_i)

The bias only decides which experts are chosen (:class:`~dsv3lib.model.Gate`); the gate weights use
the raw affinities, so no gradient flows through it and the language-model loss is not distorted.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import Gate

__all__ = ["BiasBalancer", "max_violation"]


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
    """

    def __init__(self, model: nn.Module, gamma: float = 1e-3):
        if not gamma > 0:
            raise ValueError(f"gamma: must be > 0, got {gamma}")
        self.gamma = gamma
        self.gates = [m for m in model.modules() if isinstance(m, Gate)]

    @torch.no_grad()
    def update(self) -> None:
        for gate in self.gates:
            load = gate.last_counts.float()
            gate.bias += self.gamma * torch.sign(load.mean() - load)

    def __call__(self, info=None) -> None:
        self.update()

    def max_violations(self) -> list[float]:
        """MaxVio of each gate's latest batch."""
        return [max_violation(g.last_counts) for g in self.gates]
