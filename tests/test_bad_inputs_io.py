"""Bad inputs to checkpoints, the Hugging Face layout and the training command lines (issue 18): each fails
with one line that names the file, tensor or flag; a crashed save is recovered by the next load or save; a
diverging run stops with its last good checkpoint kept; Ctrl-C saves one."""

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_checkpoint import leftovers, make

from dsv3lib import checkpoint as ck
from dsv3lib import hf
from dsv3lib import train as tr
from dsv3lib.config import ModelConfig
from dsv3lib.hf import load_hf, save_hf
from dsv3lib.lab.__main__ import main as lab_main
from dsv3lib.lab.train import LabConfig
from dsv3lib.model import Transformer


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One directory of each layout, copied by each case before it damages it."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = make()
    ck.save(model, root / "ours")
    ck.save_training_state(root / "state", model, torch.optim.AdamW(model.parameters()), step=1)
    save_hf(model, root / "hf")
    save_hf(model, root / "hf_fp8", fp8=True)
    save_hf(model, root / "hf_shards", shard_bytes=20_000)
    return root


def copy(saved: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(saved / name, tmp_path / name))


def rewrite(path: Path, edit) -> None:
    with safe_open(path, "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors)
    save_file(tensors, path)


def truncate(path: Path, keep=0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10] = ord("}")
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------- our checkpoints
W, C = "model.safetensors", "config.json"
OURS = [  # (id, damage to the directory d, error type, words the one line must hold)
    ("truncated", lambda d: truncate(d / W), ValueError, [W, "not a readable safetensors file"]),
    ("empty file", lambda d: (d / W).write_bytes(b""), ValueError, [W, "header too small"]),
    ("garbage", lambda d: (d / W).write_bytes(b"\xff" * 999), ValueError, [W, "not a readable"]),
    ("corrupt header", lambda d: flip_header(d / W), ValueError, [W, "invalid JSON in header"]),
    ("bad JSON", lambda d: (d / C).write_text("{bad"), ValueError, [C, "JSONDecodeError"]),
    ("not UTF-8", lambda d: (d / C).write_bytes(b"\xff\xfe{}"), ValueError, [C, "UnicodeDecodeError"]),
    ("JSON list", lambda d: (d / C).write_text("[1, 2]"), ValueError, [C, "expected a JSON object"]),
    ("model null", lambda d: edit_json(d / C, lambda c: c.update(model=None)), ValueError, [C, "'model'"]),
    ("unknown field", lambda d: edit_json(d / C, lambda c: c["model"].update(bogus=1)), ValueError,
     [C, "model.bogus: not a ModelConfig field"]),
    ("field type", lambda d: edit_json(d / C, lambda c: c["model"].update(dim="32")), ValueError, [C, "model.dim"]),
    ("no model entry", lambda d: edit_json(d / C, lambda c: c.pop("model")), ValueError, [C, "use load_hf"]),
    ("int weight", lambda d: rewrite(d / W, lambda t: t.update(
        {"layers.0.attn.wo.weight": t["layers.0.attn.wo.weight"].to(torch.int32)})), ValueError,
     ["layers.0.attn.wo.weight: stored as I32"]),
    ("NaN weight", lambda d: rewrite(d / W, lambda t: t["layers.0.attn.wo.weight"].__setitem__((0, 0), math.nan)),
     ValueError, ["layers.0.attn.wo.weight: contains NaN or inf", W]),
    ("bool bias", lambda d: rewrite(d / W, lambda t: t.update(
        {"layers.1.ffn.gate.bias": t["layers.1.ffn.gate.bias"] > 0})), ValueError,
     ["layers.1.ffn.gate.bias: stored as BOOL"]),
    ("no config", lambda d: (d / C).unlink(), FileNotFoundError, [C, "not found"]),
    ("no weights", lambda d: (d / W).unlink(), FileNotFoundError, [W, "not found"]),
    ("no directory", lambda d: shutil.rmtree(d), FileNotFoundError, ["no such checkpoint directory"]),
    ("only an unfinished save", lambda d: d.rename(d.parent / f".tmp-{d.name}-abcd1234"), FileNotFoundError,
     [".tmp-ours-abcd1234: a save that never finished"]),
    ("a file", lambda d: shutil.rmtree(d) or d.write_text("x"), NotADirectoryError, ["is a file"]),
]


@pytest.mark.parametrize("damage, error, words", [c[1:] for c in OURS], ids=[c[0] for c in OURS])
@pytest.mark.parametrize("loader", ["load", "load_weights_into"])
def test_damaged_checkpoint_fails_in_one_line(saved, tmp_path, damage, error, words, loader):
    d = copy(saved, tmp_path, "ours")
    damage(d)
    with pytest.raises(error) as err:
        ck.load(d) if loader == "load" else ck.load_weights_into(make(), d)
    one_line(err, *words)


def poisoned(value, seed=0):
    model = make(seed)
    with torch.no_grad():
        model.layers[0].attn.wo.weight[0, 0] = value
    return model


@pytest.mark.parametrize("call, error, words", [
    (lambda d: ck.load(d, dtype="bf16"), TypeError, ["dtype:", "'bf16'"]),
    (lambda d: ck.load(d, dtype=torch.float8_e4m3fn), TypeError, ["dtype:"]),
    (lambda d: ck.load(d, device="gpu"), ValueError, ["device: 'gpu'"]),
    (lambda d: ck.load(d, device="meta"), ValueError, ["device: 'meta' holds no data"]),
    (lambda d: ck.load(None), TypeError, ["directory: expected a path, got NoneType"]),
    (lambda d: ck.load(""), ValueError, ["'': names no directory"]),
    (lambda d: ck.save(make(), d, extra={"t": torch.zeros(1)}), TypeError, ["extra: not JSON-serialisable"]),
    (lambda d: ck.save(make(), d, extra=[1]), TypeError, ["extra: expected a dict"]),
    (lambda d: ck.save(make(), d, extra={"model": 1}), ValueError, ["extra: the key 'model' is reserved"]),
    (lambda d: ck.save(None, d), TypeError, ["model: expected a dsv3lib Transformer"]),
    (lambda d: ck.save(poisoned(math.inf), d), ValueError, ["layers.0.attn.wo.weight: contains NaN or inf"]),
    (lambda d: ck.save(make(), "."), ValueError, ["'.': names no directory"]),
    (lambda d: ck.save(make(), d / C), NotADirectoryError, [C, "not a directory"]),
    (lambda d: ck.save_training_state(d, make(), torch.optim.SGD(make().parameters(), lr=1), step=-1),
     ValueError, ["step: expected an integer >= 0, got -1"]),
], ids=["dtype str", "dtype fp8", "device", "meta", "None", "empty path", "extra tensor", "extra list", "extra model",
        "model None", "inf weight", "save to .", "save onto a file", "negative step"])
def test_bad_arguments_fail_in_one_line(saved, tmp_path, call, error, words):
    d = copy(saved, tmp_path, "ours")
    with pytest.raises(error) as err:
        call(d)
    one_line(err, *words)
    assert ck.load(d).cfg == make().cfg  # a refused save leaves the checkpoint as it was


def test_cpu_with_an_index_is_the_cpu(saved):
    assert ck.load(saved / "ours", device="cpu:0").embed.weight.device == torch.device("cpu")


def test_a_stored_gate_bias_of_another_dtype_loads_as_float32(saved, tmp_path):
    d, h = copy(saved, tmp_path, "ours"), copy(saved, tmp_path, "hf")
    rewrite(d / W, lambda t: t.update({"layers.1.ffn.gate.bias": t["layers.1.ffn.gate.bias"].half()}))
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    rewrite(h / W, lambda t: t.update({key: t[key].half()}))
    for model in (ck.load(d), ck.load(d, dtype=torch.bfloat16), load_hf(h), load_hf(h, dtype=torch.bfloat16)):
        assert model.layers[1].ffn.gate.bias.dtype == torch.float32


TS = "training_state.pt"


def other_optimizer(model):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


@pytest.mark.parametrize("damage, optimizer, scheduler, words", [
    (lambda d: truncate(d / TS), None, False, [TS, "not a readable training state"]),
    (lambda d: (d / TS).write_bytes(b"junk"), None, False, [TS, "not a readable training state"]),
    (lambda d: (d / TS).write_bytes(b""), None, False, [TS, "not a readable training state"]),
    (lambda d: torch.save({"x": 1}, d / TS), None, False, [TS, "not a training state (no 'optimizer' entry)"]),
    (lambda d: torch.save([1, 2], d / TS), None, False, [TS, "not a training state"]),
    (lambda d: None, other_optimizer, False, [TS, "state for this optimizer"]),
    (lambda d: None, None, True, [TS, "holds no scheduler state"]),
], ids=["truncated", "junk", "empty", "other dict", "a list", "other optimizer", "no scheduler"])
def test_damaged_training_state_fails_in_one_line(saved, tmp_path, damage, optimizer, scheduler, words):
    d = copy(saved, tmp_path, "state")
    damage(d)
    model = make()
    opt = (optimizer or (lambda m: torch.optim.AdamW(m.parameters())))(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0) if scheduler else None
    with pytest.raises(ValueError) as err:
        ck.load_training_state(d, model, opt, sched)
    one_line(err, *words)


# -------------------------------------------------------------------------------------- atomic saves
class Crash(BaseException):
    """A process dying: nothing after it runs (shutil.rmtree is disabled too)."""


def crash_at_rename(monkeypatch, n: int):
    """Renames up to the n-th go through; the n-th and later ones 'crash'."""
    real, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) >= n:
            raise Crash(f"killed at rename {len(calls)}")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **k: None)


