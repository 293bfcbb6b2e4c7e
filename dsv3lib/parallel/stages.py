"""Pipeline stages: slices of the single-device Transformer, and the sequential reference step (chapter 5).

A stage is a slice of the :class:`~dsv3lib.model.Transformer`'s own blocks: stage 0 also owns the
embedding; the last stage owns the final norm, the head, the loss and the MTP modules (V3 §3.2.1 keeps
the MTP modules with the output head on the last pipeline rank). The MTP modules read the embedding and
the head they share with the main model (§2.2), so the last stage holds the model's embedding too: under
DualPipe and DualPipeV that is the *same* module as stage 0's on the same rank (the placement puts the
first and last stages together: "physically shared", as the paper says); under 1F1B and ZB1P the first and
last ranks each hold it and :func:`~dsv3lib.parallel.parallelize.parallelize` adds their gradients.

Every rank builds the same seeded model and keeps the slices its schedule places on it
(:func:`stages_for_rank`); :mod:`dsv3lib.parallel.pipeline` runs them.

The step loss is the mean over micro-batches of each micro-batch's loss (:func:`micro_loss`: the
main cross-entropy plus λ times the MTP loss when the model has MTP modules, as
:func:`~dsv3lib.model.mtp_loss`); :func:`reference_step` computes it in one process, micro-batch by
micro-batch, so the pipelined loss can equal it bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.dtypes import keep_dtype
from ..model.transformer import ModelOutput, mtp_forward, mtp_loss
from .schedules import placement, stages_held

__all__ = ["Stage", "build_stages", "mean_loss", "micro_batches", "micro_loss", "reference_step", "stages_for_rank"]


class Stage(nn.Module):
    """Layers ``[lo, hi)`` of a Transformer (plus the embedding on stage 0, norm + head + MTP on the last).

    Holds the model's own modules (no copies), so parameter names match the model's: ``layers.3.attn...``.
    ``mtp_lambda`` weighs the MTP loss in the last stage's :meth:`loss`.
    """

    def __init__(self, model: nn.Module, index: int, n_stages: int, mtp_lambda: float = 0.3):
        super().__init__()
        cfg = model.cfg
        if cfg.n_layers % n_stages:
            raise ValueError(f"n_layers: {cfg.n_layers} layers do not split into {n_stages} equal stages")
        if cfg.tie_embeddings and n_stages > 1:
            raise ValueError("tie_embeddings: a tied embedding/head cannot sit on two different stages")
        per = cfg.n_layers // n_stages
        self.index, self.n_stages, self.dim, self.mtp_lambda = index, n_stages, cfg.dim, mtp_lambda
        self.first, self.last = index == 0, index == n_stages - 1
        has_mtp = self.last and len(model.mtp) > 0
        self.embed = model.embed if self.first or has_mtp else None  # the MTP modules embed tokens too
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(index * per, (index + 1) * per)})
        self.norm = model.norm if self.last else None
        self.head = model.head if self.last else None
        self.mtp = model.mtp if has_mtp else None
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

    def loss(self, h: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Last stage: the micro-batch loss from the last block's output h (b, T, dim), computed as
        :func:`micro_loss` computes it on the whole model (``tokens`` feed the MTP modules)."""
        return self.loss_parts(h, tokens, labels)[0]

    def loss_parts(self, h: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> tuple:
        """(loss, main cross-entropy, [cross-entropy of each MTP depth]): :func:`~dsv3lib.model.mtp_loss`."""
        h = self.norm(h)
        mtp_logits = [] if self.mtp is None else mtp_forward(self.mtp, self.embed, self.head, h, tokens,
                                                             self.freqs_cis)
        return mtp_loss(ModelOutput(self.head(h), mtp_logits), labels, self.mtp_lambda)


def build_stages(model: nn.Module, n_stages: int, mtp_lambda: float = 0.3) -> list[Stage]:
    """All ``n_stages`` stages of ``model``, in path order."""
    return [Stage(model, s, n_stages, mtp_lambda) for s in range(n_stages)]


def stages_for_rank(model: nn.Module, schedule: str, rank: int, pp: int, mtp_lambda: float = 0.3) -> dict:
    """``{(stage, direction): Stage}`` that ``schedule`` (a name) places on pipeline ``rank`` of ``pp``."""
    place = placement(schedule, pp)
    n_stages = len(place[0])
    return {(s, d): Stage(model, s, n_stages, mtp_lambda) for s, d in stages_held(place, rank)}


# ------------------------------------------------------------------------------------------------ losses
def micro_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, mtp_lambda: float = 0.3
               ) -> torch.Tensor:
    """One micro-batch's loss on the whole model: fp32 cross-entropy, plus λ · the MTP loss when the model
    has MTP modules (:func:`~dsv3lib.model.mtp_loss`)."""
    return mtp_loss(model(tokens), labels, mtp_lambda)[0]


def mean_loss(losses: torch.Tensor) -> torch.Tensor:
    """The step loss: mean of the per-micro-batch losses, in global micro-batch order (replica-major)."""
    return losses.mean()


def micro_batches(inputs: torch.Tensor, labels: torch.Tensor, n_micro: int) -> list[tuple]:
    """Split a (B, T) batch into ``n_micro`` equal micro-batches along B (DualPipe: the first half
    enters at rank 0, the second half at the last rank)."""
    if inputs.size(0) % n_micro:
        raise ValueError(f"n_micro: batch {inputs.size(0)} does not split into {n_micro} equal micro-batches")
    return list(zip(inputs.chunk(n_micro), labels.chunk(n_micro)))


def reference_step(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, n_micro: int,
                   mtp_lambda: float = 0.3) -> torch.Tensor:
    """The oracle: the same step in one process -- each micro-batch through the whole model, the losses
    averaged with :func:`mean_loss`, one backward (gradients accumulate into ``model``). Returns the loss."""
    losses = [micro_loss(model, x, y, mtp_lambda) for x, y in micro_batches(inputs, labels, n_micro)]
    loss = mean_loss(torch.stack(losses))
    loss.backward()
    return loss.detach()
