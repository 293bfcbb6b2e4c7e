"""Pipeline runtime: execute 1F1B, ZB1P, DualPipe and DualPipeV across processes (chapter 5, V3 §3.2.1).

The runtime runs exactly the per-rank op lists of :mod:`dsv3lib.parallel.schedules` (the same
:class:`~dsv3lib.parallel.schedules.Schedule` that :mod:`dsv3lib.parallel.simulate` times), so what is
simulated is what runs. Each rank walks its list in order; for every op it waits for the op's inputs,
computes, and sends results on with asynchronous ``torch.distributed`` point-to-point ops (gloo on CPU,
NCCL on GPU: whatever backend the process group has).

Stages come from :mod:`dsv3lib.parallel.stages` (slices of the single-device Transformer's own blocks; the
MTP modules with the head). For DualPipe, rank r holds stage r of direction 0 and stage PP−1−r of direction
1, so every stage lives on two ranks (the "2× parameters" of Table 2); each copy accumulates its own
direction's gradients, and :mod:`dsv3lib.parallel.parallelize` adds the copies after the step. DualPipeV's
device d holds stages d and 2·PP−1−d of one direction (one copy). Messages between ranks go through a
:class:`~dsv3lib.parallel.p2p.Mailbox`.

The zero-bubble split of the backward (``B`` input-grad, deferred ``W`` weight-grad) uses a
:class:`~dsv3lib.parallel.weight_grad.WeightGradStore`, as the official DualPipe does: on schedules with
``W`` ops, stages run their forward under :meth:`~WeightGradStore.capture`, so every linear layer's
backward can hand its dW = dYᵀ·X to the store instead of computing it. An input-grad ``B`` is a full
``autograd.backward`` under :meth:`~WeightGradStore.defer` (it frees the graph; norm scales get their
gradients here), and ``W`` runs the stored GEMMs (:meth:`~WeightGradStore.flush`). A full ``B`` (1F1B,
or DualPipe's own) computes everything at once.

:meth:`PipelineRunner.step` returns the per-micro-batch losses, which the last stages compute; every rank
gets all of them (an all-reduce in which each entry is one rank's value plus zeros: exact), so their mean
equals :func:`~dsv3lib.parallel.stages.reference_step`'s loss bit for bit.

Backends: only gloo on CPU is tested (no GPU in the test matrix). Receives are posted in each sender's
send order, so sends and receives pair up without tags, as NCCL needs; but NCCL also serialises a rank
pair's sends and receives on one stream, so opposite-direction traffic between two ranks (DualPipe) may
need the pair's ops grouped with ``batch_isend_irecv`` there -- untested.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .p2p import Mailbox
from .schedules import Op, Schedule
from .stages import micro_batches
from .weight_grad import WeightGradStore

__all__ = ["PipelineRunner", "bubble_fractions", "op_durations"]


@dataclass
class _Step:
    """Everything one step needs, built by :meth:`PipelineRunner.step` (DualPipe's ``_reset_states``)."""
    data: list  # [(tokens, labels)] per micro-batch, global micro-batch order
    seed: torch.Tensor  # d loss / d micro-batch loss
    mailbox: Mailbox
    store: WeightGradStore
    capture: bool  # the schedule has W ops: forwards run under the store's capture
    t_start: float
    losses: dict = field(default_factory=dict)  # global micro-batch -> loss
    parts: dict = field(default_factory=dict)  # global micro-batch -> (main cross-entropy, mean MTP one)
    saved: dict = field(default_factory=dict)  # chunk -> (input, output) kept for the backward
    hold: list | None = None  # inside an overlapped pair: sends issued after both halves
    events: list = field(default_factory=list)
    part_events: list = field(default_factory=list)
    deferred: dict = field(default_factory=dict)  # chunk -> weight-gradient closures its W ran


class PipelineRunner:
    """Runs one rank's part of a pipeline schedule (chapter 5).

    Args:
        schedule: the :class:`~dsv3lib.parallel.schedules.Schedule` (its ranks are ranks of ``group``).
        stages: ``{(stage, direction): Stage}`` held by this rank (:func:`~dsv3lib.parallel.stages.stages_for_rank`).
        rank: this rank in ``group``.
        group: the pipeline's process group (default: the world group).
        overlap: run each ``FB`` pair's two halves concurrently (:meth:`_run_pair`), so that one half's
            expert-parallel all-to-alls proceed while the other computes.

    After :meth:`step`, ``events`` holds this rank's measured timeline: ``(start, end, op)`` in seconds
    since ``t_start``, the step's start (after a barrier), in the format :func:`dsv3lib.parallel.simulate.gantt`
    draws; :meth:`gather_events` collects every rank's list. ``waits`` holds ``(start, end, key)`` of each
    blocking wait for a message: the time communication was *not* hidden (the pipeline's bubbles).
    ``part_events`` has the same for each simple op (an ``FB``'s two halves separately: they overlap in
    time when ``overlap`` is on). ``deferred``: for each chunk, how many weight-gradient GEMMs its ``W`` ran.
    """

    def __init__(self, schedule: Schedule, stages: dict, rank: int, group=None, *, overlap: bool = False):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a Schedule (schedules.make_schedule), got {type(schedule).__name__}")
        held = set(schedule.stages_held(rank))
        if set(stages) != held:
            raise ValueError(f"stages: {schedule.name} places {sorted(held)} on rank {rank}, got {sorted(stages)}")
        self.schedule, self.stages, self.rank, self.group, self.overlap = schedule, stages, rank, group, overlap
        self._step: _Step | None = None
        self.last_parts: torch.Tensor | None = None  # (n_micro, 2): main and mean MTP cross-entropy of the last step

    # the last step's measurements
    events = property(lambda self: self._step.events if self._step else [])
    part_events = property(lambda self: self._step.part_events if self._step else [])
    waits = property(lambda self: self._step.mailbox.waits if self._step else [])
    t_start = property(lambda self: self._step.t_start if self._step else 0.0)
    deferred = property(lambda self: self._step.deferred if self._step else {})

    # -------------------------------------------------------------- small verbs
    def _global(self, mb: int, direction: int) -> int:
        """Global micro-batch index: DualPipe's direction 1 takes the second half."""
        s = self.schedule
        return direction * (s.n_micro // 2) + mb if len(s.placement) == 2 else mb

    def _needs(self, p: Op):
        """The message key simple op ``p`` consumes from another stage, or None (stage 0's F, the last
        stage's B, W)."""
        st = self.stages[(p.stage, p.direction)]
        if (p.kind == "F" and not st.first) or (p.kind == "B" and not st.last):
            return (p.kind,) + p.chunk
        return None

    def _inputs_of(self, p: Op):
        """Wait for what simple op ``p`` consumes (tokens on stage 0, the loss seed on the last stage)."""
        key = self._needs(p)
        if key is not None:
            return self._step.mailbox.recv(key)
        if p.kind == "F":
            return self._step.data[self._global(p.mb, p.direction)][0]
        return self._step.seed if p.kind == "B" else None

    def _send(self, t: torch.Tensor, p: Op) -> None:
        if self._step.hold is not None:  # inside an overlapped pair: sent after both halves, in op order
            self._step.hold.append((t, p))
        else:
            self._step.mailbox.send(t, p)

    def _forward(self, p: Op, x: torch.Tensor) -> None:
        step, st = self._step, self.stages[(p.stage, p.direction)]
        if not st.first:
            x.requires_grad_(True)
        with step.store.capture() if step.capture else nullcontext():  # linear layers' dW may wait for W
            out = st(x)
            if st.last:
                g = self._global(p.mb, p.direction)
                out, main, depths = st.loss_parts(out, *step.data[g])
                step.losses[g] = out.detach()
                step.parts[g] = torch.stack([main, torch.stack(depths).mean() if depths else torch.zeros_like(main)])
        if not st.last:
            self._send(out.detach(), p)
        step.saved[p.chunk] = (x, out)

    def _backward(self, p: Op, dy: torch.Tensor) -> None:
        step, st = self._step, self.stages[(p.stage, p.direction)]
        x, out = step.saved.pop(p.chunk)
        params = [q for q in st.parameters() if q.requires_grad]
        inputs = ([] if st.first else [x]) + params
        if p.zb:  # input-grad (and non-linear params); the linear layers' dW wait in the store for W
            with step.store.defer(p.chunk):
                torch.autograd.backward(out, dy, inputs=inputs)
        else:
            torch.autograd.backward(out, dy, inputs=inputs)
        if not st.first:
            self._send(x.grad, p)

    def _weight_grad(self, p: Op) -> None:
        self._step.deferred[p.chunk] = self._step.store.flush(p.chunk)

    def _run(self, op: Op, next_op: Op | None) -> None:
        step = self._step
        for p in op.parts + (next_op.parts if next_op is not None else ()):
            key = self._needs(p)  # post this op's and the next op's receives: they land during compute
            if key is not None:
                step.mailbox.post(key)
        ins = [self._inputs_of(p) for p in op.parts]  # waits (a bubble) happen before the op starts
        t0 = time.perf_counter()
        if self.overlap and op.kind == "FB":
            self._run_pair(op.parts, ins)
        else:  # FB without overlap: F, then B; F's send still travels while B computes
            for p, x in zip(op.parts, ins):
                self._run_part(p, x)
        step.events.append((t0 - step.t_start, time.perf_counter() - step.t_start, op))

    def _run_part(self, p: Op, x) -> None:
        t0 = time.perf_counter()
        {"F": self._forward, "B": self._backward, "W": lambda p, _: self._weight_grad(p)}[p.kind](p, x)
        self._step.part_events.append((t0 - self._step.t_start, time.perf_counter() - self._step.t_start, p))

    def _run_pair(self, parts: tuple, ins: list) -> None:
        """An overlapped ``FB``: the forward half runs in a second thread while this one runs the backward
        half. torch releases the GIL in its kernels and in ``wait``, so whenever one half blocks on a
        collective (an expert-parallel all-to-all) the other computes: the CPU analogue of DualPipe's
        overlap, which on GPUs splits the SMs between the two. The halves' collectives use different
        process groups (``ExpertParallelMoE(backward_group=...)``), so each group sees one thread, in the
        same order on every rank. Both halves' sends are issued afterwards, in op order."""
        (f, b), (xf, xb) = parts, ins
        self._step.hold, errors = [], []

        def forward_half():
            try:
                self._run_part(f, xf)
            except Exception as err:  # noqa: BLE001 (re-raised in the calling thread)
                errors.append(err)

        helper = threading.Thread(target=forward_half, name=f"forward-half-rank{self.rank}")
        helper.start()
        try:
            self._run_part(b, xb)
        finally:
            helper.join()
            held, self._step.hold = self._step.hold, None
        if errors:
            raise errors[0]
        for t, p in held:
            self._send(t, p)

    # -------------------------------------------------------------- the step
    def step(self, inputs: torch.Tensor, labels: torch.Tensor, *, grad_scale: float | None = None) -> torch.Tensor:
        """One pipelined forward + backward of a (B, T) batch split into the schedule's micro-batches.

        Every rank passes the same ``inputs``/``labels`` (only the ranks holding the first and last
        stages read their values; the others need the shapes). Gradients accumulate into the stages'
        parameters (for DualPipe, each copy its own direction's part). ``grad_scale``: d loss / d micro-batch
        loss (default ``1 / n_micro``, the mean; data parallelism passes ``1 / (replicas · n_micro)``).
        Returns the (n_micro,) per-micro-batch losses on every rank.
        """
        s = self.schedule
        w = next(next(iter(self.stages.values())).parameters())
        data = [(x.to(w.device), y.to(w.device)) for x, y in micro_batches(inputs, labels, s.n_micro)]
        b, t = data[0][0].shape
        like = ((b, t, next(iter(self.stages.values())).dim), w.dtype, w.device)  # every message
        scale = 1.0 / s.n_micro if grad_scale is None else grad_scale
        dist.barrier(group=self.group)
        t_start = time.perf_counter()
        self._step = step = _Step(
            data=data, seed=torch.full((), scale, dtype=torch.float32, device=w.device),
            mailbox=Mailbox(s, self.rank, self.group, like, t_start), store=WeightGradStore(),
            capture=any(p.kind == "W" for op in s.ops[self.rank] for p in op.parts), t_start=t_start)
        ops = s.ops[self.rank]
        for i, op in enumerate(ops):
            self._run(op, ops[i + 1] if i + 1 < len(ops) else None)
        step.mailbox.finish()
        if step.saved or len(step.store):
            raise RuntimeError(f"rank {self.rank}: {s.name} left chunks without their backward or W")
        losses = torch.zeros(s.n_micro, 3, dtype=torch.float32, device=w.device)
        for g, v in step.losses.items():
            losses[g, 0], losses[g, 1:] = v, step.parts[g].detach()
        dist.all_reduce(losses, group=self.group)  # each entry: one rank's value plus zeros -> exact
        self.last_parts = losses[:, 1:]
        return losses[:, 0].contiguous()

    def gather_events(self, waits: bool = False) -> list:
        """Every rank's ``events`` (or ``waits``) of the last step, ``timeline[rank]``, on every rank."""
        out = [None] * self.schedule.n_ranks
        dist.all_gather_object(out, self.waits if waits else self.events, group=self.group)
        return out


def op_durations(timeline: list) -> dict:
    """Measured seconds per op kind over all ranks of a gathered timeline: ``{"F": [...], "B": [...],
    "Bi": [...] (input-grad-only B), "W": [...], "FB": [...]}`` -- e.g. medians as simulator costs."""
    out: dict = {}
    for events in timeline:
        for start, end, op in events:
            out.setdefault("Bi" if op.zb else op.kind, []).append(end - start)
    return out


def bubble_fractions(timeline: list) -> list:
    """Per rank, the idle fraction of the step's makespan (first start to last end over all ranks)."""
    t0 = min(ev[0][0] for ev in timeline if ev)
    t1 = max(ev[-1][1] for ev in timeline if ev)
    return [1 - sum(e - s for s, e, _ in ev) / (t1 - t0) for ev in timeline]
