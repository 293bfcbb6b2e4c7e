"""Pipeline runtime (dsv3lib.parallel.pipeline): 1F1B, ZB1P, DualPipe and DualPipeV across 2 and 4 spawned
gloo processes give the sequential reference step's loss exactly and its gradients to 1e-6 (chapter 5).

One spawn per pipeline size (all schedules share the process group: ≈ 4 s start-up each)."""

import pytest
import torch

from dsv3lib.config import ModelConfig
from dsv3lib.model import Transformer
from dsv3lib.parallel.pipeline import PipelineRunner, bubble_fractions, op_durations, run_pipeline_check
from dsv3lib.parallel.schedules import SCHEDULES
from dsv3lib.parallel.stages import build_stages, micro_batches, reference_step, stages_for_rank

CASES = {
    # (schedule, micro-batches[, steps]): two steps check that gradients accumulate (DualPipe's copies too)
    2: [("1F1B", 4), ("ZB1P", 4), ("DualPipe", 4), ("DualPipeV", 4), ("DualPipe", 8), ("DualPipeV", 8),
        ("ZB1P", 4, 2), ("DualPipe", 4, 2)],
    4: [("1F1B", 8), ("ZB1P", 8), ("DualPipe", 8), ("DualPipeV", 8)],
}


@pytest.fixture(scope="module", params=sorted(CASES))
def results(request):
    world = request.param
    return world, run_pipeline_check(world, CASES[world])


def test_loss_exact_and_grads_close(results):
    world, res = results
    assert [(r["schedule"], r["num_chunks"], r["steps"]) for r in res] == [(*c, 1)[:3] for c in CASES[world]]
    for r in res:
        case = f"{r['schedule']} PP={world} chunks={r['num_chunks']}"
        assert r["loss_equal"], f"{case}: loss {r['loss']!r} != reference {r['ref_loss']!r}"
        assert r["grad_diff"] <= 1e-6, f"{case}: grads differ by {r['grad_diff']}"
        assert r["all_params"], f"{case}: some parameter is on no rank"


def test_timeline_is_the_schedule(results):
    """What ran is what the simulator times: each rank's measured events are its op list, in order."""
    world, res = results
    for r in res:
        sched = SCHEDULES[r["schedule"]](world, r["num_chunks"])
        for rank, events in enumerate(r["timeline"]):
            assert [op for _, _, op in events] == list(sched.ops[rank])
            starts = [s for s, _, _ in events]
            assert all(s <= e for s, e, _ in events) and starts == sorted(starts) and starts[0] >= 0


def _tiny(n_layers=4):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", n_layers=n_layers, n_mtp_modules=0, max_seq_len=32))


def test_stages_compose_to_the_model():
    model = _tiny()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    stages = build_stages(model, 4)
    h = x
    for st in stages:
        h = st(h)
    with torch.no_grad():
        assert torch.equal(stages[-1].loss(h, y), torch.nn.functional.cross_entropy(
            model(x, mtp=False).logits.flatten(0, 1).float(), y.flatten()))
    names = [n for st in stages for n, _ in st.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # same names, each once


def test_stage_placement():
    model = _tiny()
    held = {r: sorted(stages_for_rank(model, "DualPipe", r, 4)) for r in range(4)}
    assert held[0] == [(0, 0), (3, 1)] and held[1] == [(1, 0), (2, 1)]  # stage r and PP-1-r: 2 copies
    held = {r: sorted(stages_for_rank(model, "DualPipeV", r, 2)) for r in range(2)}
    assert held[0] == [(0, 0), (3, 0)] and held[1] == [(1, 0), (2, 0)]  # V shape over 4 stages


def test_invalid_setups_raise():
    with pytest.raises(ValueError, match="n_layers"):
        build_stages(_tiny(4), 3)
    with pytest.raises(ValueError, match="schedule_name"):
        stages_for_rank(_tiny(), "GPipe", 0, 2)
    with pytest.raises(ValueError, match="stages"):
        PipelineRunner("1F1B", stages_for_rank(_tiny(), "1F1B", 0, 2), 1, 2)
    with pytest.raises(ValueError, match="num_chunks"):
        micro_batches(torch.zeros(8, 4), torch.zeros(8, 4), 3)


def test_reference_step_is_the_mean_of_micro_batch_losses():
    model = _tiny()
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 9), generator=torch.Generator().manual_seed(2))
    loss = reference_step(model, tokens[:, :-1], tokens[:, 1:], 2)
    whole = _tiny()
    full = torch.nn.functional.cross_entropy(whole(tokens[:, :-1], mtp=False).logits.flatten(0, 1).float(),
                                             tokens[:, 1:].flatten())
    torch.testing.assert_close(loss, full.detach())  # equal-size micro-batches: same value up to rounding


def test_measured_timeline_helpers(results):
    """The measured timeline feeds the chapter: per-kind durations and per-rank bubble fractions."""
    world, res = results
    for r in res:
        kinds = {("Bi" if op.zb else op.kind) for ops in SCHEDULES[r["schedule"]](world, r["num_chunks"]).ops
                 for op in ops}
        durations = op_durations(r["timeline"])
        assert set(durations) == kinds and all(d >= 0 for ds in durations.values() for d in ds)
        assert all(0 <= b < 1 for b in bubble_fractions(r["timeline"]))
        for waits in r["waits"]:  # blocking waits, each for a message between stages
            assert all(s <= e and key[0] in "FB" for s, e, key in waits)