@pytest.mark.parametrize("renames_done, expect_seed", [(0, 0), (1, 0), (2, 1)])
def test_a_crash_between_the_renames_is_recovered_by_the_next_load(tmp_path, monkeypatch, renames_done, expect_seed):
    """Renames: tmp → .new (complete), target → .old, .new → target. Killed after 0, 1 or 2 of them, the
    next load finds a whole checkpoint: the old one, or the new one once it was complete and the old moved."""
    target = tmp_path / "c"
    ck.save(make(seed=0), target, extra={"step": 1})
    crash_at_rename(monkeypatch, renames_done + 1)
    with pytest.raises(Crash):
        ck.save(make(seed=1), target, extra={"step": 2})
    monkeypatch.undo()
    if renames_done == 2:
        assert not target.exists()  # no checkpoint at the target: the case the recovery is for
    loaded = ck.load(target)
    assert torch.equal(loaded.embed.weight, make(seed=expect_seed).embed.weight)
    assert json.loads((target / C).read_text())["step"] == 1 + expect_seed
    ck.save(make(seed=2), target)  # the next save removes what the crash left
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["c"]


def test_the_next_save_recovers_before_it_cleans(tmp_path, monkeypatch):
    target = tmp_path / "c"
    ck.save(make(seed=0), target)
    crash_at_rename(monkeypatch, 3)
    with pytest.raises(Crash):
        ck.save(make(seed=1), target, extra={"step": 2})
    monkeypatch.undo()

    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ck, "save_file", boom)  # this save fails: the recovered checkpoint must stay
    with pytest.raises(OSError, match="injected"):
        ck.save(make(seed=2), target)
    monkeypatch.undo()
    assert json.loads((target / C).read_text())["step"] == 2 and leftovers(tmp_path) == []


