"""Pipeline schedules as per-rank op lists: 1F1B, ZB1P, DualPipe and DualPipeV (chapter 5, V3 §3.2.1, Table 2).

A schedule says, for every pipeline rank, which compute op it runs next, in order. Nothing here runs a
model: :mod:`dsv3lib.parallel.simulate` times these lists, :mod:`dsv3lib.parallel.pipeline` executes them.

Ops use the paper's names (Table 2):

* ``F``  forward of one micro-batch through one stage (a "chunk").
* ``B``  backward of one chunk. A plain ``B`` is the *full* backward (input-grad and weight-grad).
  With ``zb=True`` ("zero bubble", the reference's ``enable_zb``) it computes the input-grad only and
  leaves its weight-grad to a later ``W``; its cost is then B − W.
* ``W``  a deferred weight-grad. Deferred weight-grads form a FIFO per rank (the reference's
  ``WeightGradStore``): each ``W`` runs the oldest one, and names the chunk it belongs to.
* ``FB`` a forward chunk and a backward chunk of *another* micro-batch run as one overlapped pair
  (the paper's F&B; Fig. 4): one's all-to-all and P2P traffic hides under the other's compute. Its
  ``pair`` holds the two parts (an ``F`` op, then a full ``B`` op).

Sends and receives are implicit: an ``F`` of stage s consumes the output of the ``F`` of stage s−1 of
the same micro-batch, a ``B`` of stage s the input-grad of the ``B`` of stage s+1; when those stages sit on
different ranks the simulator charges a communication latency. Stages are numbered along the path a
micro-batch takes (stage 0 holds the embedding); ``placement[direction][stage]`` is the rank holding it.
DualPipe feeds micro-batches from both ends: direction 0 enters at rank 0, direction 1 at the last rank,
and micro-batches are numbered 0, 1, ... within each direction.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = [
    "SCHEDULES", "Op", "Schedule", "dualpipe", "dualpipev", "make_schedule", "one_f_one_b", "placement",
    "stages_held", "zb1p",
]

KINDS = ("F", "B", "W", "FB")


@dataclass(frozen=True)
class Op:
    """One compute op of a schedule (chapter 5).

    Args:
        kind: ``"F"``, ``"B"``, ``"W"`` or ``"FB"`` (see the module docstring).
        mb: micro-batch index within its direction (−1 for ``FB``; see ``pair``).
        stage: pipeline stage along the micro-batch's path (−1 for ``FB``).
        direction: 0, or 1 for DualPipe's micro-batches fed from the last rank.
        zb: ``B`` only: input-grad only, weight-grad deferred to a ``W``.
        pair: ``FB`` only: ``(F op, B op)`` run overlapped.
    """

    kind: str
    mb: int = -1
    stage: int = -1
    direction: int = 0
    zb: bool = False
    pair: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Op.kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "FB") != bool(self.pair):
            raise ValueError("Op.pair is required for kind 'FB' and only for it")
        if self.zb and self.kind != "B":
            raise ValueError("Op.zb applies to kind 'B' only")

    @property
    def parts(self) -> tuple:
        """The simple ops this op runs: ``pair`` for ``FB``, else ``(self,)``."""
        return self.pair if self.kind == "FB" else (self,)

    @property
    def chunk(self) -> tuple:
        """``(mb, stage, direction)``: the chunk an ``F``/``B``/``W`` works on."""
        return (self.mb, self.stage, self.direction)

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"{self.pair[0]}&{self.pair[1]}"
        name = "Bi" if self.zb else self.kind
        arrow = "'" if self.direction else ""
        return f"{name}{self.mb}{arrow}@s{self.stage}"


@dataclass(frozen=True)
class Schedule:
    """Per-rank op lists plus where each stage lives (chapter 5).

    Args:
        name: schedule name (``"1F1B"``, ``"ZB1P"``, ``"DualPipe"``, ``"DualPipeV"``).
        n_micro: micro-batches in the step (both directions together for DualPipe).
        n_stages: stages on a micro-batch's path.
        placement: ``placement[direction][stage]`` = the rank holding that stage for that direction.
        ops: ``ops[rank]`` = that rank's ops, in execution order.
    """

    name: str
    n_micro: int
    n_stages: int
    placement: tuple
    ops: tuple

    @property
    def n_ranks(self) -> int:
        return len(self.ops)

    def rank_of(self, stage: int, direction: int = 0) -> int:
        return self.placement[direction][stage]

    def stages_held(self, rank: int) -> list:
        """``(stage, direction)`` pairs whose parameters ``rank`` holds."""
        return stages_held(self.placement, rank)

    def param_copies(self, rank: int) -> float:
        """Parameters on ``rank`` in units of model/n_ranks (1F1B's share): 2.0 for DualPipe's two copies."""
        return len(self.stages_held(rank)) * self.n_ranks / self.n_stages

    def table(self) -> str:
        """One line per rank: the op sequence, for printing in the chapter."""
        return "\n".join(f"rank {r}: " + " ".join(str(op) for op in ops) for r, ops in enumerate(self.ops))


def _check(rule: bool, message: str) -> None:
    if not rule:
        raise ValueError(message)


def _check_counts(pp: int, n_micro: int, pp_name: str = "pp") -> None:
    _check(isinstance(pp, int) and pp >= 1, f"{pp_name} must be an int >= 1, got {pp!r}")
    _check(isinstance(n_micro, int) and n_micro >= 1, f"n_micro must be an int >= 1, got {n_micro!r}")


class _Rank:
    """The small verbs one rank's schedule is written in; appends ops and keeps the counters. ``stage_of[phase]``
    and ``dir_of[phase]``: the stage/direction a phase (the reference's local model index 0/1) is on this rank."""

    def __init__(self, stage_of, dir_of):
        self.stage_of, self.dir_of = stage_of, dir_of
        self.ops, self.n_f, self.n_b = [], {}, {}  # ops so far; forwards and backwards per (stage, direction)
        self.w_store: deque = deque()  # deferred weight-grads, FIFO

    def _next(self, counter, phase):
        key = (self.stage_of[phase], self.dir_of[phase])
        i = counter.get(key, 0)
        counter[key] = i + 1
        return i

    def _f(self, phase) -> Op:
        return Op("F", self._next(self.n_f, phase), self.stage_of[phase], self.dir_of[phase])

    def _b(self, phase, zb=False) -> Op:
        op = Op("B", self._next(self.n_b, phase), self.stage_of[phase], self.dir_of[phase], zb=zb)
        if zb:
            self.w_store.append(op)
        return op

    def F(self, phase=0):
        self.ops.append(self._f(phase))

    def B(self, phase=0, zb=False):
        self.ops.append(self._b(phase, zb))

    def W(self):
        b = self.w_store.popleft()
        self.ops.append(Op("W", b.mb, b.stage, b.direction))

    def FB(self, phase_f, phase_b):
        f = self._f(phase_f)
        self.ops.append(Op("FB", pair=(f, self._b(phase_b))))


def one_f_one_b(pp: int, n_micro: int) -> Schedule:
    """1F1B (PipeDream-flush): warm up with forwards, then alternate F and full B, then drain (chapter 5).

    Rank r holds stage r. Table 2: bubble (PP−1)(F+B), activations PP, parameters 1×.
    """
    _check_counts(pp, n_micro)
    ranks = []
    for r in range(pp):
        k = _Rank([r], [0])
        warmup = min(pp - r - 1, n_micro)
        # Step 1: nF (warm-up)
        for _ in range(warmup):
            k.F()
        # Step 2 (main step): nFB
        for _ in range(n_micro - warmup):
            k.F()
            k.B()
        # Step 3: nB (cool-down)
        for _ in range(warmup):
            k.B()
        ranks.append(tuple(k.ops))
    return Schedule("1F1B", n_micro, pp, placement("1F1B", pp), tuple(ranks))


def zb1p(pp: int, n_micro: int) -> Schedule:
    """ZB1P (ZB-H1 of Qi et al., 2023): 1F1B with B split into B (input-grad) and W (weight-grad) (chapter 5).

    Rank r keeps up to r weight-grads deferred: the later a rank, the faster it must return input-grads
    to the ranks before it, so it postpones more W; they run in the cool-down, where 1F1B would idle
    waiting for the next input-grad. Same order of F and B as 1F1B: activations freed at B peak at
    PP−r on rank r, and at PP on every rank if they are held until W. Table 2: bubble (PP−1)(F+B−2W).
    """
    _check_counts(pp, n_micro)
    ranks = []
    for r in range(pp):
        k = _Rank([r], [0])
        warmup = min(pp - r - 1, n_micro)
        defer = r
        # Step 1: nF (warm-up)
        for _ in range(warmup):
            k.F()
        # Step 2 (main step): nFB[W] -- W only once more than `defer` weight-grads wait
        for _ in range(n_micro - warmup):
            k.F()
            k.B(zb=True)
            if len(k.w_store) > defer:
                k.W()
        # Step 3: nBW (cool-down: each W fills the wait for the next input-grad)
        for _ in range(warmup):
            k.B(zb=True)
            k.W()
        # Step 4: nW (flush)
        while k.w_store:
            k.W()
        ranks.append(tuple(k.ops))
    return Schedule("ZB1P", n_micro, pp, placement("ZB1P", pp), tuple(ranks))


def _dual_steps(k: _Rank, n_half: int, hr: int, n_chunks_per_phase0: int, middle: bool) -> None:
    """The eight phases of the reference's ``DualPipe.step()`` / ``DualPipeV.step()`` for one rank.

    ``n_half`` is the reference's ``num_half_ranks`` (DualPipe) or ``num_ranks`` (DualPipeV),
    ``hr`` its ``half_rank`` (or ``rank``), ``n_chunks_per_phase0`` the micro-batches entering phase 0.
    """
    # Step 1: nF0
    for _ in range((n_half - hr - 1) * 2):
        k.F(0)
    # Step 2: nF0F1
    for _ in range(hr + 1):
        k.F(0)
        k.F(1)
    # Step 3: nB1W1F1 (zero bubble: weight-grad right after its input-grad, filling the wait for F1)
    for _ in range(n_half - hr - 1):
        k.B(1, zb=True)
        k.W()
        k.F(1)
    # Step 4 (main step): nF0B1F1B0
    for i in range(n_chunks_per_phase0 - 2 * n_half + hr + 1):
        if i == 0 and middle:
            # the reference does not overlap these two, to shrink the bubble
            k.F(0)
            k.B(1)
        else:
            k.FB(0, 1)
        k.FB(1, 0)
    # Step 5: nB1F1B0
    for _ in range(n_half - hr - 1):
        k.B(1)
        k.FB(1, 0)
    # Step 6: nB1B0 (the second half of these backwards defer their weight-grads)
    zb = False
    for i in range(hr + 1):
        if i == (hr + 1) // 2 and hr % 2 == 1:
            zb = True
        k.B(1, zb=zb)
        if i == (hr + 1) // 2 and hr % 2 == 0:
            zb = True
        k.B(0, zb=zb)
    # Step 7: nWB0 (zero bubble)
    for _ in range(n_half - hr - 1):
        k.W()
        k.B(0, zb=True)
    # Step 8: nW
    while k.w_store:
        k.W()


def dualpipe(pp: int, n_micro: int) -> Schedule:
    """DualPipe (V3 §3.2.1, Fig. 5; reference ``dualpipe.py``): micro-batches fed from both ends (chapter 5).

    Rank r holds stage r of direction 0 and stage PP−1−r of direction 1: two copies of the parameters.
    ``n_micro`` counts both directions; each direction gets ``n_micro // 2``. Rules (the reference's
    asserts): PP even, ``n_micro`` even, ``n_micro >= 2 * PP``. Table 2: bubble (PP/2−1)(F&B+B−3W),
    activations PP+1, parameters 2×.
    """
    _check_counts(pp, n_micro)
    _check(pp % 2 == 0, f"DualPipe needs an even number of ranks (pp % 2 == 0), got pp={pp}")
    _check(n_micro % 2 == 0, f"DualPipe needs an even number of micro-batches (n_micro % 2 == 0), got {n_micro}")
    _check(n_micro >= 2 * pp, f"DualPipe needs n_micro >= 2 * pp, got n_micro={n_micro}, pp={pp}")
    half = pp // 2
    ranks = []
    for r in range(pp):
        second = int(r >= half)
        # phase p on this rank is direction p ^ second; direction d's stage on rank r
        dirs = [second, 1 - second]
        stages = [r if d == 0 else pp - 1 - r for d in dirs]
        k = _Rank(stages, dirs)
        hr = min(r, pp - 1 - r)
        _dual_steps(k, half, hr, n_micro // 2, middle=hr == half - 1)
        ranks.append(tuple(k.ops))
    return Schedule("DualPipe", n_micro, pp, placement("DualPipe", pp), tuple(ranks))


def dualpipev(pp_devices: int, n_micro: int) -> Schedule:
    """DualPipeV ("cut-in-half" DualPipe; reference ``dualpipev.py``): a V-shaped placement (chapter 5).

    Device d holds stages d and 2·pp_devices−1−d: micro-batches enter at device 0, run down to the last
    device and back up, so the loss is on device 0. One parameter copy (each device holds 2 of
    2·pp_devices stages). Rule (the reference's assert): ``n_micro >= 2 * pp_devices``.
    """
    _check_counts(pp_devices, n_micro, "pp_devices")
    _check(
        n_micro >= 2 * pp_devices,
        f"DualPipeV needs n_micro >= 2 * pp_devices, got n_micro={n_micro}, pp_devices={pp_devices}",
    )
    p = pp_devices
    ranks = []
    for r in range(p):
        k = _Rank([r, 2 * p - 1 - r], [0, 0])
        _dual_steps(k, p, r, n_micro, middle=r == p - 1)
        ranks.append(tuple(k.ops))
    return Schedule("DualPipeV", n_micro, 2 * p, placement("DualPipeV", p), tuple(ranks))


SCHEDULES = {"1F1B": one_f_one_b, "ZB1P": zb1p, "DualPipe": dualpipe, "DualPipeV": dualpipev}


def _known(name: str) -> None:
    _check(name in SCHEDULES, f"schedule: unknown {name!r}; choose from {sorted(SCHEDULES)}")


def make_schedule(name: str, pp: int, n_micro: int) -> Schedule:
    """``SCHEDULES[name](pp, n_micro)``, with an error naming the choices for an unknown name."""
    _known(name)
    return SCHEDULES[name](pp, n_micro)


def placement(name: str, pp: int) -> tuple:
    """Where schedule ``name`` puts each stage on ``pp`` ranks, ``placement[direction][stage]`` = rank, whatever
    the micro-batch count. 1F1B, ZB1P: stage r on rank r. DualPipe: direction 1 mirrors direction 0, so rank r
    holds stages r and PP−1−r (two copies). DualPipeV: 2·PP stages in a V, device d holds d and 2·PP−1−d."""
    _known(name)
    down = tuple(range(pp))
    return {"DualPipe": (down, down[::-1]), "DualPipeV": (down + down[::-1],)}.get(name, (down,))


def stages_held(place: tuple, rank: int) -> list:
    """``(stage, direction)`` pairs that ``rank`` holds under placement ``place`` (:func:`placement`)."""
    return [(s, d) for d, row in enumerate(place) for s, r in enumerate(row) if r == rank]
