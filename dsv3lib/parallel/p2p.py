"""Point-to-point messages between pipeline ranks for one step: which message goes where, in what order (chapter 5).

In a pipeline schedule every message is implied by the op list (:mod:`dsv3lib.parallel.schedules`): the
``F`` of stage s sends its output to whoever runs the ``F`` of stage s+1 of the same micro-batch, the ``B``
of stage s sends its input-gradient to whoever runs the ``B`` of stage s−1. A message is named by the op
that consumes it, ``(kind, mb, stage, direction)``.

:class:`Mailbox` holds one rank's messages for one step. Sends are asynchronous (``isend``: the next
compute runs while the tensor travels). Receives are posted in exactly the order the sender sends, so the
pairing of sends and receives between two ranks never depends on tags -- which NCCL ignores. A receive is
posted one op ahead (:meth:`Mailbox.post`) so the transfer lands during compute; the blocking
:meth:`Mailbox.recv` records how long it waited: the bubbles and the communication not hidden.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .schedules import Op, Schedule

__all__ = ["Mailbox", "message_of", "source_of"]


def message_of(schedule: Schedule, p: Op) -> tuple | None:
    """``(key, destination rank)`` of the message simple op ``p`` produces, or None (the last stage's F,
    stage 0's B, W)."""
    if p.kind == "F" and p.stage < schedule.n_stages - 1:
        return ("F", p.mb, p.stage + 1, p.direction), schedule.rank_of(p.stage + 1, p.direction)
    if p.kind == "B" and p.stage > 0:
        return ("B", p.mb, p.stage - 1, p.direction), schedule.rank_of(p.stage - 1, p.direction)
    return None


def source_of(schedule: Schedule, key: tuple) -> int:
    """The rank that sends message ``key``."""
    kind, _, stage, d = key
    return schedule.rank_of(stage - 1 if kind == "F" else stage + 1, d)


class Mailbox:
    """One rank's point-to-point messages for one step of ``schedule``.

    Args:
        schedule: the step's schedule (its ranks are ranks of ``group``).
        rank: this rank in ``group``.
        group: the pipeline's process group (None: the world).
        like: shape, dtype and device of every message: (b, T, dim) hidden states or their gradients.
        t_start: ``time.perf_counter()`` of the step's start, the zero of :attr:`waits`.
    """

    def __init__(self, schedule: Schedule, rank: int, group, like: tuple, t_start: float):
        self.schedule, self.rank, self.group, self.t_start = schedule, rank, group, t_start
        self.shape, self.dtype, self.device = like
        self.order: dict[int, list] = {}  # source rank -> keys it sends to this rank, in its send order
        for src, ops in enumerate(schedule.ops):
            for op in ops:
                for p in op.parts:
                    msg = message_of(schedule, p)
                    if msg is not None and msg[1] == self.rank and src != self.rank:
                        self.order.setdefault(src, []).append(msg[0])
        self.posted = {src: 0 for src in self.order}  # receives posted so far, per source
        self.pending: dict = {}  # key -> (work, buffer): posted, not yet taken
        self.local: dict = {}  # key -> tensor made on this rank for this rank (DualPipeV's turn)
        self.taken: set = set()
        self.sends: list = []  # (work, tensor): the tensor must live until the send completes
        self.waits: list = []  # (start, end, key) of every blocking wait, seconds since t_start

    def _peer(self, r: int) -> int:  # group rank -> global rank for the p2p calls
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _tag(self, key: tuple) -> int:  # unique per message within a step (gloo matches on it)
        kind, mb, stage, d = key
        s = self.schedule
        return ((d * s.n_stages + stage) * s.n_micro + mb) * 2 + (kind == "B")

    def send(self, t: torch.Tensor, p: Op) -> None:
        """Send what simple op ``p`` produced to the rank that consumes it."""
        key, dst = message_of(self.schedule, p)
        if dst == self.rank:
            self.local[key] = t
        else:
            t = t.contiguous()
            self.sends.append((dist.isend(t, self._peer(dst), group=self.group, tag=self._tag(key)), t))

    def post(self, key: tuple) -> None:
        """Post (without waiting) the receives from ``key``'s source up to ``key``, in the source's order."""
        if key in self.local or key in self.pending or key in self.taken:
            return
        src = source_of(self.schedule, key)
        if src == self.rank:  # made on this rank: no message
            return
        order = self.order[src]
        while key not in self.pending:
            k = order[self.posted[src]]
            self.posted[src] += 1
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.pending[k] = (dist.irecv(buf, self._peer(src), group=self.group, tag=self._tag(k)), buf)

    def recv(self, key: tuple) -> torch.Tensor:
        """Wait for message ``key`` and return it."""
        if key in self.local:
            return self.local.pop(key)
        self.post(key)
        work, buf = self.pending.pop(key)
        self.taken.add(key)
        t0 = time.perf_counter()
        work.wait()
        self.waits.append((t0 - self.t_start, time.perf_counter() - self.t_start, key))
        return buf

    def finish(self) -> None:
        """Wait for every send of the step; every message must have been consumed."""
        for work, _ in self.sends:
            work.wait()
        if self.local or self.pending:
            raise RuntimeError(f"rank {self.rank}: messages left unconsumed: {sorted(self.local) + sorted(self.pending)}")
