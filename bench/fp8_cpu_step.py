"""Time one FP8 training step against one FP32 step of the tiny model on the CPU (chapter 1).

    python bench/fp8_cpu_step.py [--batch 8] [--seq 64] [--steps 7] [--backend auto|ref] [--profile]

The step is what ``dsv3lib.train`` does: forward, MTP loss, zero_grad, backward, gradient clipping and a
fused AdamW step. The FP8 model is the same seeded tiny model after ``convert_to_fp8`` (every Linear but
the head runs the reference block-scaled FP8 path: the CPU has no FP8 GEMM). Steps of the two models
alternate, so a load change on a shared machine hits both; after warm-up the median of ``--steps`` steps
is reported, with one intra-op thread and with torch's default. Prints ``FP8/FP32 step-time ratio``.
Target: ≤ 2. ``--backend ref`` times the PyTorch references instead of the compiled CPU kernels
(``dsv3lib.fp8.cpu_kernels``; the same numbers). ``--profile`` prints torch.profiler's top operators of the
FP8 step instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dsv3lib.config import ModelConfig  # noqa: E402
from dsv3lib.dispatch import use_backend  # noqa: E402
from dsv3lib.fp8 import convert_to_fp8, cpu_kernels  # noqa: E402
from dsv3lib.model import Transformer, mtp_loss  # noqa: E402
from dsv3lib.train import TrainConfig, make_optimizer  # noqa: E402


def make_step(fp8: bool, batch: int, seq: int):
    """A closure running one training step of a fresh seeded tiny model (FP8 or FP32) on a fixed batch."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg)
    if fp8:
        convert_to_fp8(model)
    tcfg = TrainConfig(batch_size=batch, seq_len=seq)
    opt = make_optimizer(model, tcfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    model.train()

    def step() -> float:
        loss, _, _ = mtp_loss(model(x), y, tcfg.mtp_lambda)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        return loss.item()

    return step


def measure(batch: int, seq: int, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds of an FP32 and an FP8 step, measured alternately."""
    runs = {False: make_step(False, batch, seq), True: make_step(True, batch, seq)}
    times = {False: [], True: []}
    for i in range(warmup + steps):
        for fp8, step in runs.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[fp8].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True])


def profile(batch: int, seq: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = make_step(True, batch, seq)
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=7, help="timed steps per model (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", choices=("auto", "ref"), default="auto",
                   help="auto: the compiled CPU kernels where they build; ref: the PyTorch references")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    with use_backend(args.backend):
        return _run(args)


def _run(args) -> list[float]:
    if args.profile:
        torch.set_num_threads(1)
        profile(args.batch, args.seq)
        return []
    default_threads = torch.get_num_threads()
    kernels = "compiled CPU kernels" if cpu_kernels.serves(torch.empty(0)) else "PyTorch references"
    print(f"tiny preset, batch {args.batch} x seq {args.seq}, torch {torch.__version__}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; FP8 elementwise work: {kernels}")
    ratios = []
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        t32, t8 = measure(args.batch, args.seq, args.steps, args.warmup)
        ratios.append(t8 / t32)
        print(f"threads {threads}: FP32 step {t32 * 1e3:7.1f} ms  FP8 step {t8 * 1e3:7.1f} ms  "
              f"FP8/FP32 step-time ratio {t8 / t32:.2f}")
    torch.set_num_threads(default_threads)
    print("target: ratio <= 2")
    return ratios


if __name__ == "__main__":
    main()
