"""Benchmark dsv3lib.fp8's Triton kernels against peers measured in the same run (chapter 1).

    python bench/fp8.py            # on a CUDA GPU with FP8 tensor cores (sm_89+; targets are for an H200)

* act_quant (1×128 tiles, bf16 in → fp8 + fp32 scales): GB/s against a bf16 device copy of the same tensor.
  Target: ≥ 80% of copy bandwidth.
* Block-scaled GEMM (A 1×128 tiles × B 128×128 blocks, FP32 promotion per 128 K) in TFLOP/s against bf16
  ``torch.matmul`` and ``torch._scaled_mm`` with tensorwise, rowwise and — where this torch/cuBLAS supports
  it — blockwise 1×128 × 128×128 scales (the same math as ours). Target: ≥ 1.0× blockwise at M ≥ 4096.

Every GEMM result is checked against the bf16 product before it is timed; a peer this torch build does not
support shows "n/a" and the reason. Shapes are M×N×K (y = x Wᵀ with x (M, K), W (N, K)). Prints a table.
On a machine without a CUDA GPU it prints "no CUDA GPU: nothing to benchmark" and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = [(8192, 8192, 8192), (4096, 2048, 7168), (4096, 7168, 2048), (64, 7168, 2048)]
FP8 = torch.float8_e4m3fn


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn()`` (triton's do_bench: warm-up, L2 flush between runs)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def blockwise_scaled_mm(aq, a_s, wq, w_s):
    """cuBLAS block-scaled GEMM (1×128 × 128×128) through torch, or raise if this build lacks it.

    Layouts follow pytorch's test_scaled_matmul_cuda.py: A scales (M, K/128) outer-dim-major, B scales
    (N/128, K/128) padded to a multiple of 4 along K and passed transposed; scales are the decoding ones.
    """
    sa = a_s.t().contiguous().t()
    nk = w_s.shape[1]
    L4 = -(-nk // 4) * 4
    sb = torch.nn.functional.pad(w_s, (0, L4 - nk)).t()  # (L4, N/128), stride (1, L4)
    errors = []
    F = torch.nn.functional
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        try:
            return F.scaled_mm(aq, wq.t(), sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                               output_dtype=torch.bfloat16)
        except Exception as e:  # noqa: BLE001 - report whatever this build says
            errors.append(f"F.scaled_mm: {str(e).splitlines()[0][:80]}")
    try:
        return torch._scaled_mm(aq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001
        errors.append(f"_scaled_mm: {str(e).splitlines()[0][:80]}")
    raise RuntimeError("; ".join(errors))


def bench_act_quant(kernels, M=16384, K=7168):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t_copy = bench_ms(lambda: y.copy_(x))
    t_q = bench_ms(lambda: kernels.act_quant(x))
    n = x.numel()
    copy_gbs = 2 * 2 * n / t_copy / 1e6  # read + write bf16
    q_gbs = (2 * n + n + 4 * n // 128) / t_q / 1e6  # read bf16, write fp8 + fp32 scales
    q, s = kernels.act_quant(x)
    from dsv3lib.fp8 import quant

    qr, sr = quant.act_quant_ref(x)
    exact = torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    print(f"act_quant {M}x{K} bf16: {q_gbs:,.0f} GB/s vs copy {copy_gbs:,.0f} GB/s = {q_gbs / copy_gbs:.2f}x "
          f"(target >= 0.80); bit-exact vs reference: {exact}")
    return q_gbs / copy_gbs


def bench_gemm(kernels, M, N, K):
    from dsv3lib.fp8 import quant

    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    ref = x @ w.t()
    aq, a_s = kernels.act_quant(x)
    wq, w_s = kernels.weight_quant(w.contiguous())
    # per-tensor and per-row operands for the other _scaled_mm recipes
    at, at_s = quant.quant_per_tensor(x)
    wt, wt_s = quant.quant_per_tensor(w)
    ar, ar_s = quant.quant_per_row(x)
    wr, wr_s = quant.quant_per_row(w)

    candidates = {
        "ours (triton, block)": lambda: kernels.fp8_gemm(aq, a_s, wq, w_s, out_dtype=torch.bfloat16),
        "bf16 matmul": lambda: torch.matmul(x, w.t()),
        "scaled_mm tensorwise": lambda: torch._scaled_mm(at, wt.t(), scale_a=at_s.float(), scale_b=wt_s.float(),
                                                         out_dtype=torch.bfloat16),
        "scaled_mm rowwise": lambda: torch._scaled_mm(ar, wr.t(), scale_a=ar_s.float(),
                                                      scale_b=wr_s.float().t(), out_dtype=torch.bfloat16),
        "scaled_mm blockwise": lambda: blockwise_scaled_mm(aq, a_s, wq, w_s),
    }
    flops = 2 * M * N * K
    row = {}
    for name, fn in candidates.items():
        try:
            err = rel_err(fn(), ref)
            if err > 0.1:
                raise RuntimeError(f"wrong result: relative error {err:.3f} vs bf16")
            row[name] = (flops / bench_ms(fn) / 1e9, err)
        except Exception as e:  # noqa: BLE001 - a missing peer is a table entry, not a crash
            row[name] = (None, str(e).splitlines()[0][:100] if str(e) else type(e).__name__)
    return row


def _ratio(row, ours, peer) -> str:
    a, b = row[ours][0], row[peer][0]
    return f"{a / b:.2f}x" if a and b else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help="M,N,K;M,N,K;... (default: the issue's four shapes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark")
        return 0
    cap = torch.cuda.get_device_capability()
    print(f"device: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    if cap < (8, 9):
        print("this GPU has no FP8 tensor cores (needs sm_89+): nothing to benchmark")
        return 0
    import triton

    from dsv3lib.fp8 import kernels

    print(f"triton {triton.__version__}")
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    bench_act_quant(kernels)

    names = None
    notes = []
    header_done = False
    for M, N, K in shapes:
        row = bench_gemm(kernels, M, N, K)
        if not header_done:
            names = list(row)
            print("\nGEMM TFLOP/s (rel. error vs bf16 in brackets); ratios = ours / peer")
            print(f"{'M x N x K':>18} | " + " | ".join(f"{n:>22}" for n in names) + " | ours/bf16 | ours/blockwise")
            header_done = True
        cells = []
        for n in names:
            tf, info = row[n]
            if tf is None:
                cells.append(f"{'n/a':>22}")
                notes.append(f"{M}x{N}x{K} {n}: {info}")
            else:
                cells.append(f"{tf:>12,.0f} ({info:.1e})")
        print(f"{f'{M} x {N} x {K}':>18} | " + " | ".join(cells) +
              f" | {_ratio(row, names[0], 'bf16 matmul'):>9} | {_ratio(row, names[0], 'scaled_mm blockwise'):>14}")
    for note in notes:
        print("  n/a:", note)
    print("targets (H200): ours >= 1.0x blockwise at M >= 4096; act_quant >= 0.80x copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
