"""Pipeline stages (dsv3lib.parallel.stages) and the runner's argument checks, in one process (chapter 5)."""

import pytest
import torch

from dsv3lib.config import ModelConfig
from dsv3lib.model import Transformer, mtp_loss
from dsv3lib.parallel.pipeline import PipelineRunner
from dsv3lib.parallel.schedules import make_schedule, placement
from dsv3lib.parallel.stages import build_stages, micro_batches, reference_step, stages_for_rank


def _tiny(n_layers=4, mtp=1):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", n_layers=n_layers, n_mtp_modules=mtp, max_seq_len=32))


@pytest.mark.parametrize("mtp", [0, 1])
def test_stages_compose_to_the_model(mtp):
    model = _tiny(mtp=mtp)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    stages = build_stages(model, 4)
    h = x
    for st in stages:
        h = st(h)
    with torch.no_grad():  # the last stage's loss is the whole model's, MTP term included, bit for bit
        assert torch.equal(stages[-1].loss(h, x, y), mtp_loss(model(x), y)[0])
    names = {n for st in stages for n, _ in st.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}  # same names
    assert (stages[-1].embed is model.embed) == bool(mtp)  # the MTP modules read the shared embedding


def test_stage_placement():
    model = _tiny()
    held = {r: sorted(stages_for_rank(model, "DualPipe", r, 4)) for r in range(4)}
    assert held[0] == [(0, 0), (3, 1)] and held[1] == [(1, 0), (2, 1)]  # stage r and PP-1-r: 2 copies
    held = {r: sorted(stages_for_rank(model, "DualPipeV", r, 2)) for r in range(2)}
    assert held[0] == [(0, 0), (3, 0)] and held[1] == [(1, 0), (2, 0)]  # V shape over 4 stages
    for name in ("1F1B", "ZB1P", "DualPipe", "DualPipeV"):  # placement is the schedules' own
        for n_micro in (8, 16):
            assert make_schedule(name, 4, n_micro).placement == placement(name, 4)


def test_invalid_setups_raise():
    with pytest.raises(ValueError, match="n_layers"):
        build_stages(_tiny(4), 3)
    with pytest.raises(ValueError, match="schedule"):
        stages_for_rank(_tiny(), "GPipe", 0, 2)
    with pytest.raises(ValueError, match="stages"):
        PipelineRunner(make_schedule("1F1B", 2, 4), stages_for_rank(_tiny(), "1F1B", 0, 2), 1)
    with pytest.raises(TypeError, match="schedule"):
        PipelineRunner("1F1B", {}, 0)
    with pytest.raises(ValueError, match="n_micro"):
        micro_batches(torch.zeros(8, 4), torch.zeros(8, 4), 3)


def test_reference_step_is_the_mean_of_micro_batch_losses():
    model = _tiny(mtp=0)
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 9), generator=torch.Generator().manual_seed(2))
    loss = reference_step(model, tokens[:, :-1], tokens[:, 1:], 2)
    whole = _tiny(mtp=0)
    full = torch.nn.functional.cross_entropy(whole(tokens[:, :-1]).logits.flatten(0, 1).float(),
                                             tokens[:, 1:].flatten())
    torch.testing.assert_close(loss, full.detach())  # equal-size micro-batches: same value up to rounding
