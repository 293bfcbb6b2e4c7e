"""Workers for tests/test_launch.py (chapter 5): spawned children import them from here, and
``torchrun tests/launch_workers.py --fail-rank R --fail-step S`` runs :func:`main`."""

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist

from dsv3lib.parallel.launch import device, heartbeat, init_distributed

__all__ = ["ranks_and_sum", "fail_at", "fail_in_parallel_step", "main"]


def ranks_and_sum(rank: int, world: int, scale: float = 1.0) -> dict:
    """Every rank's (rank, world) and the all-reduced sum of scale·(rank + 1)."""
    heartbeat(0)
    t = torch.tensor([scale * (rank + 1)], device=device())
    dist.all_reduce(t)
    seen = [None] * world
    dist.all_gather_object(seen, (rank, world, os.getpid()))
    return {"seen": seen, "sum": t.item(), "device": str(device())}


def fail_at(rank: int, world: int, fail_rank: int, fail_step: int, how: str = "raise", steps: int = 10) -> None:
    """``steps`` steps of one all_reduce each; ``fail_rank`` raises ValueError (how="raise"), SIGKILLs itself
    (how="kill"), sleeps for an hour (how="sleep": stuck, threads still running) or SIGSTOPs itself (how="stop":
    frozen whole) at the start of ``fail_step``, while the others block in that step's all_reduce."""
    for step in range(steps):
        heartbeat(step)
        if rank == fail_rank and step == fail_step:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            if how == "sleep":
                time.sleep(3600)
            raise ValueError("boom")
        t = torch.ones(4, device=device())
        dist.all_reduce(t)
        assert t[0].item() == world


def fail_in_parallel_step(rank: int, world: int, fail_rank: int, fail_step: int, how: str = "raise") -> None:
    """A tiny model under ``parallelize`` (PP 2 × EP 2, DualPipe, overlapped pairs); at step ``fail_step`` rank
    ``fail_rank`` raises (or SIGKILLs itself) inside a MoE layer's forward, in the middle of the pipelined step,
    while its peers wait for its activations and all-to-alls."""
    from dsv3lib.config import ModelConfig
    from dsv3lib.model import Transformer
    from dsv3lib.parallel.layout import ParallelLayout
    from dsv3lib.parallel.parallelize import parallelize
    from dsv3lib.parallel.schedules import make_schedule

    layout = ParallelLayout(pp=2, ep=2)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", n_layers=4, max_seq_len=32))
    runner = parallelize(model, layout, make_schedule("DualPipe", 2, 4), overlap=True)
    tokens = torch.randint(0, model.cfg.vocab_size, (16, 17), generator=torch.Generator().manual_seed(1))
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if rank == fail_rank and runner.steps == fail_step and calls["n"] > 3:  # a few chunks into the step
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "sleep":
                time.sleep(3600)
            raise ValueError("boom in a MoE forward")

    for st in runner.stages.values():
        for name, m in st.named_modules():
            if name.endswith("ffn") and hasattr(m, "gate"):
                m.register_forward_pre_hook(hook)
    for _ in range(fail_step + 2):
        runner.step(tokens[:, :-1], tokens[:, 1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=0)
    parser.add_argument("--how", default="raise", choices=["raise", "kill", "sleep", "stop"])
    parser.add_argument("--timeout", type=float, default=60.0)
    a = parser.parse_args()
    rank, world = init_distributed(timeout=a.timeout)
    fail_at(rank, world, a.fail_rank, a.fail_step, a.how)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
