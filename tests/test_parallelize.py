"""parallelize (dsv3lib.parallel.parallelize) across 4 spawned gloo processes against one process (chapter 5).

One launch runs every case: pipeline × expert parallelism (PP 2 × EP 2) under each schedule, pipeline only
(PP 4), data parallelism (PP 2 × DP 2), FP8 stages with deferred weight gradients, and the overlapped
DualPipe pair. With ``bitwise`` expert GEMMs (per source rank) the loss is ``torch.equal`` to
:func:`reference_step` on the whole batch; gradients agree to 1e-6 (micro-batches' contributions are summed
in another order). With batched expert GEMMs (production) a GEMM's rounding depends on how many rows it
gets, so the loss agrees to 1e-5, not bit for bit.
"""

import pytest

from dsv3lib.parallel.checks import step_vs_one_process
from dsv3lib.parallel.launch import JobFailed, launch
from dsv3lib.parallel.overlap import comm_overlap
from dsv3lib.parallel.pipeline import bubble_fractions, op_durations
from dsv3lib.parallel.schedules import SCHEDULES, Op

EXACT = (
    [dict(pp=2, ep=2, schedule=s, n_micro=4) for s in SCHEDULES]
    + [dict(pp=4, schedule=s, n_micro=8) for s in SCHEDULES]
    + [dict(pp=4, schedule="DualPipe", n_micro=8, steps=2), dict(pp=2, ep=2, schedule="ZB1P", n_micro=4, steps=2)]
    + [dict(pp=2, dp=2, schedule="DualPipe", n_micro=4), dict(pp=2, dp=2, schedule="1F1B", n_micro=2)]
    + [dict(pp=2, ep=2, schedule="ZB1P", n_micro=4, fp8=True), dict(pp=2, ep=2, schedule="DualPipe", n_micro=4, fp8=True)]
)
BATCHED = [dict(pp=2, ep=2, schedule="DualPipe", n_micro=4, bitwise=False, overlap=False),
           dict(pp=2, ep=2, schedule="DualPipe", n_micro=4, bitwise=False, overlap=True),
           dict(pp=2, ep=2, schedule="DualPipeV", n_micro=4, bitwise=False, overlap=True)]


def _name(r):
    return f"{r['schedule']} pp={r['pp']} ep={r['ep']} dp={r['dp']} fp8={r.get('fp8', False)} steps={r['steps']}"


@pytest.fixture(scope="module")
def results():
    return launch(step_vs_one_process, 4, (EXACT + BATCHED,))


@pytest.mark.slow
def test_equal_to_one_process(results):
    exact = results[:len(EXACT)]
    assert [(r["schedule"], r["pp"], r["ep"], r["dp"]) for r in exact] == [
        (c["schedule"], c["pp"], c.get("ep", 1), c.get("dp", 1)) for c in EXACT]
    for r in exact:
        assert r["loss_equal"], f"{_name(r)}: loss {r['losses']} != one process {r['ref_losses']}"
        assert r["grad_diff"] <= 1e-6, f"{_name(r)}: grads differ by {r['grad_diff']:.2e}"
        assert r["all_params"], f"{_name(r)}: some parameter is on no rank"


@pytest.mark.slow
def test_batched_experts_close_and_overlap_only_when_asked(results):
    for r in results[len(EXACT):]:
        assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-5), _name(r)
        assert r["grad_diff"] <= 1e-6 and r["all_params"], _name(r)
        hidden = [o["under_other_half"] for o in r["comm_overlap"]]
        assert all(o["comm"] > 0 for o in r["comm_overlap"])  # every rank exchanged tokens
        if r["overlap"]:  # some all-to-all time ran under the other half of a pair
            assert sum(hidden) > 0, _name(r)
        else:  # halves run one after the other: nothing can overlap
            assert hidden == [0.0] * 4, _name(r)


@pytest.mark.slow
def test_fp8_weight_gradients_wait_for_w(results):
    """Every W of an FP8 run flushes at least the FP8 GEMMs every micro-batch uses (attention, dense and shared
    experts, MTP projection): before the store knew FP8Linear, they ran during B and W flushed only the
    routers' and head's."""
    for r in results:
        if r.get("fp8") and r["deferred"]:
            for (mb, stage, d), n in r["deferred"].items():
                assert n >= r["fp8_always_used"][(stage, d)] > 0, (_name(r), mb, stage, n)


@pytest.mark.slow
def test_measured_timeline_helpers(results):
    """The measured timeline feeds the chapter: per-kind durations, per-rank bubble fractions, and waits."""
    for r in results:
        kinds = {("Bi" if op.zb else op.kind) for ops in SCHEDULES[r["schedule"]](r["pp"], r["n_micro"]).ops
                 for op in ops}
        durations = op_durations(r["timeline"])
        assert set(durations) == kinds and all(d >= 0 for ds in durations.values() for d in ds)
        assert all(0 <= b < 1 for b in bubble_fractions(r["timeline"]))
        for waits in r["waits"]:  # blocking waits, each for a message between stages
            assert all(s <= e and key[0] in "FB" for s, e, key in waits)


def test_comm_overlap_arithmetic():
    f, b = Op("F", 0, 0, 0), Op("B", 1, 0, 1)
    parts = [(0.0, 4.0, f), (1.0, 3.0, b)]
    comm = [(0.5, 1.5, "dispatch"), (2.5, 3.5, "combine grad"), (5.0, 6.0, "dispatch")]
    assert comm_overlap(parts, comm) == {"comm": 3.0, "under_other_half": 0.5 + 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("how, message", [("raise", r"^rank 3 failed during step 2: ValueError: boom in a MoE forward$"),
                                          ("kill", r"^rank 3 was killed by SIGKILL during step 2$")])
def test_a_failing_rank_ends_the_parallel_job(how, message):
    """Mid-step, inside a MoE layer of the pipelined, expert-parallel model: every rank ends, fast, and the
    message names the failed rank and its step."""
    import time

    import launch_workers

    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=message) as info:
        launch(launch_workers.fail_in_parallel_step, 4, (3, 2, how))
    assert time.monotonic() - t0 < 60
    assert all(code != 0 for code in info.value.exitcodes)


@pytest.mark.slow
def test_torchrun_entry_point_trains():
    """The README's command: 4 processes under torchrun, PP 2 × EP 2 with DualPipe, a few AdamW steps."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "dsv3lib.parallel", "--pp", "2", "--ep", "2", "--schedule", "DualPipe", "--steps", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in run.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0], run.stdout
