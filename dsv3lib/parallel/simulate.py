"""Discrete-event simulation of pipeline schedules: timelines, bubbles, activation memory (chapter 5, Table 2).

Each rank runs its op list from :mod:`dsv3lib.parallel.schedules` strictly in order. An op starts at the
later of (a) its rank finishing the previous op and (b) its inputs arriving:

* ``F`` of stage s waits for ``F`` of stage s−1 of the same micro-batch and direction;
* ``B`` of stage s waits for its own ``F`` and for ``B`` of stage s+1 (the last stage: its own ``F`` only);
* ``W`` waits for its ``B``; an ``FB`` pair waits for the inputs of both parts and ends as one op.

An input made on another rank arrives ``latency`` after its producer ends (a P2P send; same rank: no
delay). Sends never block the sender. Events are processed in time order; a schedule whose order asks a
rank to wait for something that can never come raises ``RuntimeError`` (deadlock).

Table 2's formulas assume latency 0 (DualPipe hides communication under the paired F&B, which this model
expresses only as the ``FB`` cost). Under that assumption ``tests/test_simulate.py`` reproduces them; its
docstring lists the exact cost relations each formula needs.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .schedules import Op, Schedule

__all__ = ["Costs", "SimResult", "dependencies", "gantt", "simulate"]


@dataclass(frozen=True)
class Costs:
    """Op durations (Table 2's symbols) and P2P latency, in any time unit (chapter 5).

    Args:
        F: forward chunk.
        B: full backward chunk (input-grad + weight-grad); a ``zb`` backward costs ``B - W``.
        W: weight-grad part of a backward.
        FB: overlapped F&B pair; ``None`` means ``F + B`` (no saving from overlap).
        latency: delay of a send between different ranks.
    """

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None
    latency: float = 0.0

    def __post_init__(self):
        for name in ("F", "B", "W", "latency"):
            if getattr(self, name) < 0:
                raise ValueError(f"Costs.{name} must be >= 0, got {getattr(self, name)}")
        if self.W > self.B:
            raise ValueError(f"Costs.W must be <= Costs.B (W is part of the full backward), got W={self.W}, B={self.B}")
        if self.FB is not None and self.FB < 0:
            raise ValueError(f"Costs.FB must be >= 0, got {self.FB}")

    @property
    def fb(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, op: Op) -> float:
        """Duration of ``op``."""
        if op.kind == "F":
            return self.F
        if op.kind == "B":
            return self.B - self.W if op.zb else self.B
        if op.kind == "W":
            return self.W
        return self.fb


@dataclass
class SimResult:
    """What :func:`simulate` returns (chapter 5).

    Attributes:
        schedule: the simulated schedule.
        costs: the costs used.
        timeline: ``timeline[rank]`` = list of ``(start, end, op)`` in execution order.
        makespan: end of the last op (all ranks start at 0).
        busy: per rank, total time spent computing.
        bubble: per rank, idle time within the makespan (``makespan - busy``).
        peak_activations: per rank, the most chunks whose ``F`` has started and whose activations are
            not yet freed (at the end of the input-grad ``B``, or of the ``W`` if ``hold_until_w``).
            Unit: one micro-batch's activations for one stage (for DualPipeV a stage is half a device's
            layers).
        param_copies: per rank, parameters held in units of model/n_ranks (1 = 1F1B's share).
    """

    schedule: Schedule
    costs: Costs
    timeline: list
    makespan: float
    busy: list
    bubble: list
    peak_activations: list
    param_copies: list


def dependencies(op: Op, sched: Schedule) -> list:
    """``(kind, mb, stage, direction)`` of the simple ops whose results ``op`` (all its parts) waits for."""
    out = []
    for p in op.parts:
        if p.kind == "F" and p.stage > 0:
            out.append(("F", p.mb, p.stage - 1, p.direction))
        elif p.kind == "B":
            out.append(("F", p.mb, p.stage, p.direction))
            if p.stage < sched.n_stages - 1:
                out.append(("B", p.mb, p.stage + 1, p.direction))
        elif p.kind == "W":
            out.append(("B", p.mb, p.stage, p.direction))
    return out


def _peak(ops, hold_until_w: bool) -> int:
    """Most activations alive on a rank running ``ops`` in order (an ``FB`` allocates before it frees)."""
    alive = peak = 0
    for op in ops:
        for p in op.parts:
            if p.kind == "F":
                alive += 1
                peak = max(peak, alive)
            elif (p.kind == "B" and not (p.zb and hold_until_w)) or (p.kind == "W" and hold_until_w):
                alive -= 1
    return peak


def simulate(schedule: Schedule, costs: Costs = Costs(), hold_until_w: bool = False) -> SimResult:
    """Time ``schedule`` under ``costs`` (chapter 5). See the module docstring for the rules.

    Raises:
        RuntimeError: the op orders deadlock (some rank waits forever), naming the stuck ops.
        ValueError: an op appears twice, or sits on a rank that does not hold its stage.
    """
    sched = schedule
    done: dict = {}  # (kind, mb, stage, direction) of each finished simple op -> (end, rank)
    pos = [0] * sched.n_ranks  # next op index per rank
    free = [0.0] * sched.n_ranks  # when each rank finishes its current op
    timeline: list = [[] for _ in range(sched.n_ranks)]
    for r, ops in enumerate(sched.ops):
        for op in ops:
            for p in op.parts:
                if sched.rank_of(p.stage, p.direction) != r:
                    raise ValueError(
                        f"{p} is on rank {r}, but its stage lives on rank {sched.rank_of(p.stage, p.direction)}"
                    )

    def ready_at(r: int, op: Op):
        """When ``op``'s inputs are all on rank ``r``, or None if some producer has not run yet."""
        t = 0.0
        for key in dependencies(op, sched):
            if key not in done:
                return None
            end, src = done[key]
            t = max(t, end + (costs.latency if src != r else 0.0))
        return t

    # Event loop: an event (t, rank) means "rank may be able to start its next op at time t".
    events = [(0.0, r) for r in range(sched.n_ranks)]
    heapq.heapify(events)
    waiting: set = set()  # ranks blocked on an input not produced yet
    while events:
        t, r = heapq.heappop(events)
        if pos[r] >= len(sched.ops[r]) or t < free[r]:
            continue
        op = sched.ops[r][pos[r]]
        ready = ready_at(r, op)
        if ready is None:
            waiting.add(r)
            continue
        start = max(free[r], ready)
        end = start + costs.of(op)
        timeline[r].append((start, end, op))
        pos[r] += 1
        free[r] = end
        for p in op.parts:
            key = (p.kind, p.mb, p.stage, p.direction)
            if key in done:
                raise ValueError(f"{p} runs twice")
            done[key] = (end, r)
        heapq.heappush(events, (end, r))
        for w in waiting:  # their input may have just been produced
            heapq.heappush(events, (max(free[w], end), w))
        waiting.clear()

    stuck = {r: str(sched.ops[r][pos[r]]) for r in range(sched.n_ranks) if pos[r] < len(sched.ops[r])}
    if stuck:
        raise RuntimeError(f"{sched.name} deadlocks: ranks wait forever at {stuck}")
    makespan = max((tl[-1][1] for tl in timeline if tl), default=0.0)
    busy = [sum(e - s for s, e, _ in tl) for tl in timeline]
    return SimResult(
        schedule=sched,
        costs=costs,
        timeline=timeline,
        makespan=makespan,
        busy=busy,
        bubble=[makespan - b for b in busy],
        peak_activations=[_peak(ops, hold_until_w) for ops in sched.ops],
        param_copies=[sched.param_copies(r) for r in range(sched.n_ranks)],
    )


COLOURS = {"F": "#4c72b0", "B": "#dd8452", "Bi": "#f0b27a", "W": "#55a868", "FB": "#8172b3"}


def gantt(timeline, ax=None, title: str | None = None):
    """Draw a timeline as a Gantt chart, one row per rank (chapter 5).

    Args:
        timeline: a :class:`SimResult`, or its ``timeline`` (per rank, a list of ``(start, end, op)``).
        ax: matplotlib axes to draw on; a new figure if None.
        title: axes title; by default the schedule name and makespan.

    Boxes are coloured by op kind (``Bi`` = input-grad-only backward) and labelled with the micro-batch
    (a trailing ``'`` marks DualPipe's direction 1; an ``FB`` box shows ``f/b``). Returns the axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    name = timeline.schedule.name if isinstance(timeline, SimResult) else "timeline"
    timeline = timeline.timeline if isinstance(timeline, SimResult) else timeline
    n_ranks = len(timeline)
    makespan = max((tl[-1][1] for tl in timeline if tl), default=0.0)
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 0.45 * n_ranks + 1))

    def label(p: Op) -> str:
        return f"{p.mb}{chr(39) if p.direction else ''}"

    for r, tl in enumerate(timeline):
        for start, end, op in tl:
            kind = "Bi" if op.zb else op.kind
            ax.barh(r, end - start, left=start, height=0.8, color=COLOURS[kind], edgecolor="black", linewidth=0.5)
            text = "/".join(label(p) for p in op.parts)
            ax.text((start + end) / 2, r, text, ha="center", va="center", fontsize=9)
    ax.set_yticks(range(n_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(n_ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, makespan)
    ax.set_xlabel("time")
    ax.set_title(title or f"{name}: makespan {makespan:g}")
    kinds = sorted({"Bi" if op.zb else op.kind for tl in timeline for _, _, op in tl}, key=list(COLOURS).index)
    handles = [Patch(color=COLOURS[k], label=k) for k in kinds]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    return ax