def test_only_an_old_copy_is_restored_by_load_hf_and_training_state(tmp_path):
    model = make()
    ck.save_training_state(tmp_path / "run", model, torch.optim.AdamW(model.parameters()), step=3)
    save_hf(model, tmp_path / "h")
    os.rename(tmp_path / "run", tmp_path / ".old-run-00000000000000000001")
    os.rename(tmp_path / "h", tmp_path / ".old-h-00000000000000000001")
    assert ck.load_training_state(tmp_path / "run", make(seed=4))["step"] == 3
    assert torch.equal(load_hf(tmp_path / "h").embed.weight, model.embed.weight)
    assert leftovers(tmp_path) == []


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    ck.save(make(), tmp_path / "c")
    for name in [".tmp-c-k1ll3d00", ".new-c-00000000000000000005", ".old-c-00000000000000000004",
                 ".tmp-c-1-0ther000"]:  # the last is a save of c-1 in progress: not ours to remove
        (tmp_path / name).mkdir()
        (tmp_path / name / "half.bin").write_bytes(b"x")
    ck.save(make(seed=1), tmp_path / "c")
    assert leftovers(tmp_path) == [".tmp-c-1-0ther000"]


# ---------------------------------------------------------------------------- Hugging Face directories
def block_size(value):
    return lambda d: edit_json(d / C, lambda c: c["quantization_config"].update(weight_block_size=value))


