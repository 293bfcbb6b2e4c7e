"""The lab's command line (chapter 6): ``train`` under torchrun, ``serve`` on one process or under torchrun.

    torchrun --nproc-per-node 4 -m dsv3lib.lab train --pp 2 --ep 2 --schedule dualpipe --steps 40 --out runs/lab
    python -m dsv3lib.lab serve --ckpt runs/lab --prompt "def " --max-new-tokens 64
    torchrun --nproc-per-node 2 -m dsv3lib.lab serve --ckpt runs/lab --prompt "def "   # experts over 2 processes
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from ..parallel.launch import init_distributed
from ..parallel.layout import add_run_arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsv3lib.lab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train across processes (start under torchrun)")
    add_run_arguments(t, ep=2, steps=40)
    t.add_argument("--val-every", type=int, default=20)
    t.add_argument("--ckpt-every", type=int, default=0, help="0: only at the end")
    t.add_argument("--out", default=None, help="run directory: shards/ (resumable) and hf/ (merged)")
    t.add_argument("--resume", action="store_true", help="continue from --out's shards")
    t.add_argument("--log-every", type=int, default=0, help="print a line every N steps instead of a progress bar")
    s = sub.add_parser("serve", help="continue a prompt (greedy; MTP drafts)")
    s.add_argument("--ckpt", required=True, help="a lab run directory or a Hugging Face directory")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--no-mtp", action="store_true", help="plain greedy decoding, no drafts")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.verb == "train":
        from .train import LabConfig, run

        init_distributed(args.timeout)
        try:
            cfg = LabConfig(pp=args.pp, ep=args.ep, dp=args.dp, schedule=args.schedule,
                            n_micro=args.n_micro, micro_rows=args.micro_rows, seq_len=args.seq_len,
                            steps=args.steps, lr=args.lr, fp8=args.fp8, overlap=args.overlap,
                            val_every=args.val_every, ckpt_every=args.ckpt_every, out=args.out, resume=args.resume,
                            progress=not args.log_every, log_every=args.log_every)
            hist = run(cfg, log=lambda line: print(line, flush=True))
            if dist.get_rank() == 0:
                print(f"done: loss {hist.loss[0]:.4f} -> {hist.loss[-1]:.4f} over {len(hist.loss)} steps", flush=True)
        finally:
            dist.destroy_process_group()
        return
    from .serve import load_for_serving, serve

    distributed = "RANK" in os.environ
    if distributed:
        init_distributed()
    try:
        result = serve(load_for_serving(args.ckpt), args.prompt, args.max_new_tokens, mtp=not args.no_mtp)
        if not distributed or dist.get_rank() == 0:
            sys.stdout.write(args.prompt + result.text + "\n")
            print(result.summary(), flush=True)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
