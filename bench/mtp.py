"""Speculative decoding with MTP drafts vs plain greedy decoding: tokens/s and tokens per main forward.

    python bench/mtp.py                      # trains the tiny preset (~1 min on 2 CPU cores) and measures
    python bench/mtp.py --ckpt runs/tiny     # measures a checkpoint written by python -m dsv3lib.train
    python bench/mtp.py --mtp-depth 2 --steps 1000   # two MTP modules: drafts of up to two tokens
    python bench/mtp.py --device cuda        # on a GPU (same model; pass --steps for a longer run)
    python -m bench --only mtp               # the same rows inside the one-table run (bench/run_all.py)

Prompts are windows of the held-out split, prose and code separately. Both decoders must produce the same
tokens (checked: the row's "exact"), so the ratio of tokens/s is the speed-up. Chapter 4 explains the numbers;
the paper reports 85–90% acceptance of the second token and 1.8× tokens/s (V3 §5.4.3) on a far larger model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `dsv3lib` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Row, Timer, print_table  # noqa: E402


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def trained_model(device: torch.device, steps: int, mtp_depth: int = 1, ckpt: str | None = None,
                  save: str | None = None):
    """The model to decode with: a checkpoint, or the tiny preset trained here for ``steps`` steps."""
    from dsv3lib import checkpoint
    from dsv3lib.config import ModelConfig
    from dsv3lib.model import Transformer
    from dsv3lib.train import TrainConfig, train

    if ckpt:
        return checkpoint.load(ckpt, device=device).eval(), f"checkpoint {ckpt}"
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", n_mtp_modules=mtp_depth)).to(device)
    h = train(model, TrainConfig(steps=steps), progress=False)
    if save:
        checkpoint.save(model, save)
    return model.eval(), f"tiny, D={mtp_depth}, {steps} steps in {h.seconds:.0f} s, val loss {h.val_loss[-1]:.3f}"


def measure(model, device: torch.device, prompts: int, prompt_len: int, new_tokens: int, label: str) -> list[Row]:
    """One row per (domain, draft depth): tokens/s of speculative against greedy decoding on the same prompts."""
    from dsv3lib.data import load_corpus
    from dsv3lib.generate import generate
    from dsv3lib.speculative import speculative_generate

    if not model.mtp:
        raise ValueError("the model has no MTP modules: nothing to draft with")
    rows = []
    for domain, val in load_corpus().domain_tokens["val"].items():
        stride = (len(val) - prompt_len) // prompts
        batch = [val[i * stride:i * stride + prompt_len].to(device) for i in range(prompts)]
        generate(model, batch[0], 8)  # warm-up
        plain, plain_s = [], 0.0
        for prompt in batch:
            out, s = _timed(lambda: generate(model, prompt, new_tokens), device)
            plain.append(out)
            plain_s += s
        n_tok = prompts * new_tokens
        for depth in range(1, len(model.mtp) + 1):
            spec_s, fwd, same, acc, prop = 0.0, 0, 0, [0] * depth, [0] * depth
            for prompt, expected in zip(batch, plain):
                (out, stats), s = _timed(lambda: speculative_generate(model, prompt, new_tokens, depth=depth), device)
                same += int((out == expected).sum())
                spec_s += s
                fwd += stats.main_forwards
                acc = [a + b for a, b in zip(acc, stats.accepted)]
                prop = [a + b for a, b in zip(prop, stats.proposed)]
            total = sum(p.numel() for p in plain)
            row = Row("mtp_speculative", f"{domain}, D={depth}, {prompts}x{new_tokens} tok", "tok/s",
                      goal="greedy-identical; speed-up reported")
            row.exact = same == total
            row.rel_err = 1 - same / total  # the fraction of tokens that differ from greedy decoding
            row.ours, row.peers["greedy"] = n_tok / spec_s, n_tok / plain_s
            row.set_ratio()
            row.extra.update(tokens_per_main_forward=n_tok / fwd, acceptance=[a / max(1, q) for a, q in zip(acc, prop)],
                             model=label)
            row.notes.append(f"{n_tok / fwd:.2f} tokens per main forward; acceptance by depth "
                             + " ".join(f"{a / max(1, q):.0%}" for a, q in zip(acc, prop)))
            rows.append(row)
    return rows


def section(timer: Timer, dry: bool) -> list[Row]:
    """The MTP rows on ``timer``'s device (decoding is timed whole, by wall clock): the chapter's tiny model
    trained for 400 steps (a dry run: 30 steps, short prompts)."""
    device = timer.device
    model, label = trained_model(device, steps=30 if dry else 400)
    rows = measure(model, device, prompts=1 if dry else 6, prompt_len=16 if dry else 32,
                   new_tokens=12 if dry else 160, label=label)
    for r in rows:
        r.met = None if dry else r.exact
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint directory (default: train the tiny preset first)")
    p.add_argument("--steps", type=int, default=400, help="training steps when no --ckpt is given")
    p.add_argument("--mtp-depth", type=int, default=1, help="MTP modules to train when no --ckpt is given")
    p.add_argument("--save", help="where to save the model trained here (a checkpoint directory)")
    p.add_argument("--prompts", type=int, default=6, help="prompts per domain")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    model, label = trained_model(device, args.steps, args.mtp_depth, args.ckpt, args.save)
    print(f"model: {label}; device {device}")
    try:
        rows = measure(model, device, args.prompts, args.prompt_len, args.new_tokens, label)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print_table(rows)
    return 0 if all(r.exact for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
