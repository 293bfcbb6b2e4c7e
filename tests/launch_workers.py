"""Workers for tests/test_launch.py (chapter 5): spawned children import them from here, and
``torchrun tests/launch_workers.py --fail-rank R --fail-step S`` runs :func:`main`."""

import argparse
import os
import signal

import torch
import torch.distributed as dist

from dsv3lib.parallel.launch import device, heartbeat, init_distributed

__all__ = ["ranks_and_sum", "fail_at", "main"]


def ranks_and_sum(rank: int, world: int, scale: float = 1.0) -> dict:
    """Every rank's (rank, world) and the all-reduced sum of scale·(rank + 1)."""
    heartbeat(0)
    t = torch.tensor([scale * (rank + 1)], device=device())
    dist.all_reduce(t)
    seen = [None] * world
    dist.all_gather_object(seen, (rank, world, os.getpid()))
    return {"seen": seen, "sum": t.item(), "device": str(device())}


def fail_at(rank: int, world: int, fail_rank: int, fail_step: int, how: str = "raise", steps: int = 10) -> None:
    """``steps`` steps of one all_reduce each; ``fail_rank`` raises ValueError (how="raise") or SIGKILLs itself
    (how="kill") at the start of ``fail_step``, while the others block in that step's all_reduce."""
    for step in range(steps):
        heartbeat(step)
        if rank == fail_rank and step == fail_step:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("boom")
        t = torch.ones(4, device=device())
        dist.all_reduce(t)
        assert t[0].item() == world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    a = parser.parse_args()
    rank, world = init_distributed(timeout=a.timeout)
    fail_at(rank, world, a.fail_rank, a.fail_step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