def hf_int_weight(d):
    key = "model.layers.0.self_attn.o_proj.weight"
    rewrite(d / W, lambda t: t.update({key: t[key].to(torch.int32)}))


SCALE = "model.layers.0.self_attn.o_proj.weight_scale_inv"
HF = [  # (id, directory, damage, error, words)
    ("bad JSON", "hf", lambda d: (d / C).write_text("{bad"), ValueError, [C, "JSONDecodeError"]),
    ("not UTF-8", "hf", lambda d: (d / C).write_bytes(b"\xff\xfe{}"), ValueError, [C, "UnicodeDecodeError"]),
    ("JSON list", "hf", lambda d: (d / C).write_text("[]"), ValueError, [C, "expected a JSON object"]),
    ("no model keys", "hf", lambda d: (d / C).write_text("{}"), ValueError, [C, "none of DeepSeek-V3's config keys"]),
    ("truncated", "hf", lambda d: truncate(d / W), ValueError, [W, "not a readable safetensors file"]),
    ("corrupt header", "hf", lambda d: flip_header(d / W), ValueError, [W, "not a readable safetensors file"]),
    ("truncated shard", "hf_shards", lambda d: truncate(sorted(d.glob("model-*-of-*.safetensors"))[1]), ValueError,
     ["model-00002-of-", ".safetensors: not a readable safetensors file"]),
    ("bad index", "hf_shards", lambda d: (d / hf.HF_INDEX).write_text("{"), ValueError,
     [hf.HF_INDEX, "JSONDecodeError"]),
    ("index without map", "hf_shards", lambda d: (d / hf.HF_INDEX).write_text("{}"), ValueError,
     [hf.HF_INDEX, "'weight_map'"]),
    ("block [0, 128]", "hf_fp8", block_size([0, 128]), ValueError,
     ["quantization_config.weight_block_size: [0, 128]", C]),
    ("block [0, 0]", "hf_fp8", block_size([0, 0]), ValueError, ["weight_block_size: [0, 0]", C]),
    ("block 128", "hf_fp8", block_size(128), ValueError, ["weight_block_size: 128;", C]),
    ("block [128]", "hf_fp8", block_size([128]), ValueError, ["weight_block_size: [128];", C]),
    ("block strings", "hf_fp8", block_size(["a", "a"]), ValueError, ["weight_block_size: [\"a\", \"a\"]", C]),
    ("block negative", "hf_fp8", block_size([-1, -1]), ValueError, ["weight_block_size: [-1, -1]", C]),
    ("block booleans", "hf_fp8", block_size([True, True]), ValueError, ["weight_block_size: [true, true]", C]),
    ("quantization_config", "hf_fp8", lambda d: edit_json(d / C, lambda c: c.update(quantization_config=[1])),
     ValueError, ["quantization_config: expected an object", C]),
    ("NaN weight", "hf", lambda d: rewrite(d / W, lambda t: t["model.layers.0.self_attn.o_proj.weight"].__setitem__(
        (0, 0), math.nan)), ValueError, ["model.layers.0.self_attn.o_proj.weight (ours: layers.0.attn.wo.weight): "
                                         "contains NaN or inf", W]),
    ("zero scale", "hf_fp8", lambda d: rewrite(d / W, lambda t: t[SCALE].zero_()), ValueError,
     [f"{SCALE} (in ", "scales must be positive and finite"]),
    ("negative scale", "hf_fp8", lambda d: rewrite(d / W, lambda t: t[SCALE].neg_()), ValueError,
     [f"{SCALE} (in ", "scales must be positive and finite"]),
    ("int weight", "hf", hf_int_weight, ValueError,
     ["model.layers.0.self_attn.o_proj.weight (ours: layers.0.attn.wo.weight): stored as I32"]),
    ("our checkpoint", "ours", lambda d: None, ValueError, ["a dsv3lib checkpoint", "dsv3lib.checkpoint.load"]),
    ("our tensor names", "ours", lambda d: (d / C).write_text(json.dumps(make().cfg.to_hf_config())), ValueError,
     ["tensor names of dsv3lib.checkpoint.save"]),
    ("a lab run", "hf", lambda d: shutil.copytree(d, d / "hf") and (d / C).unlink(), FileNotFoundError,
     ["a lab run directory", "/hf"]),
    ("no directory", "hf", lambda d: shutil.rmtree(d), FileNotFoundError, ["no such checkpoint directory"]),
]


