"""Pipeline runtime: execute 1F1B, ZB1P, DualPipe and DualPipeV across processes (chapter 5, V3 §3.2.1).

The runtime runs exactly the per-rank op lists of :mod:`dsv3lib.parallel.schedules` (the same
:class:`~dsv3lib.parallel.schedules.Schedule` that :mod:`dsv3lib.parallel.simulate` times), so what is
simulated is what runs. Each rank walks its list in order; for every op it waits for the op's inputs,
computes, and sends results on with asynchronous ``torch.distributed`` point-to-point ops (gloo on CPU,
NCCL on GPU: whatever backend the process group has).

Stages come from :mod:`dsv3lib.parallel.stages` (slices of the single-device Transformer's own blocks; no
MTP). For DualPipe, rank r holds stage r of direction 0 and stage PP−1−r of direction 1, so every stage
lives on two ranks (the "2× parameters" of Table 2) and the two copies' gradients are added at the end of
the step; DualPipeV's device d holds stages d and 2·PP−1−d of one direction (one copy).

The zero-bubble split of the backward (``B`` input-grad, deferred ``W`` weight-grad) uses a
:class:`~dsv3lib.parallel.weight_grad.WeightGradStore`, as the official DualPipe does: on schedules with
``W`` ops, stages run their forward under :meth:`~WeightGradStore.capture`, so every linear layer's
backward can hand its dW = dYᵀ·X to the store instead of computing it. An input-grad ``B`` is a full
``autograd.backward`` under :meth:`~WeightGradStore.defer` (it frees the graph; norm scales get their
gradients here), and ``W`` runs the stored GEMMs (:meth:`~WeightGradStore.flush`). A full ``B`` (1F1B,
or DualPipe's own) computes everything at once.

The step loss is :func:`~dsv3lib.parallel.stages.mean_loss` of the per-micro-batch losses, which the
last stages compute; every rank gets all of them (an all-reduce in which each entry is one rank's value plus
zeros: exact), so the loss equals :func:`~dsv3lib.parallel.stages.reference_step`'s bit for bit.

Backends: only gloo on CPU is tested (no GPU in the test matrix). Receives are posted in each sender's
send order, so sends and receives pair up without tags, as NCCL needs; but NCCL also serialises a rank
pair's sends and receives on one stream, so opposite-direction traffic between two ranks (DualPipe) may
need the pair's ops grouped with ``batch_isend_irecv`` there -- untested. With NCCL, call
``torch.cuda.set_device`` before building the runner (``all_gather_object`` needs it).
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from .schedules import Op, Schedule
from .stages import make_schedule, mean_loss, micro_batches, reference_step, stages_for_rank
from .weight_grad import WeightGradStore

__all__ = ["PipelineRunner", "bubble_fractions", "op_durations", "pipeline_check", "run_pipeline_check"]


# ------------------------------------------------------------------------------------------------ runtime
class PipelineRunner:
    """Runs one rank's part of a pipeline schedule (chapter 5).

    Args:
        schedule_name: ``"1F1B"``, ``"ZB1P"``, ``"DualPipe"`` or ``"DualPipeV"`` (:data:`SCHEDULES`).
        stages: ``{(stage, direction): Stage}`` held by this rank (:func:`stages_for_rank`).
        rank, world: this rank and the number of pipeline ranks (DualPipeV: devices) in ``group``.
        group: the process group (default: the world group); ranks are group ranks.
        overlap: run each ``FB`` pair's two halves concurrently (:meth:`_run_pair`), so that one half's
            expert-parallel all-to-alls proceed while the other computes (:mod:`dsv3lib.parallel.hybrid`).

    After :meth:`step`, ``events`` holds this rank's measured timeline: ``(start, end, op)`` in seconds
    since ``t_start``, the step's start (after a barrier), in the format :func:`dsv3lib.parallel.simulate.gantt` draws;
    :meth:`gather_events` collects every rank's list. ``waits`` holds ``(start, end, key)`` of each
    blocking wait for a message (key = the consuming op's ``(kind, mb, stage, direction)``): the time
    communication was *not* hidden. Receives are posted one op ahead and sends are asynchronous, so a
    transfer normally proceeds under the neighbouring compute (in an ``FB`` pair, F's send travels while
    B computes); the waits that remain are the pipeline's bubbles. ``part_events`` has the same for each
    simple op (an ``FB``'s two halves separately: they overlap in time when ``overlap`` is on).
    """

    def __init__(self, schedule_name: str, stages: dict, rank: int, world: int, group=None, *,
                 overlap: bool = False):
        self.name, self.rank, self.world, self.group = schedule_name, rank, world, group
        self.overlap = overlap
        self.stages = stages
        self._schedules: dict = {}
        held = set(make_schedule(schedule_name, world, 2 * world).stages_held(rank))
        if set(stages) != held:
            raise ValueError(f"stages: {schedule_name} places {sorted(held)} on rank {rank}, got {sorted(stages)}")
        self.events: list = []
        self.waits: list = []
        self.part_events: list = []
        self._hold: list | None = None

    def schedule(self, num_chunks: int) -> Schedule:
        if num_chunks not in self._schedules:
            self._schedules[num_chunks] = make_schedule(self.name, self.world, num_chunks)
        return self._schedules[num_chunks]

    # -------------------------------------------------------------- communication (small verbs)
    def _peer(self, r: int) -> int:  # group rank -> global rank for the p2p calls
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _tag(self, key: tuple) -> int:
        kind, mb, stage, d = key  # unique per message within a step
        return ((d * self._sched.n_stages + stage) * self._sched.n_micro + mb) * 2 + (kind == "B")

    def _plan_receives(self) -> None:
        """For each peer, the keys of the messages it sends to this rank, in the order it sends them.

        Receives are posted in exactly that order (lazily, up to the one needed), so the pairing of sends
        and receives between two ranks never depends on tags -- it holds for NCCL, which ignores them.
        """
        s = self._sched
        self._order = {}
        for src, ops in enumerate(s.ops):
            for op in ops:
                for p in op.parts:
                    for key, dst in self._outputs(p):
                        if dst == self.rank and src != self.rank:
                            self._order.setdefault(src, []).append(key)
        self._posted = {src: 0 for src in self._order}
        self._pending: dict = {}  # key -> (work, buffer)
        self._local: dict = {}  # key -> tensor produced on this rank for this rank
        self._sends: list = []

    def _outputs(self, p: Op) -> list:
        """``(key, rank)`` of the messages simple op ``p`` produces: a key is the consuming op's
        ``(kind, mb, stage, direction)``."""
        s = self._sched
        if p.kind == "F" and p.stage < s.n_stages - 1:
            return [(("F", p.mb, p.stage + 1, p.direction), s.rank_of(p.stage + 1, p.direction))]
        if p.kind == "B" and p.stage > 0:
            return [(("B", p.mb, p.stage - 1, p.direction), s.rank_of(p.stage - 1, p.direction))]
        return []

    def _send(self, t: torch.Tensor, p: Op) -> None:
        if self._hold is not None:  # inside an overlapped pair: sent after both halves, in op order
            self._hold.append((t, p))
            return
        (key, dst), = self._outputs(p)
        if dst == self.rank:
            self._local[key] = t
        else:  # asynchronous: the next compute runs while the tensor travels
            self._sends.append((dist.isend(t.contiguous(), self._peer(dst), group=self.group, tag=self._tag(key)), t))

    def _source(self, key: tuple) -> int:
        kind, _, stage, d = key
        return self._sched.rank_of(stage - 1 if kind == "F" else stage + 1, d)

    def _post(self, key: tuple) -> None:
        """Post (without waiting) the receives from ``key``'s source up to ``key``, in the source's order."""
        if key in self._local or key in self._pending or key in self._taken:
            return
        src = self._source(key)
        if src == self.rank:  # made on this rank (DualPipeV's turn at the last device): no message
            return
        order = self._order[src]
        while key not in self._pending:
            k = order[self._posted[src]]
            self._posted[src] += 1
            buf = torch.empty(self._shape, dtype=self._dtype, device=self._device)
            self._pending[k] = (dist.irecv(buf, self._peer(src), group=self.group, tag=self._tag(k)), buf)

    def _recv(self, key: tuple) -> torch.Tensor:
        if key in self._local:
            return self._local.pop(key)
        self._post(key)
        work, buf = self._pending.pop(key)
        self._taken.add(key)
        t0 = time.perf_counter()
        work.wait()
        self.waits.append((t0 - self.t_start, time.perf_counter() - self.t_start, key))
        return buf

    # -------------------------------------------------------------- compute (small verbs)
    def _global(self, mb: int, direction: int) -> int:
        return direction * (self._sched.n_micro // 2) + mb if len(self._sched.placement) == 2 else mb

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
            return self._recv(key)
        if p.kind == "F":
            return self._data[self._global(p.mb, p.direction)][0]
        return self._seed if p.kind == "B" else None

    def _forward(self, p: Op, x: torch.Tensor) -> None:
        st = self.stages[(p.stage, p.direction)]
        if not st.first:
            x.requires_grad_(True)
        if self._capture:  # linear layers' weight grads may wait for a W op
            with self._store.capture():
                out = st(x)
        else:
            out = st(x)
        if st.last:
            g = self._global(p.mb, p.direction)
            out = st.loss(out, self._data[g][1])
            self._losses[g] = out.detach()
        else:
            self._send(out.detach(), p)
        self._saved[p.chunk] = (x, out)

    def _backward(self, p: Op, dy: torch.Tensor) -> None:
        st = self.stages[(p.stage, p.direction)]
        x, out = self._saved.pop(p.chunk)
        params = [q for q in st.parameters() if q.requires_grad]
        inputs = ([] if st.first else [x]) + params
        if p.zb:  # input-grad (and non-linear params); the linear layers' dW wait in the store for W
            with self._store.defer(p.chunk):
                torch.autograd.backward(out, dy, inputs=inputs)
        else:
            torch.autograd.backward(out, dy, inputs=inputs)
        dx = None if st.first else x.grad
        if not st.first:
            self._send(dx, p)

    def _weight_grad(self, p: Op) -> None:
        self._store.flush(p.chunk)

    def _run(self, op: Op, next_op: Op | None) -> None:
        for p in op.parts + (next_op.parts if next_op is not None else ()):
            key = self._needs(p)  # post this op's and the next op's receives: they land during compute
            if key is not None:
                self._post(key)
        ins = [self._inputs_of(p) for p in op.parts]  # waits (a bubble) happen before the op starts
        t0 = time.perf_counter()
        if self.overlap and op.kind == "FB":
            self._run_pair(op.parts, ins)
        else:  # FB without overlap: F, then B; F's send still travels while B computes
            for p, x in zip(op.parts, ins):
                self._run_part(p, x)
        self.events.append((t0 - self.t_start, time.perf_counter() - self.t_start, op))

    def _run_part(self, p: Op, x) -> None:
        t0 = time.perf_counter()
        if p.kind == "F":
            self._forward(p, x)
        elif p.kind == "B":
            self._backward(p, x)
        else:
            self._weight_grad(p)
        self.part_events.append((t0 - self.t_start, time.perf_counter() - self.t_start, p))

    def _run_pair(self, parts: tuple, ins: list) -> None:
        """An overlapped ``FB``: the forward half runs in a second thread while this one runs the backward
        half. torch releases the GIL in its kernels and in ``wait``, so whenever one half blocks on a
        collective (an expert-parallel all-to-all) the other computes: the CPU analogue of DualPipe's
        overlap, which on GPUs splits the SMs between the two. The halves' collectives use different
        process groups (``ExpertParallelMoE(backward_group=...)``), so each group sees one thread, in the
        same order on every rank. Both halves' sends are issued afterwards, in op order."""
        (f, b), (xf, xb) = parts, ins
        self._hold, errors = [], []

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
            held, self._hold = self._hold, None
        if errors:
            raise errors[0]
        for t, p in held:
            self._send(t, p)

    # -------------------------------------------------------------- the step
    def step(self, inputs: torch.Tensor, labels: torch.Tensor, num_chunks: int, *, loss_scale: float = 1.0
             ) -> torch.Tensor:
        """One pipelined forward + backward of a (B, T) batch split into ``num_chunks`` micro-batches.

        Every rank passes the same ``inputs``/``labels`` (only the ranks holding the first and last
        stages read their values; the others need the shapes). Gradients accumulate into the stages'
        parameters (for DualPipe, the sum over both directions, identical on both copies). Returns the
        step loss (:func:`mean_loss` of the per-micro-batch losses) on every rank. ``loss_scale``
        multiplies the gradients (1/DP when data-parallel replicas' gradients are summed afterwards).
        """
        s = self._sched = self.schedule(num_chunks)
        any_stage = next(iter(self.stages.values()))
        w = next(any_stage.parameters())
        self._device, self._dtype = w.device, w.dtype
        self._data = [(x.to(self._device), y.to(self._device)) for x, y in micro_batches(inputs, labels, num_chunks)]
        b, t = self._data[0][0].shape
        self._shape = (b, t, any_stage.dim)  # every message: hidden states or their grads
        seed = torch.ones((), dtype=torch.float32, device=self._device) * loss_scale
        self._seed = seed / num_chunks  # d mean / d loss_i (as the reference's mean computes it)
        self._losses: dict = {}
        self._saved: dict = {}
        self._store = WeightGradStore()
        self._capture = any(p.kind == "W" for op in s.ops[self.rank] for p in op.parts)
        self._plan_receives()
        stash = self._stash_grads() if len(s.placement) == 2 else None
        self.events, self.waits, self.part_events, self._taken = [], [], [], set()
        dist.barrier(group=self.group)
        self.t_start = time.perf_counter()
        ops = s.ops[self.rank]
        for i, op in enumerate(ops):
            self._run(op, ops[i + 1] if i + 1 < len(ops) else None)
        for work, _ in self._sends:
            work.wait()
        assert not self._saved and not len(self._store) and not self._local, "schedule left work undone"
        losses = torch.zeros(num_chunks, dtype=torch.float32, device=self._device)
        for g, v in self._losses.items():
            losses[g] = v
        dist.all_reduce(losses, group=self.group)  # each entry: one rank's value plus zeros -> exact
        if stash is not None:
            self._sync_copies(stash)
        return mean_loss(losses)

    def _stash_grads(self) -> dict:
        """DualPipe: set aside gradients from earlier steps so that adding the copies counts them once."""
        stash = {}
        for st in self.stages.values():
            for q in st.parameters():
                stash[q], q.grad = q.grad, None
        return stash

    def _sync_copies(self, stash: dict) -> None:
        """DualPipe: rank r and PP−1−r hold the same two stages (one per direction); add their gradients,
        direction 0's copy first, so both copies end up bit-identical."""
        peer = self.world - 1 - self.rank
        keys = sorted(self.stages)  # (stage, direction); the peer holds the same stages, other direction
        mine = torch.cat([_grad(q).flatten() for k in keys for q in self.stages[k].parameters()])
        theirs = torch.empty_like(mine)
        ops = [dist.P2POp(dist.isend, mine, self._peer(peer), self.group),
               dist.P2POp(dist.irecv, theirs, self._peer(peer), self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        i = 0
        for k in keys:
            for q in self.stages[k].parameters():
                n = q.numel()
                a, b = mine[i:i + n].view_as(q), theirs[i:i + n].view_as(q)
                g = a + b if k[1] == 0 else b + a
                q.grad = g if stash[q] is None else stash[q] + g
                i += n

    def gather_events(self, waits: bool = False) -> list:
        """Every rank's ``events`` (or ``waits``) of the last step, ``timeline[rank]``, on every rank."""
        out = [None] * self.world
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


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


# ------------------------------------------------------------------------------- check (a spawnable worker)
def pipeline_check(rank: int, world: int, init_file: str, result_file: str, cases: list, seed: int = 0,
                   batch: tuple = (8, 16), overrides: dict | None = None) -> None:
    """Worker for ``torch.multiprocessing.spawn``: each case ``(schedule_name, num_chunks[, steps])`` runs
    ``steps`` (default 1) pipelined steps of a seeded tiny model (``n_layers = 2·world``, no MTP, plus
    ``overrides``) on a ``batch = (sequences, tokens)`` batch (gradients accumulate over the steps);
    rank 0 also runs as many :func:`reference_step` on an identical model, in the same process and thread
    setting. Rank 0 saves,
    per case, whether every step's loss equals the reference's (``torch.equal``), the largest gradient
    difference over all ranks' stage parameters, the losses, the last step's wall time and every rank's
    measured timeline and waits, to ``result_file``."""
    from ..config import ModelConfig
    from ..model import Transformer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        kw = {"n_layers": 2 * world, "n_mtp_modules": 0, "max_seq_len": max(32, batch[1])}
        cfg = ModelConfig.preset("tiny", **{**kw, **(overrides or {})})
        g = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(0, cfg.vocab_size, (batch[0], batch[1] + 1), generator=g)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        torch.manual_seed(seed)
        model = Transformer(cfg)  # the same model on every rank; each runner keeps its slices
        refs: dict = {}  # (num_chunks, steps) -> (losses, {name: grad}), rank 0 only
        results = []
        for name, num_chunks, *rest in cases:
            steps = rest[0] if rest else 1
            if rank == 0 and (num_chunks, steps) not in refs:
                torch.manual_seed(seed)
                ref = Transformer(cfg)
                ref_losses = [reference_step(ref, inputs, labels, num_chunks) for _ in range(steps)]
                refs[num_chunks, steps] = ref_losses, {n: _grad(q) for n, q in ref.named_parameters()}
            model.zero_grad(set_to_none=True)
            runner = PipelineRunner(name, stages_for_rank(model, name, rank, world), rank, world)
            losses = []
            for _ in range(steps):
                t0 = time.perf_counter()
                losses.append(runner.step(inputs, labels, num_chunks))
                seconds = time.perf_counter() - t0
            grads = {n: _grad(q) for st in runner.stages.values() for n, q in st.named_parameters()}
            gathered = [None] * world
            dist.gather_object(grads, gathered if rank == 0 else None, dst=0)
            timeline, waits = runner.gather_events(), runner.gather_events(waits=True)
            if rank == 0:
                ref_losses, ref_grads = refs[num_chunks, steps]
                diff = max((q - ref_grads[n]).abs().max().item() for gr in gathered for n, q in gr.items())
                results.append({"schedule": name, "world": world, "num_chunks": num_chunks, "steps": steps,
                                "loss_equal": all(map(torch.equal, losses, ref_losses)),
                                "loss": [v.item() for v in losses], "ref_loss": [v.item() for v in ref_losses],
                                "grad_diff": diff, "all_params": {n for gr in gathered for n in gr} == set(ref_grads),
                                "seconds": seconds, "timeline": timeline, "waits": waits})
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


def run_pipeline_check(world: int, cases: list, seed: int = 0, batch: tuple = (8, 16),
                       overrides: dict | None = None) -> list[dict]:
    """Spawn ``world`` CPU processes running :func:`pipeline_check` (one process group for all cases);
    returns rank 0's list of per-case results (the chapter draws their ``timeline`` with ``gantt``)."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "store"), os.path.join(tmp, "result.pt")
        mp.spawn(pipeline_check, args=(world, init_file, result_file, list(cases), seed, batch, overrides),
                 nprocs=world, join=True)
        return torch.load(result_file, weights_only=False)
