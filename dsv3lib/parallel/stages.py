"""Pipeline stages: slices of the single-device Transformer, and the sequential reference step (chapter 5).

A stage is a slice of the :class:`~dsv3lib.model.Transformer`'s own blocks: stage 0 also owns the
embedding, the last stage the final norm, the head and the loss. The MTP modules are not pipelined (build
the model with ``n_mtp_modules=0``; V3 keeps them with the head on the last rank, §3.2.3: an exercise).
Every rank builds the same seeded model and keeps the slices its schedule places on it
(:func:`stages_for_rank`); :mod:`dsv3lib.parallel.pipeline` runs them.

The step loss is the mean over micro-batches of each micro-batch's mean token cross-entropy
(:func:`mean_loss` of :func:`micro_loss`); :func:`reference_step` computes it in one process, micro-batch
by micro-batch, so the pipelined loss equals it bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.dtypes import keep_dtype
from .schedules import SCHEDULES, Schedule

__all__ = [
    "Stage",
    "build_stages",
    "make_schedule",
    "mean_loss",
    "micro_batches",
    "micro_loss",
    "reference_step",
    "stages_for_rank",
]


class Stage(nn.Module):
    """Layers ``[lo, hi)`` of a Transformer (plus the embedding on stage 0, norm + head on the last).

    Holds the model's own modules (no copies), so parameter names match the model's: ``layers.3.attn...``.
    """

    def __init__(self, model: nn.Module, index: int, n_stages: int):
        super().__init__()
        cfg = model.cfg
        if cfg.n_layers % n_stages:
            raise ValueError(f"n_layers: {cfg.n_layers} layers do not split into {n_stages} equal stages")
        if cfg.tie_embeddings and n_stages > 1:
            raise ValueError("tie_embeddings: a tied embedding/head cannot sit on two different stages")
        per = cfg.n_layers // n_stages
        self.index, self.n_stages, self.dim = index, n_stages, cfg.dim
        self.first, self.last = index == 0, index == n_stages - 1
        self.embed = model.embed if self.first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(index * per, (index + 1) * per)})
        self.norm = model.norm if self.last else None
        self.head = model.head if self.last else None
        self.register_buffer("freqs_cis", model.freqs_cis, persistent=False)

    def _apply(self, fn, recurse=True):  # the RoPE table stays complex (as in Transformer)
        return super()._apply(keep_dtype(fn, torch.Tensor.is_complex), recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: tokens (b, T) on stage 0, else hidden states (b, T, dim). Returns hidden states (b, T, dim)."""
        freqs_cis = self.freqs_cis[: x.size(1)]
        h = self.embed(x) if self.first else x
        for layer in self.layers.values():
            h = layer(h, 0, freqs_cis)
        return h

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Last stage: mean cross-entropy of the head's logits (as :func:`micro_loss` on the full model)."""
        return micro_loss(self.head(self.norm(h)), labels)


def build_stages(model: nn.Module, n_stages: int) -> list[Stage]:
    """All ``n_stages`` stages of ``model``, in path order."""
    return [Stage(model, s, n_stages) for s in range(n_stages)]


def stages_for_rank(model: nn.Module, schedule_name: str, rank: int, world: int) -> dict:
    """``{(stage, direction): Stage}`` that ``schedule_name`` places on ``rank`` of ``world`` ranks."""
    sched = make_schedule(schedule_name, world, 2 * world)  # placement does not depend on the micro-batch count
    return {(s, d): Stage(model, s, sched.n_stages) for s, d in sched.stages_held(rank)}


def make_schedule(schedule_name: str, world: int, n_micro: int) -> Schedule:
    """``SCHEDULES[schedule_name](world, n_micro)``, with an error naming the choices for an unknown name."""
    if schedule_name not in SCHEDULES:
        raise ValueError(f"schedule_name: unknown {schedule_name!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[schedule_name](world, n_micro)


# ------------------------------------------------------------------------------------------------ losses
def micro_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch, in fp32 (as :func:`dsv3lib.model.mtp_loss`)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def mean_loss(losses: torch.Tensor) -> torch.Tensor:
    """The step loss: mean of the (n_micro,) per-micro-batch losses, in global micro-batch order."""
    return losses.mean()


def micro_batches(inputs: torch.Tensor, labels: torch.Tensor, num_chunks: int) -> list[tuple]:
    """Split a (B, T) batch into ``num_chunks`` equal micro-batches along B (DualPipe: the first half
    enters at rank 0, the second half at the last rank)."""
    if inputs.size(0) % num_chunks:
        raise ValueError(f"num_chunks: batch {inputs.size(0)} does not split into {num_chunks} equal micro-batches")
    return list(zip(inputs.chunk(num_chunks), labels.chunk(num_chunks)))


def reference_step(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """The oracle: the same step in one process -- each micro-batch through the whole model, the losses
    averaged with :func:`mean_loss`, one backward (gradients accumulate into ``model``). Returns the loss."""
    losses = [micro_loss(model(x, mtp=False).logits, y) for x, y in micro_batches(inputs, labels, num_chunks)]
    loss = mean_loss(torch.stack(losses))
    loss.backward()
    return loss.detach()
