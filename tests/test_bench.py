"""bench/: the one-table GPU benchmark run (``python -m bench``) and the NCCL check, exercised on the CPU.

On a machine without a GPU the real run says so and exits 0; ``--dry-run`` runs every section at tiny sizes with
the Triton kernels in the interpreter, so the code that will time the kernels on a GPU has run end to end before
a GPU is lent, and its JSON has the shape ``bench/README.md`` documents."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` is a folder of the checkout, not an installed package

from bench.common import Row, max_rel_err, print_table, write_json  # noqa: E402

KERNELS = {"act_quant", "fp8_gemm", "mla_decode", "moe_experts", "mtp_speculative"}


def _run(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "dry.json"
    r = _run("-m", "bench", "--dry-run", "--out", str(out))
    return r, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.slow
def test_dry_run_covers_every_kernel_and_each_matches_its_reference(dry_run):
    r, doc = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert doc["dry_run"] is True and doc["complete"] is True
    assert set(doc["seconds"]) == {"fp8", "mla", "moe", "mtp"}
    assert {row["kernel"] for row in doc["rows"]} == KERNELS
    for row in doc["rows"]:
        assert row["error"] is None and row["correct"] is True, row
        assert row["met"] is None, row  # a dry run judges no goal
        assert row["ours"] > 0 and row["ratio"] is not None and row["strongest_peer"] in row["peers"], row
    act = next(row for row in doc["rows"] if row["kernel"] == "act_quant")
    assert act["exact"] is True and act["rel_err"] == 0  # the kernel (interpreted) is bit-exact
    mtp = [row for row in doc["rows"] if row["kernel"] == "mtp_speculative"]
    assert {row["shape"].split(",")[0] for row in mtp} == {"prose", "code"}
    assert all(row["exact"] for row in mtp)  # speculative greedy == greedy, token for token
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["triton_interpret"] is True
    for kernel in KERNELS:  # the printed table has a line for each
        assert any(line.startswith(kernel) for line in r.stdout.splitlines()), kernel
    assert "correct: 7/7" in r.stdout


def test_without_a_gpu_it_says_so_and_exits_cleanly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "r.json"
    r = _run("-m", "bench", "--out", str(out), timeout=120)
    assert r.returncode == 0 and "no CUDA GPU" in r.stdout, r.stdout + r.stderr
    assert not out.exists()  # nothing measured, nothing written


def test_unknown_section_is_refused_by_name():
    r = _run("-m", "bench", "--only", "fp8,attention", timeout=120)
    assert r.returncode == 2 and "--only: unknown section(s) attention" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["fp8.py", "mla.py", "moe.py"])
def test_single_scripts_run_from_a_checkout_without_a_gpu(script):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = _run(f"bench/{script}", timeout=120)
    assert r.returncode == 0 and "no CUDA GPU" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_nccl_check_runs_with_gloo_on_the_cpu():
    r = _run("bench/nccl_check.py", "--cpu", "1", "--steps", "2", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("1 rank(s), backend gloo") and lines[-1] == "all ok"
    assert sum("ok" in line and line.strip().startswith("lab ") for line in lines) == 2  # FP32 and FP8


# ------------------------------------------------------------------ bench.common, in-process
def test_max_rel_err():
    want = torch.tensor([1.0, -4.0, 2.0])
    assert max_rel_err(want.clone(), want) == 0
    assert max_rel_err(torch.tensor([1.0, -4.0, 3.0]), want) == pytest.approx(0.25)
    assert max_rel_err(torch.tensor([1.0, float("nan"), 2.0]), want) == math.inf  # NaN never passes
    assert max_rel_err(torch.zeros(2), torch.zeros(2)) == 0
    with pytest.raises(ValueError, match="shapes differ"):
        max_rel_err(torch.zeros(2), torch.zeros(3))


def test_row_ratio_correctness_and_failed_rows(capsys):
    r = Row("k", "s", "GB/s", rel_err=1e-3, tol=2e-3, ours=80.0, peers={"a": 100.0, "b": None, "c": 40.0})
    r.set_ratio()
    assert r.strongest_peer == "a" and r.ratio == pytest.approx(0.8) and r.correct
    r.set_ratio(["c"])
    assert r.strongest_peer == "c" and r.ratio == pytest.approx(2.0)
    assert not Row("k", "s", "u", rel_err=3e-3, tol=2e-3).correct
    assert not Row("k", "s", "u", rel_err=0.0, exact=False).correct  # tol 0: only bit-exact counts
    failed = Row("fp8", "-", "-", error="RuntimeError: boom")
    assert not failed.correct
    print_table([r, failed])
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: boom" in out and "2.00x" in out


def test_json_is_strict_and_written_whole(tmp_path):
    path = tmp_path / "sub" / "r.json"
    rows = [Row("k", "s", "u", rel_err=math.inf, ours=1.0, extra={"x": math.nan})]
    write_json(str(path), {"device": "cpu"}, rows, complete=True)
    doc = json.loads(path.read_text())  # allow_nan=False on writing: no bare NaN/Infinity tokens
    assert doc["rows"][0]["rel_err"] == "inf" and doc["rows"][0]["extra"]["x"] == "nan"
    assert doc["rows"][0]["correct"] is False and doc["complete"] is True
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left beside it
