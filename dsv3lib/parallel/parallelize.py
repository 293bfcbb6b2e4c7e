"""Compose the parallelisms on one model: FP8, expert shards, pipeline stages, data parallelism (chapters 5 and 6).

:func:`parallelize` applies the transforms in order, the way torchtitan's ``parallelize`` does, to the
single-device :class:`~dsv3lib.model.Transformer` that every rank builds from the same seed:

1. FP8 (optional): every Linear but the head becomes an :class:`~dsv3lib.fp8.FP8Linear` (chapter 1);
2. expert parallelism: each MoE keeps 1/ep of its routed experts (:func:`~dsv3lib.parallel.expert.shard_experts`);
3. pipeline: the rank keeps the stages its schedule places on it (:func:`~dsv3lib.parallel.stages.stages_for_rank`)
   and a :class:`~dsv3lib.parallel.pipeline.PipelineRunner` runs them.

:meth:`ParallelRunner.step` then does one optimizer-free step of a global batch: each replica (see
:mod:`dsv3lib.parallel.layout`) takes its rows, the pipeline runs them, and the gradients are made whole:

* *tied copies*: a parameter on two pipeline ranks (DualPipe's two copies of every stage; under 1F1B and ZB1P
  the embedding, which the first stage and the MTP modules on the last stage both use) gets the sum of both
  ranks' gradients, identical on both;
* *replicas*: every parameter's gradient is summed over the replicas that hold it (the local experts' over
  ``dp``, everything else over ``dp × ep``). Each micro-batch's loss is seeded with 1/(replicas · n_micro), so
  the sums are the gradient of the mean loss, as one process computes it on the whole batch.

The loss it returns is the mean of every replica's micro-batch losses in global order; with
``bitwise=True`` (expert GEMMs per source rank, see :class:`~dsv3lib.parallel.expert.ExpertParallelMoE`) it
equals :func:`~dsv3lib.parallel.stages.reference_step` on one process bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..fp8 import convert_to_fp8
from ..model import MoE
from .expert import ExpertParallelMoE, global_names, shard_experts
from .launch import heartbeat
from .layout import ParallelLayout, check_layout
from .pipeline import PipelineRunner
from .schedules import Schedule, placement, stages_held
from .stages import Stage, mean_loss, stages_for_rank

__all__ = ["ParallelRunner", "parallelize"]


def parallelize(model: nn.Module, layout: ParallelLayout, schedule: Schedule, *, fp8: bool = False,
                overlap: bool = False, bitwise: bool = False, mtp_lambda: float = 0.3) -> ParallelRunner:
    """Cut ``model`` (the same seeded Transformer on every rank; modified in place) into this rank's part.

    Args:
        layout: this rank's place (:class:`~dsv3lib.parallel.layout.ParallelLayout`).
        schedule: a :class:`~dsv3lib.parallel.schedules.Schedule` for ``layout.pp`` ranks
            (:func:`~dsv3lib.parallel.schedules.make_schedule`): 1F1B, ZB1P, DualPipe or DualPipeV.
        fp8: convert the Linears to block-scaled FP8 first (the head, embedding and routers stay high precision).
        overlap: run each ``FB`` pair's halves in two threads, so one's all-to-alls hide under the other.
        bitwise: expert GEMMs per source rank, so results equal the one-process model's bit for bit.
        mtp_lambda: weight of the MTP loss (V3 §2.2: 0.3, later 0.1); change it between steps with
            :meth:`ParallelRunner.set_mtp_lambda`.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a Schedule (schedules.make_schedule), got {type(schedule).__name__}")
    cfg = model.cfg
    if schedule.n_ranks != layout.pp:
        raise ValueError(f"schedule: {schedule.name} is laid out for {schedule.n_ranks} ranks, but pp={layout.pp}")
    has_moe = any(isinstance(m, MoE) for m in model.modules())
    check_layout(layout.pp * layout.ep * layout.dp, layout.pp, layout.ep, layout.dp, schedule=schedule.name,
                 n_micro=schedule.n_micro, n_layers=cfg.n_layers, n_experts=cfg.n_routed_experts if has_moe else None)
    if fp8:
        convert_to_fp8(model)
    if layout.ep > 1:
        shard_experts(model, layout.ep_group, backward_group=layout.ep_backward_group, batch_sources=not bitwise)
    stages = stages_for_rank(model, schedule.name, layout.pp_rank, layout.pp, mtp_lambda)
    pipe = PipelineRunner(schedule, stages, layout.pp_rank, layout.pp_group, overlap=overlap)
    return ParallelRunner(model, layout, pipe)


