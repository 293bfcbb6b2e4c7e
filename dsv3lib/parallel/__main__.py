"""A few parallel training steps of a tiny DeepSeek-V3, under torchrun (chapter 5; the lab builds on it).

    torchrun --nproc-per-node 4 -m dsv3lib.parallel --pp 2 --ep 2 --schedule DualPipe --steps 5

Gloo on CPU, NCCL when every rank has a GPU (:mod:`dsv3lib.parallel.launch`). Every rank builds the same
seeded model and reads the same global batches from the corpus; :func:`~dsv3lib.parallel.parallelize.parallelize`
keeps this rank's part; AdamW updates the parameters it holds. Rank 0 prints each step's loss and tokens/s.
A failing rank ends the job with a line naming it and its step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..data import batches, load_corpus
from ..model import Transformer
from .launch import device, init_distributed
from .layout import ParallelLayout, add_run_arguments
from .parallelize import parallelize
from .schedules import make_schedule


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m dsv3lib.parallel",
                                description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    args = p.parse_args(argv)

    rank, world = init_distributed(args.timeout)
    torch.set_num_threads(1)
    try:
        layout = ParallelLayout(pp=args.pp, ep=args.ep, dp=args.dp)
        n_micro = args.n_micro or 2 * args.pp
        cfg = ModelConfig.preset("tiny", n_layers=2 * args.pp, max_seq_len=args.seq_len)
        torch.manual_seed(0)
        model = Transformer(cfg).to(device())
        runner = parallelize(model, layout, make_schedule(args.schedule, args.pp, n_micro), fp8=args.fp8,
                             overlap=args.overlap)
        opt = torch.optim.AdamW(runner.parameters(), lr=args.lr)
        rows = layout.n_replicas * n_micro * args.micro_rows
        data = batches(load_corpus().train, rows, args.seq_len, seed=0)  # the same batches on every rank
        if rank == 0:
            print(f"{world} processes ({dist.get_backend()}): {layout}; {args.schedule}, {n_micro} micro-batches "
                  f"of {args.micro_rows} × {args.seq_len} tokens per replica", flush=True)
        for step in range(args.steps):
            x, y = next(data)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = runner.step(x.to(device()), y.to(device()))
            opt.step()
            seconds = time.perf_counter() - t0
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}  {x.numel() / seconds:,.0f} tokens/s", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
