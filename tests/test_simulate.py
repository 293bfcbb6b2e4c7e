"""Pipeline simulator (chapter 5): the V3 paper's Table 2 reproduced by simulation, plus timeline sanity.

Table 2 (F forward chunk, B full backward, W its weight-grad part, F&B an overlapped pair):

    1F1B      bubble (PP-1)(F+B)          params 1x  activations PP
    ZB1P      bubble (PP-1)(F+B-2W)       params 1x  activations PP
    DualPipe  bubble (PP/2-1)(F&B+B-3W)   params 2x  activations PP+1

What these tests verify (latency 0, as the table assumes; "bubble" = a rank's idle time within the
makespan, the table's value = the largest over ranks; activations = the most chunks alive on a rank,
largest over ranks, in units of one micro-batch through one stage):

* 1F1B: for any costs and any n_micro >= 1, every rank idles exactly (PP-1)(F+B).
* ZB1P: every rank idles exactly (PP-1)(F+B-2W) when W <= F and 2W <= B (W no longer than a forward or an
  input-grad backward); otherwise the bubble is larger (never below (PP-1)F: the last rank waits that long
  for its first input). Activations: PP - r on rank r if freed at the input-grad B, PP on every rank if
  held until W.
* DualPipe: the largest bubble over ranks (the middle ranks) is exactly (PP/2-1)(F&B+B-3W) when F = B - W
  (a forward costs as much as an input-grad backward) and W <= F, for any F&B in [max(F, B), F + B], and
  any valid n_micro (it does not grow with n_micro). With F != B - W the reference's schedule departs
  from the formula (see test_dualpipe_formula_needs_f_equal_input_grad).
* DualPipeV on P devices (2P stages): the same bubble as DualPipe on PP = 2P ranks, 2P+1 half-size chunks
  alive (P + 1/2 in 1F1B-stage units), one parameter copy.
"""

import itertools
import random

import pytest

from dsv3lib.parallel.schedules import SCHEDULES, Op, Schedule, dualpipe, dualpipev, one_f_one_b, zb1p
from dsv3lib.parallel.simulate import Costs, dependencies, gantt, simulate

# F = B - W >= W: the cost relation under which all three Table-2 bubbles hold exactly
TABLE_COSTS = [Costs(F=3, B=5, W=2), Costs(F=2, B=4, W=2), Costs(F=4, B=7, W=3), Costs(F=1, B=2, W=1)]
SIZES = [(pp, n) for pp in (2, 4, 6, 8) for n in (2 * pp, 2 * pp + 2, 5 * pp)]


