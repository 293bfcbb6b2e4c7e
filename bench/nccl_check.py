"""The multi-process code on the GPU's backend (chapters 3, 5, 6): NCCL with one process per GPU.

    python bench/nccl_check.py            # on a CUDA host: as many ranks as GPUs (at most 4), NCCL
    python bench/nccl_check.py --cpu 2    # the same checks with 2 gloo processes on the CPU (a dry run)

Everything runs under :func:`dsv3lib.parallel.launch.launch`, which picks NCCL when every rank has a GPU.
Per rank, on its device: the collectives the library uses (all_reduce, all_gather, all_to_all_single — the
expert dispatch's primitive); then the lab's first training step for each layout the world size allows
(pp = 1 with experts over every rank; pp = 2 with DualPipe where there are two or more ranks; FP32 and FP8),
its loss against :func:`dsv3lib.lab.train.reference_first_loss` computed by one process on rank 0's device;
then a few more steps, whose losses must stay finite. One GPU gives a one-rank NCCL group: the collectives and
the training path on the GPU, but no traffic between GPUs; pipeline send/receive and the expert all-to-all
between GPUs need two or more. Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `dsv3lib` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = {False: 1e-5, True: 2e-3}  # relative loss difference allowed: FP32 (reduction order), FP8 (GEMM order)


def layouts(world: int) -> list[dict]:
    """The lab layouts this many ranks can run, each in FP32 and FP8."""
    shapes = [dict(pp=1, ep=world, schedule="1F1B")]
    if world >= 2 and world % 2 == 0:
        shapes.append(dict(pp=2, ep=world // 2, schedule="DualPipe"))
    return [dict(s, fp8=fp8, micro_rows=1, seq_len=32) for s in shapes for fp8 in (False, True)]


def _collectives(rank: int, world: int, dev: torch.device) -> dict:
    import torch.distributed as dist

    x = torch.full((4,), float(rank + 1), device=dev)
    dist.all_reduce(x)
    gathered = [torch.empty(2, device=dev) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([rank, rank * 10.0], device=dev))
    send = torch.arange(world * 3, dtype=torch.float32, device=dev) + 100 * rank  # 3 rows to each rank
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    want = torch.cat([torch.arange(rank * 3, rank * 3 + 3, dtype=torch.float32) + 100 * r for r in range(world)])
    return {
        "all_reduce": bool(torch.equal(x.cpu(), torch.full((4,), world * (world + 1) / 2))),
        "all_gather": all(torch.equal(g.cpu(), torch.tensor([r, r * 10.0])) for r, g in enumerate(gathered)),
        "all_to_all_single": bool(torch.equal(recv.cpu(), want)),
    }


def worker(rank: int, world: int, cases: list[dict], steps: int) -> dict:
    """Runs in each spawned rank: the collectives, then each lab case (first step and a few more)."""
    import torch.distributed as dist

    from dsv3lib.lab.train import LabConfig, reference_first_loss, run
    from dsv3lib.parallel.launch import device

    dev = device()
    out = {"backend": dist.get_backend(), "device": str(dev), "collectives": _collectives(rank, world, dev),
           "cases": []}
    for kw in cases:
        cfg = LabConfig(steps=steps, val_every=0, progress=False, **kw)
        hist = run(cfg, log=lambda *_: None)
        ref = reference_first_loss(cfg, world, dev) if rank == 0 else None
        out["cases"].append({"case": kw, "loss": hist.loss, "ref_loss": ref})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", type=int, metavar="N", help="run N gloo processes on the CPU instead (a dry run)")
    p.add_argument("--steps", type=int, default=4, help="lab steps per case (default: %(default)s)")
    args = p.parse_args(argv)
    from dsv3lib.parallel.launch import launch

    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the spawned ranks see no GPU: gloo on the CPU
        world = args.cpu
    elif torch.cuda.is_available():
        world = min(4, torch.cuda.device_count())
    else:
        print("no CUDA GPU: nothing to check (--cpu N runs the same checks with gloo)")
        return 0
    cases = layouts(world)
    out = launch(worker, world, (cases, args.steps), timeout=300)
    print(f"{world} rank(s), backend {out['backend']}, rank 0 on {out['device']}")
    failed = 0
    for name, ok in out["collectives"].items():
        print(f"  {name:<18} {'ok' if ok else 'WRONG'}")
        failed += not ok
    for c in out["cases"]:
        first, ref = c["loss"][0], c["ref_loss"]
        rel = abs(first - ref) / abs(ref)
        ok = rel <= TOL[c["case"]["fp8"]] and all(math.isfinite(v) for v in c["loss"])
        failed += not ok
        layout = " ".join(f"{k}={v}" for k, v in c["case"].items() if k in ("pp", "ep", "schedule", "fp8"))
        print(f"  lab {layout:<36} first loss {first:.6f} vs one process {ref:.6f} (rel. {rel:.1e}); "
              f"losses {' '.join(f'{v:.3f}' for v in c['loss'])}  {'ok' if ok else 'FAILED'}")
    print("all ok" if not failed else f"{failed} check(s) FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