@pytest.mark.parametrize("name, damage, error, words", [c[1:] for c in HF], ids=[c[0] for c in HF])
def test_damaged_hf_directory_fails_in_one_line(saved, tmp_path, name, damage, error, words):
    d = copy(saved, tmp_path, name)
    damage(d)
    with pytest.raises(error) as err:
        load_hf(d)
    one_line(err, *words)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(n_layers=0), ValueError, ["n_layers: must be an integer in [1, 3]", "got 0"]),
    (dict(n_layers=9), ValueError, ["n_layers: must be an integer in [1, 3]", "got 9"]),
    (dict(n_layers=1.5), ValueError, ["n_layers:"]),
    (dict(dtype="bf16"), TypeError, ["dtype:"]),
    (dict(device="gpu"), ValueError, ["device: 'gpu'"]),
])
def test_bad_load_hf_arguments_fail_in_one_line(saved, kwargs, error, words):
    with pytest.raises(error) as err:
        load_hf(saved / "hf", **kwargs)
    one_line(err, *words)


def test_load_hf_refuses_what_memory_cannot_hold(saved, monkeypatch):
    monkeypatch.setattr(hf, "_available_memory", lambda device: (1000, "test limit"))
    with pytest.raises(MemoryError) as err:
        load_hf(saved / "hf")
    one_line(err, str(saved / "hf"), "GiB", "test limit", "n_layers=")


@pytest.mark.parametrize("kwargs, poison, error, words", [
    (dict(fp8=True, block=0), None, ValueError, ["block: the FP8 block edge must be an integer >= 1, got 0"]),
    (dict(fp8=True, block=-1), None, ValueError, ["block:", "got -1"]),
    (dict(fp8=True, block=1.5), None, ValueError, ["block:", "got 1.5"]),
    (dict(fp8=True, block=True), None, ValueError, ["block:", "got True"]),
    (dict(shard_bytes="1GB"), None, ValueError, ["shard_bytes:", "'1GB'"]),
    (dict(shard_bytes=0), None, ValueError, ["shard_bytes:", "got 0"]),
    (dict(fp8=True), math.nan, ValueError, ["model.layers.0.self_attn.o_proj.weight: contains NaN or inf"]),
    (dict(fp8=True), math.inf, ValueError, ["model.layers.0.self_attn.o_proj.weight: contains NaN or inf"]),
    (dict(), -math.inf, ValueError, ["model.layers.0.self_attn.o_proj.weight: contains NaN or inf"]),
], ids=["block 0", "block -1", "block 1.5", "block True", "shard str", "shard 0", "fp8 NaN", "fp8 inf", "bf16 inf"])
def test_bad_save_hf_arguments_fail_in_one_line(tmp_path, kwargs, poison, error, words):
    model = make() if poison is None else poisoned(poison)
    with pytest.raises(error) as err:
        save_hf(model, tmp_path / "h", **kwargs)
    one_line(err, *words)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- the training loop
FAST = dict(batch_size=2, seq_len=16, eval_every=2, eval_batches=1, warmup_steps=1)


def small_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny", n_layers=2, max_seq_len=32))


def test_a_diverging_run_stops_before_the_bad_update_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    model = small_model()
    with pytest.raises(FloatingPointError) as err:  # lr 1e30: step 1's update blows the weights up
        tr.train(model, tr.TrainConfig(steps=4, lr=1e30, checkpoint_every=1, **FAST), out=out, progress=False)
    one_line(err, "step 2:", "stopped before its update", f"the checkpoint in {out} holds step 1")
    assert json.loads((out / C).read_text())["step"] == 1
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())  # step 2's update never ran


