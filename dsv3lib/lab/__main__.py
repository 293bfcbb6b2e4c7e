"""The lab's command line (chapter 6): ``train`` under torchrun, ``serve`` on one process or under torchrun.

    torchrun --nproc-per-node 4 -m dsv3lib.lab train --pp 2 --ep 2 --schedule dualpipe --steps 40 --out runs/lab
    python -m dsv3lib.lab serve --ckpt runs/lab --prompt "def " --max-new-tokens 64
    torchrun --nproc-per-node 2 -m dsv3lib.lab serve --ckpt runs/lab --prompt "def "   # experts over 2 processes

A bad flag fails in one line before any process group starts (exit status 2); a training step whose loss or
gradient norm is not finite stops every rank before its update (1); Ctrl-C stops with one line (130). Either
way the last checkpoint in ``--out`` stays as it was.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist

from ..checkpoint import check_writable
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
    s = sub.add_parser("serve", help="continue a prompt (greedy or sampled; MTP drafts)")
    s.add_argument("--ckpt", required=True, help="a lab run directory or a Hugging Face directory")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--no-mtp", action="store_true", help="plain decoding, no drafts")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    s.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens holding this mass")
    s.add_argument("--seed", type=int, default=None, help="the sampler's seed (the same text on 1 or N processes)")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.verb == "train":
        from .train import LabConfig, run

        cfg = _lab_config(parser, args, LabConfig)  # bad flags fail here, in one line, before any process group
        init_distributed(args.timeout)
        try:
            hist = run(cfg, log=lambda line: print(line, flush=True))
            if dist.get_rank() == 0:
                print(f"done: loss {hist.loss[0]:.4f} -> {hist.loss[-1]:.4f} over {len(hist.loss)} steps", flush=True)
        except KeyboardInterrupt as e:
            if dist.get_rank() == 0:
                print(f"{parser.prog} train: {e}", file=sys.stderr, flush=True)
            sys.exit(130)
        except FloatingPointError as e:  # every rank sees the same loss and norm, so every rank stops here
            if dist.get_rank() == 0:
                print(f"{parser.prog} train: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        finally:
            dist.destroy_process_group()
        return
    from .serve import load_for_serving, serve

    distributed = "RANK" in os.environ
    if distributed:
        init_distributed()
    try:
        result = serve(load_for_serving(args.ckpt), args.prompt, args.max_new_tokens, mtp=not args.no_mtp,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        if not distributed or dist.get_rank() == 0:
            sys.stdout.write(args.prompt + result.text + "\n")
            print(result.summary(), flush=True)
    except (ValueError, OSError) as e:  # a bad --ckpt, --prompt, ...: one line (under torchrun: the rank's line)
        if distributed:
            raise
        parser.exit(1, f"{parser.prog} serve: error: {e}\n")
    finally:
        if distributed:
            dist.destroy_process_group()


def _lab_config(parser: argparse.ArgumentParser, args: argparse.Namespace, lab_config):
    """The run's LabConfig, or ``parser.error`` (one line, exit status 2) for a flag it cannot be built from."""
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout: must be a finite number of seconds > 0, got {args.timeout}")
    if args.out is not None:
        try:
            check_writable(args.out)
        except (ValueError, OSError) as e:
            parser.error(f"--out: {e}")
    try:
        return lab_config(pp=args.pp, ep=args.ep, dp=args.dp, schedule=args.schedule, n_micro=args.n_micro,
                          micro_rows=args.micro_rows, seq_len=args.seq_len, steps=args.steps, lr=args.lr,
                          fp8=args.fp8, overlap=args.overlap, val_every=args.val_every, ckpt_every=args.ckpt_every,
                          out=args.out, resume=args.resume, progress=not args.log_every, log_every=args.log_every)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
