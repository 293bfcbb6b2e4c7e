"""Workers for tests/test_lab.py (chapter 6): spawned children import them from here."""

import torch.distributed as dist

from dsv3lib.lab.serve import load_for_serving, serve
from dsv3lib.lab.train import LabConfig, reference_first_loss, run
from dsv3lib.parallel.launch import heartbeat

__all__ = ["first_step", "train", "serve_tokens"]


def train(rank: int, world: int, kw: dict, fail_at: int = -1) -> dict:
    """A lab run; returns its history. ``fail_at``: rank 1 raises when the runner starts that step (0-based)."""
    if fail_at >= 0:
        from dsv3lib.parallel.parallelize import ParallelRunner

        step = ParallelRunner.step

        def failing(self, x, y):
            heartbeat(self.steps)
            if self.steps == fail_at and rank == 1:
                raise RuntimeError("injected failure")
            return step(self, x, y)

        ParallelRunner.step = failing
    hist = run(LabConfig(progress=False, **kw), log=lambda *_: None)
    return vars(hist)


def first_step(rank: int, world: int, cases: list) -> list:
    """For each case: one lab step, and (rank 0) the one-process model's loss on the same first batch."""
    return [_first_step(rank, world, kw) for kw in cases]


def _first_step(rank: int, world: int, kw: dict) -> dict:
    cfg = LabConfig(steps=1, val_every=0, progress=False, **kw)
    hist = run(cfg)
    if rank != 0:
        return {}
    return {"loss": hist.loss[0], "ref_loss": reference_first_loss(cfg, world)}


def serve_tokens(rank: int, world: int, ckpt: str, prompt: str, n: int, mtp: bool, sampling: dict | None = None) -> list:
    """Greedy (or, with ``sampling``, sampled) tokens from ``ckpt`` with the experts sharded over the ``world``
    processes."""
    result = serve(load_for_serving(ckpt), prompt, n, mtp=mtp, **(sampling or {}))
    dist.barrier()
    return result.tokens
