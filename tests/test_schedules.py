"""Pipeline schedules (chapter 5): every chunk runs once, in the right place, and bad sizes are refused."""

from collections import Counter

import pytest

from dsv3lib.parallel.schedules import SCHEDULES, Op, dualpipe, dualpipev, one_f_one_b, zb1p

# (schedule, size, n_micro): valid combinations, including the smallest each rule allows
COMBOS = (
    [("1F1B", pp, n) for pp in (1, 2, 3, 4, 8) for n in (1, 2, 3, pp, 2 * pp + 1)]
    + [("ZB1P", pp, n) for pp in (1, 2, 3, 4, 8) for n in (1, 2, 3, pp, 2 * pp + 1)]
    + [("DualPipe", pp, n) for pp in (2, 4, 6, 8) for n in (2 * pp, 2 * pp + 2, 3 * pp + 4, 40)]
    + [("DualPipeV", p, n) for p in (1, 2, 3, 4, 5) for n in (2 * p, 2 * p + 1, 3 * p + 2, 21)]
)


def simple_ops(schedule):
    """(rank, simple op) for every part of every op."""
    return [(r, p) for r, ops in enumerate(schedule.ops) for op in ops for p in op.parts]


@pytest.mark.parametrize("name,size,n_micro", COMBOS)
def test_every_chunk_runs_forward_backward_once(name, size, n_micro):
    s = SCHEDULES[name](size, n_micro)
    n_dir = len(s.placement)
    per_dir = n_micro // n_dir
    expected = {(mb, st, d) for d in range(n_dir) for mb in range(per_dir) for st in range(s.n_stages)}
    parts = simple_ops(s)
    counts = Counter((p.kind, p.chunk) for _, p in parts)
    for kind in ("F", "B"):
        assert {c for k, c in counts if k == kind} == expected
        assert all(v == 1 for (k, _), v in counts.items() if k == kind)
    # one W exactly for every input-grad-only B, none otherwise
    zb = {p.chunk for _, p in parts if p.kind == "B" and p.zb}
    assert Counter(p.chunk for _, p in parts if p.kind == "W") == Counter(zb)
    # each op sits on the rank that holds its stage
    assert all(s.rank_of(p.stage, p.direction) == r for r, p in parts)


@pytest.mark.parametrize("name,size,n_micro", COMBOS)
def test_rank_order_respects_its_own_chunks(name, size, n_micro):
    """On one rank: F before its B before its W; micro-batches of a stage enter in order."""
    s = SCHEDULES[name](size, n_micro)
    for ops in s.ops:
        seen = {}
        for i, part in enumerate(p for op in ops for p in op.parts):
            seen[(part.kind, part.chunk)] = i
        for (kind, chunk), i in seen.items():
            if kind == "B":
                assert seen[("F", chunk)] < i
            if kind == "W":
                assert seen[("B", chunk)] < i
            mb, st, d = chunk
            if mb > 0 and kind in ("F", "B"):
                assert seen[(kind, (mb - 1, st, d))] < i


def test_zb1p_keeps_1f1b_order():
    """ZB1P = 1F1B with each B split: dropping the Ws and the zb flags gives 1F1B back."""
    for pp, n in [(4, 8), (8, 5), (3, 10)]:
        a, b = one_f_one_b(pp, n), zb1p(pp, n)
        for ra, rb in zip(a.ops, b.ops):
            assert [Op(o.kind, o.mb, o.stage) for o in rb if o.kind != "W"] == list(ra)
        # rank r defers up to r weight-grads: the last rank most
        last = b.ops[-1]
        assert [o.kind for o in last[:3]] == ["F", "B", "F"]


def test_dualpipe_rank0_matches_reference_steps():
    """DualPipe(PP=4, 8 micro-batches), rank 0, step by step as the reference's step() writes it."""
    s = dualpipe(4, 8)
    got = " ".join(str(op) for op in s.ops[0])
    want = (
        "F0@s0 F1@s0 "  # Step 1: nF0
        "F2@s0 F0'@s3 "  # Step 2: nF0F1
        "Bi0'@s3 W0'@s3 F1'@s3 "  # Step 3: nB1W1F1
        "F3@s0&B1'@s3 F2'@s3&B0@s0 "  # Step 4: nF0B1F1B0
        "B2'@s3 F3'@s3&B1@s0 "  # Step 5: nB1F1B0
        "B3'@s3 Bi2@s0 "  # Step 6: nB1B0 (second half zero-bubble)
        "W2@s0 Bi3@s0 "  # Step 7: nWB0
        "W3@s0"  # Step 8: nW
    )
    assert got == want
    # the middle ranks start the main step with an un-overlapped F0 then B1
    mid = [str(op) for op in s.ops[1]]
    assert mid[4:6] == ["F2@s1", "B0'@s2"]

    # mirror symmetry: rank PP-1-r runs rank r's schedule with the directions swapped (same stage numbers)
    def parts(ops, flip):
        return [tuple((p.kind, p.mb, p.stage, p.direction ^ flip, p.zb) for p in op.parts) for op in ops]

    for r in range(4):
        assert parts(s.ops[3 - r], 1) == parts(s.ops[r], 0)


def test_dualpipev_placement_is_a_v():
    s = dualpipev(4, 8)
    assert s.n_stages == 8 and s.n_ranks == 4
    assert [s.rank_of(st) for st in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert s.stages_held(0) == [(0, 0), (7, 0)]
    assert [s.param_copies(r) for r in range(4)] == [1.0] * 4


def test_param_copies():
    assert [one_f_one_b(4, 8).param_copies(r) for r in range(4)] == [1.0] * 4
    assert [dualpipe(4, 8).param_copies(r) for r in range(4)] == [2.0] * 4
    assert dualpipe(4, 8).stages_held(1) == [(1, 0), (2, 1)]


@pytest.mark.parametrize(
    "make,args,rule",
    [
        (dualpipe, (3, 12), r"even number of ranks \(pp % 2 == 0\)"),
        (dualpipe, (4, 9), r"even number of micro-batches \(n_micro % 2 == 0\)"),
        (dualpipe, (4, 6), r"n_micro >= 2 \* pp"),
        (dualpipe, (8, 14), r"n_micro >= 2 \* pp"),
        (dualpipev, (3, 5), r"n_micro >= 2 \* pp_devices"),
        (dualpipev, (0, 5), r"pp_devices must be an int >= 1"),
        (one_f_one_b, (0, 4), r"pp must be an int >= 1"),
        (zb1p, (4, 0), r"n_micro must be an int >= 1"),
        (one_f_one_b, (2.0, 4), r"pp must be an int >= 1"),
    ],
)
def test_invalid_sizes_name_the_rule(make, args, rule):
    with pytest.raises(ValueError, match=rule):
        make(*args)


def test_op_validation():
    with pytest.raises(ValueError, match="Op.kind"):
        Op("X", 0, 0)
    with pytest.raises(ValueError, match="Op.pair"):
        Op("FB", 0, 0)
    with pytest.raises(ValueError, match="Op.zb"):
        Op("F", 0, 0, zb=True)
    f, b = Op("F", 1, 0), Op("B", 0, 1, direction=1)
    fb = Op("FB", pair=(f, b))
    assert fb.parts == (f, b) and f.parts == (f,)
    assert str(fb) == "F1@s0&B0'@s1"
    assert "rank 0:" in one_f_one_b(2, 2).table()