def table2(costs, pp):
    c = costs
    return {
        "1F1B": ((pp - 1) * (c.F + c.B), 1, pp),
        "ZB1P": ((pp - 1) * (c.F + c.B - 2 * c.W), 1, pp),
        "DualPipe": ((pp // 2 - 1) * (c.fb + c.B - 3 * c.W), 2, pp + 1),
    }


@pytest.mark.parametrize("costs", TABLE_COSTS, ids=lambda c: f"F{c.F}B{c.B}W{c.W}")
@pytest.mark.parametrize("pp,n_micro", SIZES)
def test_table2(costs, pp, n_micro):
    for name, (bubble, params, acts) in table2(costs, pp).items():
        # ZB1P's memory equals 1F1B's when the activations a W needs are counted until that W
        res = simulate(SCHEDULES[name](pp, n_micro), costs, hold_until_w=name == "ZB1P")
        assert max(res.bubble) == bubble, name
        assert max(res.peak_activations) == acts, name
        assert res.param_copies == [params] * pp, name
        assert sum(res.busy) == pp * n_micro * (costs.F + costs.B)


def test_table2_with_cheaper_overlap():
    """F&B below F+B (the overlap hides communication): DualPipe's formula still holds, on the middle ranks."""
    for F, B, W in [(3, 5, 2), (2, 4, 2), (4, 7, 3)]:
        for fb in range(max(F, B), F + B + 1):
            c = Costs(F=F, B=B, W=W, FB=fb)
            for pp in (4, 6, 8):
                res = simulate(dualpipe(pp, 2 * pp + 2), c)
                assert max(res.bubble) == (pp // 2 - 1) * (fb + B - 3 * W)
                assert res.bubble[pp // 2] == max(res.bubble)


def test_1f1b_bubble_holds_for_any_costs():
    for F, B, W in itertools.product((1, 2, 5), (1, 3, 4), (0, 1)):
        for pp, n in [(1, 3), (3, 2), (4, 9), (5, 5)]:
            res = simulate(one_f_one_b(pp, n), Costs(F=F, B=B, W=W))
            assert res.bubble == [(pp - 1) * (F + B)] * pp
            assert res.peak_activations == [min(pp - r, n) for r in range(pp)]


def test_zb1p_bubble_conditions():
    for F, B, W in itertools.product(range(1, 5), range(1, 7), range(5)):
        if W > B:
            continue
        c = Costs(F=F, B=B, W=W)
        for pp in (3, 4):
            res = simulate(zb1p(pp, 3 * pp), c)
            holds = all(b == (pp - 1) * (F + B - 2 * W) for b in res.bubble)
            assert holds == (W <= F and 2 * W <= B), (F, B, W, pp)
            assert min(res.bubble) >= (pp - 1) * F
            assert res.peak_activations == [pp - r for r in range(pp)]


def test_dualpipe_formula_needs_f_equal_input_grad():
    """With F != B - W the reference schedule's bubble departs from (PP/2-1)(F&B+B-3W), either way."""
    sizes = (4, 6, 8)
    for (F, B, W), want in [((4, 4, 1), [10, 20, 30]), ((3, 5, 1), [9, 18, 27]), ((1, 3, 1), [3, 7, 11])]:
        c = Costs(F=F, B=B, W=W)
        got = [max(simulate(dualpipe(pp, 2 * pp), c).bubble) for pp in sizes]
        formula = [(pp // 2 - 1) * (c.fb + c.B - 3 * c.W) for pp in sizes]
        assert got == want and got != formula, (F, B, W, got, formula)


def test_dualpipe_bubble_does_not_grow_with_micro_batches():
    c = Costs(F=3, B=5, W=2, FB=6)
    for pp in (4, 8):
        bubbles = {tuple(simulate(dualpipe(pp, n), c).bubble) for n in range(2 * pp, 6 * pp, 2)}
        assert len(bubbles) == 1


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_dualpipev(p):
    c = Costs(F=3, B=5, W=2, FB=7)
    for n in (2 * p, 2 * p + 1, 4 * p + 3):
        res = simulate(dualpipev(p, n), c)
        assert max(res.bubble) == (p - 1) * (c.fb + c.B - 3 * c.W)
        assert res.peak_activations == [2 * p + 1] * p
        assert res.param_copies == [1.0] * p


@pytest.mark.parametrize(
    "name,size,n_micro",
    [
        (name, size, n)
        for name in SCHEDULES
        for size in (2, 4, 6)
        for n in (2 * size, 2 * size + 2, 7 * size)
        if not (name == "DualPipeV" and size > 4)
    ],
)
def test_timeline_obeys_the_rules(name, size, n_micro):
    """Independent check of every timeline: in order, no overlap, inputs arrived (with latency), durations."""
    c = Costs(F=2, B=3, W=1, FB=4, latency=0.5)
    s = SCHEDULES[name](size, n_micro)
    res = simulate(s, c)
    end = {}
    for r, tl in enumerate(res.timeline):
        assert [op for _, _, op in tl] == list(s.ops[r])
        for (_, e0, _), (s1, _, _) in itertools.pairwise(tl):
            assert e0 <= s1
        for start, stop, op in tl:
            assert stop - start == c.of(op)
            for p in op.parts:
                end[(p.kind, p.mb, p.stage, p.direction)] = (stop, r)
    for r, tl in enumerate(res.timeline):
        for start, _, op in tl:
            for key in dependencies(op, s):
                stop, src = end[key]
                assert start >= stop + (c.latency if src != r else 0)
        # bubble + busy = makespan
        assert res.bubble[r] + res.busy[r] == res.makespan
    # latency never helps
    assert res.makespan >= simulate(s, Costs(F=2, B=3, W=1, FB=4)).makespan


def test_no_deadlock_for_any_valid_size():
    """Every valid (size, n_micro), under assorted seeded costs and latencies, runs to completion."""
    rng = random.Random(0)
    combos = (
        [(name, pp, n) for name in ("1F1B", "ZB1P") for pp in range(1, 9) for n in range(1, 2 * pp + 3)]
        + [("DualPipe", pp, n) for pp in (2, 4, 6, 8, 10) for n in range(2 * pp, 3 * pp + 5, 2)]
        + [("DualPipeV", p, n) for p in range(1, 6) for n in range(2 * p, 3 * p + 4)]
    )
    for name, size, n in combos:
        F, B = rng.randint(1, 5), rng.randint(1, 8)
        c = Costs(F=F, B=B, W=rng.randint(0, B), FB=rng.randint(max(F, B), F + B), latency=rng.choice((0, 0.5, 3)))
        res = simulate(SCHEDULES[name](size, n), c)
        assert sum(len(tl) for tl in res.timeline) == sum(len(ops) for ops in res.schedule.ops)
        assert min(res.bubble) >= 0


def test_deadlock_and_bad_schedules_raise():
    f0, b0 = Op("F", 0, 0), Op("B", 0, 0)
    backwards = Schedule("bad", 1, 1, ((0,),), ((b0, f0),))
    with pytest.raises(RuntimeError, match="deadlocks.*B0@s0"):
        simulate(backwards)
    # rank 0 asks for B of mb 1 before its own F of mb 1; rank 1 then starves too
    f = [[Op("F", m, s) for m in range(2)] for s in range(2)]
    b = [[Op("B", m, s) for m in range(2)] for s in range(2)]
    cross = Schedule(
        "cross", 2, 2, ((0, 1),), ((f[0][0], b[0][1], f[0][1], b[0][0]), (f[1][1], f[1][0], b[1][0], b[1][1]))
    )
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(cross)
    misplaced = Schedule("misplaced", 1, 2, ((0, 1),), ((Op("F", 0, 1),), ()))
    with pytest.raises(ValueError, match="lives on rank 1"):
        simulate(misplaced)
    twice = Schedule("twice", 1, 1, ((0,),), ((f0, f0, b0),))
    with pytest.raises(ValueError, match="runs twice"):
        simulate(twice)


def test_costs_validation():
    with pytest.raises(ValueError, match="Costs.W must be <= Costs.B"):
        Costs(F=1, B=2, W=3)
    with pytest.raises(ValueError, match="Costs.latency"):
        Costs(latency=-1)
    with pytest.raises(ValueError, match="Costs.FB"):
        Costs(FB=-1)
    c = Costs(F=3, B=5, W=2)
    assert c.fb == 8 and Costs(F=3, B=5, W=2, FB=6).fb == 6
    assert c.of(Op("B", 0, 0, zb=True)) == 3 and c.of(Op("B", 0, 0)) == 5 and c.of(Op("W", 0, 0)) == 2


def test_gantt_draws_one_row_per_rank():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    res = simulate(dualpipe(4, 8), Costs(F=3, B=5, W=2))
    ax = gantt(res)
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"rank {r}" for r in range(4)]
    assert len(ax.patches) == sum(len(tl) for tl in res.timeline)
    assert "F" in [t.get_text() for t in ax.get_legend().get_texts()]
    _, ax2 = plt.subplots()
    assert gantt(res.timeline, ax=ax2) is ax2 and len(ax2.patches) == len(ax.patches)
    plt.close("all")
