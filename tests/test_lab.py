"""The lab (dsv3lib.lab, chapter 6) across 4 spawned gloo processes: exact first step, resume after a crash,
merge into the release's layout, identical greedy text on 1 and 2 processes, and bad inputs."""

import pytest
import torch
from safetensors.torch import load_file

import lab_workers as workers
from dsv3lib.fp8 import weight_dequant, weight_quant_ref
from dsv3lib.hf import load_hf
from dsv3lib.lab.serve import load_for_serving, serve
from dsv3lib.lab.train import LabConfig, mtp_lambda_at
from dsv3lib.model import Transformer
from dsv3lib.parallel.launch import JobFailed, launch

pytestmark = pytest.mark.slow
RUN = dict(pp=2, ep=2, steps=4, micro_rows=1, seq_len=32, val_every=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run; a run that checkpoints at step 2 and dies in step 4; its resumption."""
    out = tmp_path_factory.mktemp("lab") / "run"
    whole = launch(workers.train, 4, (RUN,))
    with pytest.raises(JobFailed, match="rank 1 failed during step 3: RuntimeError: injected failure"):
        launch(workers.train, 4, ({**RUN, "ckpt_every": 2, "out": str(out)}, 3))
    assert not (out / "hf").exists()  # the merge happens at the end only
    resumed = launch(workers.train, 4, ({**RUN, "ckpt_every": 2, "out": str(out), "resume": True},))
    return whole, resumed, out


def test_first_step_equals_one_process():
    cases = [dict(pp=2, ep=2, schedule=s, fp8=fp8, bitwise=True, micro_rows=1, seq_len=32)
             for s, fp8 in [("DualPipe", False), ("ZB1P", False), ("DualPipe", True)]]
    for case, r in zip(cases, launch(workers.first_step, 4, (cases,))):
        assert r["loss"] == r["ref_loss"], case  # torch.equal on the fp32 values


def test_resume_after_a_crash_continues_exactly(runs):
    whole, resumed, _ = runs
    assert resumed["loss"] == whole["loss"] and len(whole["loss"]) == 4
    assert resumed["max_vio"] == whole["max_vio"]  # the gate biases resumed too
    assert whole["loss"][-1] < whole["loss"][0]


def test_merge_is_what_load_hf_reads(runs):
    """The shards' union is the one-process model; the merged directory holds it (FP8 projections as e4m3 with
    128×128 block scales), and load_hf gives back exactly those weights and their logits."""
    _, _, out = runs
    merged = {}
    for r in range(4):
        merged.update(load_file(out / "shards" / f"rank{r}.safetensors"))
    cfg = LabConfig(**RUN).model_config()
    model = Transformer(cfg)
    model.load_state_dict(merged)
    loaded = load_hf(out / "hf")
    quantised = 0
    for name, t in model.state_dict().items():
        got = loaded.state_dict()[name]
        if not torch.equal(got, t):
            assert torch.equal(got, weight_dequant(*weight_quant_ref(t, 128), 128)), name
            quantised += 1
    assert quantised > 0
    with torch.no_grad():
        for name, q in model.named_parameters():  # the trained model as the release stores it
            q.copy_(loaded.state_dict()[name])
        tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_greedy_text_is_the_same_on_1_and_2_processes_with_and_without_mtp(runs):
    _, _, out = runs
    one = serve(load_for_serving(out), "def main(", 12).tokens
    assert serve(load_for_serving(out), "def main(", 12, mtp=False).tokens == one
    for mtp in (True, False):
        assert launch(workers.serve_tokens, 2, (str(out), "def main(", 12, mtp)) == one


def test_sampled_text_is_the_same_on_1_and_2_processes(runs):
    _, _, out = runs
    knobs = dict(temperature=0.9, top_p=0.95, seed=3)
    one = serve(load_for_serving(out), "def main(", 12, **knobs)
    assert one.tokens != serve(load_for_serving(out), "def main(", 12).tokens  # it does sample
    assert serve(load_for_serving(out), "def main(", 12, **knobs).tokens == one.tokens  # the seed fixes it
    assert launch(workers.serve_tokens, 2, (str(out), "def main(", 12, True, knobs)) == one.tokens
    with pytest.raises(ValueError, match="temperature"):
        serve(load_for_serving(out), "def main(", 4, temperature=-1.0)


def test_bad_inputs_get_one_line(runs, tmp_path):
    _, _, out = runs
    with pytest.raises(JobFailed, match=r"layout: pp × ep × dp = 2 × 1 × 1 = 2, but the world has 4 processes"):
        launch(workers.train, 4, ({**RUN, "ep": 1},))
    with pytest.raises(JobFailed, match=r"--resume: the checkpoint's config.n_layers is 4, this run's is 8"):
        launch(workers.train, 4, ({**RUN, "pp": 4, "ep": 1, "out": str(out), "resume": True},))
    with pytest.raises(FileNotFoundError, match="--ckpt: .* does not exist"):
        load_for_serving(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="text contains NUL"):
        serve(load_for_serving(out), "a\0b", 4)
    with pytest.raises(ValueError, match="--resume: needs --out"):
        LabConfig(resume=True)


def test_mtp_lambda_schedule():
    assert [mtp_lambda_at(s, 10) for s in range(10)] == [0.3] * 7 + [0.1] * 3  # 10/14.8 of the run at 0.3
