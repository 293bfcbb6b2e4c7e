"""Speculative decoding with MTP drafts vs plain greedy decoding: tokens/s and tokens per main forward.

    python bench/mtp.py                      # trains the tiny preset (~1 min on 2 CPU cores) and measures
    python bench/mtp.py --ckpt runs/tiny     # measures a checkpoint written by python -m dsv3lib.train
    python bench/mtp.py --mtp-depth 2 --steps 1000   # two MTP modules: drafts of up to two tokens
    python bench/mtp.py --device cuda        # on a GPU (same model; pass --steps for a longer run)

Prompts are windows of the held-out split, prose and code separately. Both decoders produce the same
tokens (checked), so the ratio of tokens/s is the speed-up. Chapter 4 explains the numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv3lib import checkpoint
from dsv3lib.config import ModelConfig
from dsv3lib.data import load_corpus
from dsv3lib.generate import generate
from dsv3lib.model import Transformer
from dsv3lib.speculative import speculative_generate
from dsv3lib.train import TrainConfig, train


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
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

    if args.ckpt:
        model = checkpoint.load(args.ckpt, device=device)
    else:
        torch.manual_seed(0)
        model = Transformer(ModelConfig.preset("tiny", n_mtp_modules=args.mtp_depth)).to(device)
        h = train(model, TrainConfig(steps=args.steps), progress=False)
        print(f"trained tiny (D={args.mtp_depth}) for {args.steps} steps in {h.seconds:.0f} s: "
              f"val loss {h.val_loss[-1]:.3f}")
        if args.save:
            checkpoint.save(model, args.save)
    model.eval()
    if not model.mtp:
        raise SystemExit("the model has no MTP modules: nothing to draft with")
    corpus = load_corpus()
    print(f"device {device}; {args.prompts} prompts per domain of {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens each\n")
    print(f"{'domain':6s} {'decoder':12s} {'tok/s':>8s} {'tok/fwd':>8s} {'accept':>14s} {'speed-up':>9s}")
    for domain, val in corpus.domain_tokens["val"].items():
        stride = (len(val) - args.prompt_len) // args.prompts
        prompts = [val[i * stride:i * stride + args.prompt_len].to(device) for i in range(args.prompts)]
        generate(model, prompts[0], 8)  # warm-up
        plain_s = 0.0
        plain = []
        for prompt in prompts:
            out, s = timed(lambda: generate(model, prompt, args.new_tokens), device)
            plain.append(out)
            plain_s += s
        n_tok = args.prompts * args.new_tokens
        print(f"{domain:6s} {'greedy':12s} {n_tok / plain_s:8.1f} {1.0:8.2f} {'':>14s} {1.0:8.2f}x")
        for depth in range(1, len(model.mtp) + 1):
            spec_s, fwd, acc, prop = 0.0, 0, [0] * depth, [0] * depth
            for prompt, expected in zip(prompts, plain):
                (out, stats), s = timed(lambda: speculative_generate(model, prompt, args.new_tokens, depth=depth),
                                        device)
                assert torch.equal(out, expected), "speculative greedy must equal greedy"
                spec_s += s
                fwd += stats.main_forwards
                acc = [a + b for a, b in zip(acc, stats.accepted)]
                prop = [a + b for a, b in zip(prop, stats.proposed)]
            rates = " ".join(f"{a / max(1, q):.0%}" for a, q in zip(acc, prop))
            print(f"{domain:6s} {f'MTP D={depth}':12s} {n_tok / spec_s:8.1f} {n_tok / fwd:8.2f} {rates:>14s} "
                  f"{plain_s / spec_s:8.2f}x")


if __name__ == "__main__":
    main()