class ParallelRunner:
    """This rank's part of a parallelized model: :meth:`step` runs one forward + backward (chapters 5 and 6).

    Attributes: ``layout``; ``pipeline`` (the :class:`~dsv3lib.parallel.pipeline.PipelineRunner`: its
    measured ``events``); ``stages``; ``steps`` (completed steps).
    """

    def __init__(self, model: nn.Module, layout: ParallelLayout, pipeline: PipelineRunner):
        self.model, self.layout, self.pipeline, self.stages = model, layout, pipeline, pipeline.stages
        self.steps = 0
        self.last_parts: torch.Tensor | None = None
        self.names = {}  # parameter -> its name in the unsharded model; each parameter once
        for st in self.stages.values():
            for name, q in global_names(st).items():
                self.names.setdefault(q, name)
        local_experts = {q for st in self.stages.values() for m in st.modules() if isinstance(m, ExpertParallelMoE)
                         for q in m.experts.parameters()}
        ordered = sorted(self.names, key=self.names.get)
        self.expert_params = [q for q in ordered if q in local_experts]  # summed over dp
        self.replicated_params = [q for q in ordered if q not in local_experts]  # summed over dp × ep
        self.tied = self._tied_partners(model)  # pipeline rank -> parameters both ranks hold

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this rank holds, each once (for the optimizer)."""
        return list(self.names)

    def set_mtp_lambda(self, value: float) -> None:
        for st in self.stages.values():
            st.mtp_lambda = value

    def _tied_partners(self, model: nn.Module) -> dict[int, list[nn.Parameter]]:
        """For each other pipeline rank, the parameters (in name order) that both it and this rank hold."""
        sched, me = self.pipeline.schedule, self.layout.pp_rank
        place, n_stages = placement(sched.name, self.layout.pp), sched.n_stages
        held = {r: {n for s, _ in stages_held(place, r) for n in global_names(Stage(model, s, n_stages))}
                for r in range(self.layout.pp)}
        out: dict[int, list] = {}
        for q in sorted(self.names, key=self.names.get):
            partners = [r for r in held if r != me and self.names[q] in held[r]]
            if len(partners) > 1:
                raise ValueError(f"{self.names[q]}: held by pipeline ranks {[me] + partners}; at most two supported")
            for r in partners:
                out.setdefault(r, []).append(q)
        return out

    # ---------------------------------------------------------------- the step
    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One forward + backward of a global (B, T) batch; every rank passes the same batch.

        Replica ``i`` of ``R`` takes rows ``[i·B/R, (i+1)·B/R)`` and splits them into the schedule's
        micro-batches. Gradients accumulate into ``.grad`` (zero them between steps); every holder of a
        parameter ends with the same gradient. Returns the step loss (mean over all R · n_micro micro-batches).
        """
        heartbeat(self.steps)
        lay, n = self.layout, self.pipeline.schedule.n_micro
        if inputs.shape != labels.shape or inputs.dim() != 2:
            raise ValueError(f"inputs/labels: expected two (B, T) tensors, got {tuple(inputs.shape)} and "
                             f"{tuple(labels.shape)}")
        if inputs.size(0) % (lay.n_replicas * n):
            raise ValueError(f"inputs: batch {inputs.size(0)} does not split into {lay.n_replicas} replicas × "
                             f"{n} micro-batches")
        rows = inputs.size(0) // lay.n_replicas
        part = slice(lay.replica * rows, (lay.replica + 1) * rows)
        stash = {q: q.grad for q in self.names}  # earlier steps' gradients: summed once, added back at the end
        for q in self.names:
            q.grad = None
        losses = self.pipeline.step(inputs[part], labels[part], grad_scale=1.0 / (lay.n_replicas * n))
        grads = {q: torch.zeros_like(q) if q.grad is None else q.grad for q in self.names}  # idle experts too
        grads = self._sum_over_ranks(grads, self.replicated_params, lay.replica_group, lay.n_replicas)
        grads = self._sum_over_ranks(grads, self.expert_params, lay.dp_group, lay.dp)
        for q, g in grads.items():
            q.grad = g
        for q, g in stash.items():
            if g is not None:
                q.grad = g + q.grad
        everyone = torch.zeros(lay.n_replicas * n, 3, dtype=losses.dtype, device=losses.device)
        everyone[lay.replica * n:(lay.replica + 1) * n] = torch.cat([losses[:, None], self.pipeline.last_parts], 1)
        if lay.n_replicas > 1:
            dist.all_reduce(everyone, group=lay.replica_group)  # each entry: one replica's value plus zeros
        self.steps += 1
        self.last_parts = everyone[:, 1:].mean(0)  # (main cross-entropy, mean MTP cross-entropy) of the step
        return mean_loss(everyone[:, 0].contiguous())

    def sum_over_holders(self, values: dict) -> dict:
        """Sum per-rank values that belong to replicated parameters (keyed by the parameter: e.g. a gate's expert
        loads under the gate's weight) over every rank holding the parameter: its pipeline partner and all
        replicas. Every holder gets the same sums (the bias-balancing loads of a step, chapter 6)."""
        return self._sum_over_ranks(values, [q for q in self.replicated_params if q in values],
                                    self.layout.replica_group, self.layout.n_replicas)

    def _sum_over_ranks(self, values: dict, params: list, group, size: int) -> dict:
        """``values[q]`` summed over the pipeline partner holding ``q`` too (DualPipe's copies; the embedding
        under 1F1B with MTP) and then over ``group`` (``size`` ranks), for each ``q`` in ``params``, in one flat
        bucket per exchange; the partner sum is a + b == b + a in floating point, so both copies end
        bit-identical."""
        out, keep = dict(values), set(params)  # sets and dicts: tensors compare by identity there
        for peer, tied in sorted(self.tied.items()):
            tied = [q for q in tied if q in keep]
            if tied:
                mine = torch.cat([out[q].flatten() for q in tied])
                theirs = torch.empty_like(mine)
                dst = dist.get_global_rank(self.layout.pp_group, peer)
                ops = [dist.P2POp(dist.isend, mine, dst, self.layout.pp_group),
                       dist.P2POp(dist.irecv, theirs, dst, self.layout.pp_group)]
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
                out.update(_split(mine + theirs, tied, out))
        if size > 1 and params:
            flat = torch.cat([out[q].flatten() for q in params])
            dist.all_reduce(flat, group=group)
            out.update(_split(flat, params, out))
        return out


def _split(flat: torch.Tensor, keys: list, like: dict) -> dict:
    """A flat bucket back into one tensor per key, shaped like ``like[key]``."""
    out, i = {}, 0
    for q in keys:
        n = like[q].numel()
        out[q] = flat[i:i + n].view_as(like[q]).clone()
        i += n
    return out
