"""Every GPU benchmark of the book in one run: one table, one JSON file.

    python -m bench                    # on one CUDA GPU (goals are for an H200; meant to finish within 8 minutes)
    python -m bench --only fp8,mla     # some sections: fp8, mla, moe, mtp
    python -m bench --dry-run          # on the CPU: tiny shapes, Triton kernels in its interpreter, no goals judged

For each kernel, on random data: its error against the PyTorch reference (``rel.err`` = max|ours − ref| /
max|ref|; "exact" where the claim is bit-for-bit), then its speed against the peers measured in the same run,
as a ratio to the strongest of them, and the goal the row is judged by:

    act_quant        bf16 → e4m3 + 1×128 scales          vs a device copy of the same bytes    ≥ 0.80× copy
    fp8_gemm         1×128 × 128×128 block-scaled GEMM   vs cuBLAS blockwise / bf16 matmul     ≥ 1.0× / ≥ 1.5×
    mla_decode       absorbed MLA, V3 widths             vs bmm+softmax, SDPA on expanded KV   ≥ 0.70× copy
    moe_experts      routed experts, sort + grouped GEMM vs torch._grouped_mm peer, a loop      ≥ 1.0×
    mtp_speculative  MTP drafts + verification           vs greedy decoding                    output identical

A section that raises becomes a FAILED row and the run goes on. Exit status: 0 when every row ran and
matched its reference, 1 otherwise (a missed speed goal is reported, not an error). The JSON file
(``--out``, default ``bench/results.json``) holds the environment (device, driver, versions), per-section
seconds and every row with its secondary numbers; it is rewritten after each section (``"complete": false``
until the last), so a run stopped part-way keeps what it measured. The sections live in ``bench/fp8.py``, ``mla.py``,
``moe.py`` and ``mtp.py``, each also runnable alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

SECTIONS = ("fp8", "mla", "moe", "mtp")
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="run every section on the CPU at tiny sizes (Triton in its interpreter); judges no goals")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON file to write (default: %(default)s)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad or not args.only:
        p.error(f"--only: unknown section(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run: Triton was imported before TRITON_INTERPRET=1 could be set; "
                             "run it as a fresh process (python -m bench --dry-run)")
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
    import torch

    from bench.common import Row, Timer, environment, print_table, write_json

    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (python -m bench --dry-run runs every section on the CPU)")
        return 0
    else:
        device = torch.device("cuda")
        cap = torch.cuda.get_device_capability()
        if cap < (8, 9) and "fp8" in args.only:
            print(f"this GPU is sm_{cap[0]}{cap[1]}: no FP8 tensor cores (sm_89+), skipping the fp8 section")
            args.only.remove("fp8")
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}"
          + (f" | CUDA {env['cuda']}, driver {env['driver']}" if device.type == "cuda" else "")
          + (" | DRY RUN: CPU, tiny shapes, Triton interpreter, goals not judged" if args.dry_run else ""), flush=True)
    timer = Timer(device)
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    for name in args.only:
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            got = importlib.import_module(f"bench.{name}").section(timer, args.dry_run)  # bench/fp8.py, ...
        except Exception as e:  # noqa: BLE001 - one broken section must not cost the others' numbers
            traceback.print_exc()
            got = [Row(name, "-", "-", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
        rows.extend(got)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] {seconds[name]} s", flush=True)
        write_json(args.out, env, rows, dry_run=args.dry_run, seconds=seconds, complete=False)  # if killed later
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total = round(time.perf_counter() - t_start, 1)
    print()
    print_table(rows)
    ok = all(r.correct for r in rows)
    print(f"\n{len(rows)} rows in {total} s ({', '.join(f'{k} {v} s' for k, v in seconds.items())}); "
          f"correct: {sum(r.correct for r in rows)}/{len(rows)}; goals met: {sum(r.met is True for r in rows)}"
          f"/{sum(r.met is not None for r in rows)} judged")
    write_json(args.out, env, rows, dry_run=args.dry_run, seconds=seconds, total_seconds=total, complete=True)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
