"""dsv3lib.parallel.launch (chapter 5): N processes with a process group, and a failure ends the whole job."""

import multiprocessing.process
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import launch_workers as workers  # tests/ is on sys.path (pytest rootdir); spawned children get the same sys.path
from dsv3lib.parallel.launch import JobFailed, device, heartbeat, init_distributed, launch, pick_backend

TESTS = Path(__file__).parent


def _all_gone(pids):
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@pytest.mark.slow
def test_launch_returns_rank0_value():
    out = launch(workers.ranks_and_sum, 4, (2.0,))
    assert [s[:2] for s in out["seen"]] == [(r, 4) for r in range(4)]
    assert out["sum"] == 2.0 * (1 + 2 + 3 + 4)
    assert out["device"] == str(torch.device("cuda", 0) if pick_backend(4) == "nccl" else torch.device("cpu"))
    assert _all_gone([s[2] for s in out["seen"]])


@pytest.mark.slow
def test_a_raising_rank_ends_the_job(capfd):
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=r"^rank 2 failed during step 3: ValueError: boom$") as info:
        launch(workers.fail_at, 4, (2, 3, "raise"))
    assert time.monotonic() - t0 < 30
    err = capfd.readouterr().err  # the children share this process's stderr
    assert "ValueError: boom" in err  # the failed rank's traceback
    for rank in (0, 1, 3):  # the survivors were blocked in step 3's all_reduce
        assert f"rank {rank}: stopping: rank 2 failed during step 3" in err
    assert all(code != 0 for code in info.value.exitcodes)
    assert 'raise ValueError("boom")' in info.value.traceback  # for notebooks, which do not show child stderr
    assert _all_gone(info.value.pids)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job(capfd):
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=r"^rank 1 was killed by SIGKILL during step 2$") as info:
        launch(workers.fail_at, 3, (1, 2, "kill"))
    assert time.monotonic() - t0 < 30
    assert info.value.exitcodes[1] == -9 and all(code != 0 for code in info.value.exitcodes)
    assert "rank 0: stopping: rank 1 was killed by SIGKILL during step 2" in capfd.readouterr().err
    assert _all_gone(info.value.pids)


@pytest.mark.slow
def test_survivors_that_lose_a_peer_name_it(capfd, monkeypatch):
    """Without the parent's SIGTERM, survivors leave on their own gloo error ("connection closed by peer"),
    after reading the record the parent writes for the killed rank."""
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "terminate", lambda self: None)
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=r"^rank 2 was killed by SIGKILL during step 1$") as info:
        launch(workers.fail_at, 3, (2, 1, "kill"))
    assert time.monotonic() - t0 < 30
    err = capfd.readouterr().err
    for rank in (0, 1):
        assert f"rank {rank}: stopping: rank 2 was killed by SIGKILL during step 1 (here: RuntimeError" in err
    assert info.value.exitcodes == [1, 1, -9]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sleep", "stop"])
def test_a_stalled_rank_ends_the_job_and_is_named(capfd, how):
    """A rank that stops answering without exiting (stuck in a sleep, or frozen by SIGSTOP): its peers'
    all_reduce times out, they name it, and the whole job ends non-zero within a minute."""
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=r"^rank 1 stopped answering during step 2: ranks 0, 2 timed out "
                                         r"after 10 s waiting for it$") as info:
        launch(workers.fail_at, 3, (1, 2, how), timeout=10)
    took = time.monotonic() - t0
    assert took < 60, took
    assert all(code != 0 for code in info.value.exitcodes)
    err = capfd.readouterr().err
    for rank in (0, 2):
        assert f"rank {rank}: stopping: rank 1 stopped answering during step 2" in err
    assert _all_gone(info.value.pids)


@pytest.mark.slow
def test_a_stalled_rank_inside_a_pipelined_step_is_named():
    """Rank 1 stops inside a MoE forward of a DualPipe step: its peers wait in p2p receives and all-to-alls
    (the layout's groups carry the job's timeout), and all three name it."""
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=r"^rank 1 stopped answering during step 1: ranks 0, 2, 3 timed out"):
        launch(workers.fail_in_parallel_step, 4, (1, 1, "sleep"), timeout=10)
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_torchrun_stalled_rank_is_named():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TESTS / "launch_workers.py"), "--fail-rank", "1", "--fail-step", "2", "--how", "sleep",
           "--timeout", "10"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert time.monotonic() - t0 < 60
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert ("rank 0: stopping: rank 1 stopped answering during step 2: rank 0 timed out after 10 s "
            "waiting for it") in out, out[-3000:]


@pytest.mark.slow
def test_torchrun_failure_names_the_rank():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TESTS / "launch_workers.py"), "--fail-rank", "1", "--fail-step", "2"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 45
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "rank 1 failed during step 2: ValueError: boom" in out
    assert "rank 0: stopping: the launcher sent SIGTERM during step 2" in out


def test_errors_and_no_ops(monkeypatch):
    with pytest.raises(ValueError, match="nprocs must be >= 1"):
        launch(workers.ranks_and_sum, 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="^init_distributed: RANK is not set; start this under torchrun"):
        init_distributed()
    monkeypatch.delenv("DSV3_STATUS_DIR", raising=False)
    heartbeat(7)  # outside launch(): nothing to write
    assert device() == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_backend(1) == "gloo"