def interrupt_at_forward(monkeypatch, call: int):
    real, calls = tr._loss, []

    def loss(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(tr, "_loss", loss)


def test_an_interrupt_saves_the_last_whole_step_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    tcfg = tr.TrainConfig(steps=4, checkpoint_every=0, **FAST)
    straight = tr.train(small_model(), tcfg, progress=False)
    interrupt_at_forward(monkeypatch, 3)  # Ctrl-C in step 3's forward: steps 1 and 2 are whole
    with pytest.raises(KeyboardInterrupt) as err:
        tr.train(small_model(), tcfg, out=tmp_path / "run", progress=False)
    one_line(err, "interrupted after step 2", "holds step 2")
    monkeypatch.undo()
    assert json.loads((tmp_path / "run" / C).read_text())["step"] == 2
    resumed = tr.train(small_model(seed=5), tcfg, out=tmp_path / "run", resume=True, progress=False)
    assert resumed.loss == straight.loss and resumed.val_loss == straight.val_loss


def test_ctrl_c_takes_effect_at_the_end_of_the_step(tmp_path):
    def ctrl_c(info):
        if info.step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step, after the update

    with pytest.raises(KeyboardInterrupt) as err:
        tr.train(small_model(), tr.TrainConfig(steps=4, **FAST), out=tmp_path / "run", callbacks=[ctrl_c],
                 progress=False)
    one_line(err, "interrupted after step 2")
    assert json.loads((tmp_path / "run" / C).read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_inside_an_update_saves_nothing_half_done(tmp_path):
    def stop(info):
        if info.step == 3:
            raise KeyboardInterrupt  # as a second Ctrl-C would: after step 3's update, before its bookkeeping

    with pytest.raises(KeyboardInterrupt) as err:
        tr.train(small_model(), tr.TrainConfig(steps=4, checkpoint_every=2, **FAST), out=tmp_path / "run",
                 callbacks=[stop], progress=False)
    one_line(err, "during step 3's update", "holds step 2")
    assert json.loads((tmp_path / "run" / C).read_text())["step"] == 2


def test_resume_names_the_train_config_field_that_differs(tmp_path):
    tr.train(small_model(), tr.TrainConfig(steps=2, **FAST), out=tmp_path / "run", progress=False)
    with pytest.raises(ValueError) as err:
        tr.train(small_model(), tr.TrainConfig(steps=2, **{**FAST, "seq_len": 8}), out=tmp_path / "run",
                 resume=True, progress=False)
    one_line(err, "resume: seq_len = 16", "8 now")


@pytest.mark.parametrize("kwargs, words", [
    (dict(train_tokens=torch.zeros(0, dtype=torch.long)), "train_tokens: 0 tokens, fewer than one window"),
    (dict(val_tokens=torch.arange(10)), "val_tokens: 10 tokens"),
    (dict(train_tokens=torch.arange(400).view(20, 20)), "train_tokens: expected a 1-D tensor of token ids"),
    (dict(train_tokens=torch.arange(400.0)), "train_tokens: expected a 1-D tensor of token ids, got (400,) "
                                             "torch.float32"),
    (dict(val_tokens=list(range(400))), "val_tokens: expected a 1-D tensor of token ids, got list"),
])
def test_bad_token_streams_fail_in_one_line(kwargs, words):
    tokens = dict(train_tokens=torch.arange(400) % 200, val_tokens=torch.arange(400) % 200)
    with pytest.raises(ValueError) as err:
        tr.train(small_model(), tr.TrainConfig(steps=1, **FAST), progress=False, **{**tokens, **kwargs})
    one_line(err, words)


@pytest.mark.parametrize("field, value, words", [
    ("lr", math.inf, "lr: must be finite"), ("lr", math.nan, "lr: must be finite"),
    ("mtp_lambda", math.nan, "mtp_lambda: must be finite"),
    ("bias_update_speed", math.nan, "bias_update_speed: must be finite"),
    ("aux_loss_alpha", -math.inf, "aux_loss_alpha: must be finite"),
    ("steps", 2.5, "steps: expected int"), ("steps", True, "steps: expected int"),
    ("beta2", 1.0, "beta2: must be in [0, 1)"), ("grad_clip", "1", "grad_clip: expected float"),
])
def test_bad_train_config_fails_in_one_line(field, value, words):
    with pytest.raises(ValueError) as err:
        tr.TrainConfig(**{field: value})
    one_line(err, words)


# ------------------------------------------------------------------------------------ command lines
def cli_error(capsys, main, argv, code):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == code
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line or "interrupted" in line]
    assert len(errors) == 1, errors
    return errors[0]


def ok_out(tmp_path):
    return ["--out", str(tmp_path / "run")]


TRAIN_ARGS = [  # (argv without --out unless given, words of the error line)
    (["--lr", "inf"], "--lr: must be finite, got inf"),
    (["--lr", "nan"], "--lr: must be finite, got nan"),
    (["--mtp-lambda", "nan"], "--mtp-lambda: must be finite"),
    (["--bias-update-speed", "nan"], "--bias-update-speed: must be finite"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--batch-size", "-1"], "--batch-size: must be >= 1"),
    (["--seq-len", "1000"], "--seq-len: 1000 exceeds the model's max_seq_len"),
    (["--warmup-steps", "-1"], "--warmup-steps: must be >= 0"),
    (["--aux-loss", "token"], "--aux-loss: must be 'sequence' or 'batch'"),
    (["--eval-every", "0"], "--eval-every: must be >= 1"),
    (["--checkpoint-every", "-2"], "--checkpoint-every: must be >= 0"),
    (["--lr", "fast"], "argument --lr: invalid float value"),
    (["--preset", "huge"], "argument --preset: invalid choice"),
    (["--preset", "deepseek-v3"], "GiB to train"),
    (["--device", "gpu"], "--device gpu: not usable here"),
    (["OUT", ""], "--out: '': names no directory"),
    (["OUT", "."], "--out: '.': names no directory"),
    (["OUT", "FILE"], "exists and is not a directory"),
    (["OUT", "FILE/sub"], "is a file, cannot hold"),
    (["OUT", "HOME"], "--out: HOME holds files but no checkpoint"),
]


@pytest.mark.parametrize("argv, words", TRAIN_ARGS, ids=[" ".join(a) for a, _ in TRAIN_ARGS])
def test_train_cli_refuses_bad_arguments_before_training(tmp_path, capsys, argv, words):
    (tmp_path / "FILE").write_text("not a directory")
    (tmp_path / "HOME").mkdir()
    (tmp_path / "HOME" / "notes.txt").write_text("someone's files")
    where = {"FILE": str(tmp_path / "FILE"), "HOME": str(tmp_path / "HOME")}
    if argv[0] == "OUT":
        argv = ["--out", argv[1].replace("FILE", where["FILE"]).replace("HOME", where["HOME"])]
        words = words.replace("HOME", where["HOME"])
    else:
        argv = argv + ok_out(tmp_path)
    assert words in cli_error(capsys, tr.main, argv, 2)
    assert not (tmp_path / "run").exists() and (tmp_path / "HOME" / "notes.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cli_refuses_cuda_without_cuda(tmp_path, capsys):
    assert "--device cuda: not usable here" in cli_error(capsys, tr.main, ["--device", "cuda", *ok_out(tmp_path)], 2)


def test_train_cli_unwritable_out_fails_before_training(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    (tmp_path / "ro").mkdir(mode=0o555)
    assert "not writable" in cli_error(capsys, tr.main, ["--out", str(tmp_path / "ro" / "run")], 2)


FEW = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "3"]


def test_train_cli_diverging_run_exits_1_with_one_line(tmp_path, capsys):
    line = cli_error(capsys, tr.main, [*FEW, "--lr", "1e30", "--checkpoint-every", "1", *ok_out(tmp_path)], 1)
    assert "step 2:" in line and "holds step 1" in line
    assert json.loads((tmp_path / "run" / C).read_text())["step"] == 1


def test_train_cli_interrupt_exits_130_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    interrupt_at_forward(monkeypatch, 2)
    line = cli_error(capsys, tr.main, [*FEW, *ok_out(tmp_path)], 130)
    assert "interrupted after step 1" in line
    assert json.loads((tmp_path / "run" / C).read_text())["step"] == 1


def test_train_cli_resume_errors_are_one_line(tmp_path, capsys):
    assert "no such checkpoint directory" in cli_error(capsys, tr.main, [*FEW, "--resume", *ok_out(tmp_path)], 1)
    ck.save(make(), tmp_path / "run")  # weights, no training state
    assert "training_state.pt: not found" in cli_error(capsys, tr.main, [*FEW, "--resume", *ok_out(tmp_path)], 1)


LAB_ARGS = [
    (["--lr", "nan"], "--lr: expected a finite number, got nan"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--pp", "0"], "--pp: must be >= 1"),
    (["--n-micro", "-2"], "--n-micro: must be >= 1"),
    (["--ckpt-every", "-1"], "--ckpt-every: must be >= 0"),
    (["--val-every", "-1"], "--val-every: must be >= 0"),
    (["--log-every", "-1"], "--log-every: must be >= 0"),
    (["--timeout", "0"], "--timeout: must be a finite number of seconds > 0"),
    (["--timeout", "nan"], "--timeout: must be a finite number of seconds > 0"),
    (["--resume"], "--resume: needs --out"),
    (["--out", ""], "--out: '': names no directory"),
    (["--out", "FILE"], "exists and is not a directory"),
]


@pytest.mark.parametrize("argv, words", LAB_ARGS, ids=[" ".join(a) for a, _ in LAB_ARGS])
def test_lab_train_refuses_bad_arguments_before_starting(tmp_path, capsys, argv, words):
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    assert words in cli_error(capsys, lab_main, ["train", *argv], 2)  # before any process group: none here


@pytest.mark.parametrize("argv, code, words", [
    (["--ckpt", "OURS", "--prompt", "hi"], 1, "a dsv3lib checkpoint"),
    (["--ckpt", "NOWHERE", "--prompt", "hi"], 1, "--ckpt: "),
    (["--ckpt", "HF", "--prompt", "hi", "--max-new-tokens", "-1"], 1, "max_new_tokens: must be >= 1"),
    (["--ckpt", "HF", "--prompt", ""], 1, "--prompt: empty"),
    (["--ckpt", "HF", "--max-new-tokens", "1"], 2, "the following arguments are required: --prompt"),
], ids=["our checkpoint", "missing", "negative tokens", "empty prompt", "no prompt"])
def test_lab_serve_bad_inputs_are_one_line(saved, tmp_path, capsys, argv, code, words):
    where = {"OURS": str(saved / "ours"), "NOWHERE": str(tmp_path / "nowhere"), "HF": str(saved / "hf")}
    assert words in cli_error(capsys, lab_main, ["serve", *[where.get(a, a) for a in argv]], code)


def test_lab_config_refuses_what_would_fail_late():
    for kwargs, words in [(dict(gamma=math.nan), "--gamma: expected a finite number"),
                          (dict(grad_clip=-1.0), "--grad-clip: must be >= 0"),
                          (dict(out=""), "--out: '' names no directory"),
                          (dict(steps=2.0), "--steps: expected an integer")]:
        with pytest.raises(ValueError) as err:
            LabConfig(**kwargs)
        one_line(err, words)


@pytest.mark.slow
def test_lab_run_stops_every_rank_on_a_non_finite_step(tmp_path):
    """The step loss and the clipped norm are the same on every rank, so all ranks stop before the update."""
    import lab_workers as workers

    from dsv3lib.lab import shards
    from dsv3lib.parallel.launch import JobFailed, launch

    run = dict(pp=2, ep=1, steps=3, micro_rows=1, seq_len=16, val_every=0, lr=1e30, ckpt_every=1,
               out=str(tmp_path / "lab"))
    with pytest.raises(JobFailed, match=r"FloatingPointError: step 2: .*stopped before its update, the checkpoint in"):
        launch(workers.train, 2, (run,))
    assert json.loads((tmp_path / "lab" / "shards" / shards.META).read_text())["step"] == 1
