"""Pipeline × expert parallelism (dsv3lib.parallel.hybrid): 2 pipeline ranks × 2 EP ranks (4 spawned gloo
processes) give the one-process step's losses and gradients; with overlap on, each FB pair's all-to-alls
run while the other half computes (chapter 5)."""

import pytest

from dsv3lib.parallel.hybrid import comm_overlap, run_hybrid_check
from dsv3lib.parallel.schedules import Op

CASES = [("DualPipe", 4, False), ("DualPipe", 4, True), ("DualPipeV", 4, True), ("ZB1P", 4, False)]


@pytest.fixture(scope="module")
def results():
    return run_hybrid_check(2, 2, CASES)


def test_matches_one_process(results):
    assert [(r["schedule"], r["num_chunks"], r["overlap"]) for r in results] == CASES
    for r in results:
        case = f"{r['schedule']} overlap={r['overlap']}"
        assert r["all_params"], f"{case}: some parameter is on no rank"
        assert r["grad_diff"] <= 1e-6, f"{case}: grads differ by {r['grad_diff']}"
        # experts see other ranks' tokens in bigger batches: float rounding, not equality
        assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-5), case


def test_overlap_only_when_asked(results):
    for r in results:
        hidden = [o["under_other_half"] for o in r["comm_overlap"]]
        assert all(o["comm"] > 0 for o in r["comm_overlap"])  # every rank exchanged tokens
        if r["overlap"]:  # some all-to-all time ran under the other half of a pair
            assert sum(hidden) > 0, r["schedule"]
        else:  # halves run one after the other: nothing can overlap
            assert hidden == [0.0] * 4, r["schedule"]


def test_comm_overlap_arithmetic():
    f, b = Op("F", 0, 0, 0), Op("B", 1, 0, 1)
    parts = [(0.0, 4.0, f), (1.0, 3.0, b)]
    comm = [(0.5, 1.5, "dispatch"), (2.5, 3.5, "combine grad"), (5.0, 6.0, "dispatch")]
    assert comm_overlap(parts, comm) == {"comm": 3.0, "under_other_half": 0.5 + 1.0}
