"""Benchmark dsv3lib.fp8's Triton kernels against peers measured in the same run (chapter 1).

    python bench/fp8.py            # on a CUDA GPU with FP8 tensor cores (sm_89+; goals are for an H200)
    python -m bench --only fp8     # the same rows inside the one-table run (bench/run_all.py)

* act_quant (1×128 tiles, bf16 in → fp8 + fp32 scales): bit-exact against ``quant.act_quant_ref``, then GB/s
  (bf16 read + fp8 and scales written) against a device copy of the same bf16 tensor (read + write).
  Goal: ≥ 80% of copy bandwidth.
* Block-scaled GEMM (A 1×128 tiles × B 128×128 blocks, FP32 promotion per 128 K): error against
  ``quant.fp8_gemm_ref`` on the same operands, then TFLOP/s against bf16 ``torch.matmul`` and ``torch._scaled_mm``
  with tensorwise, rowwise and — where this torch/cuBLAS has it — blockwise 1×128 × 128×128 scales (the same
  math as ours). Goals at M ≥ 4096: ≥ 1.0× blockwise cuBLAS and ≥ 1.5× bf16.

Every peer's result is checked against the bf16 product before it is timed; a peer this build cannot run is
"n/a" with the reason. Shapes are M×N×K (y = x Wᵀ with x (M, K), W (N, K)).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `dsv3lib` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Row, Timer, max_rel_err  # noqa: E402

SHAPES = [(4096, 7168, 2048), (4096, 2048, 7168), (8192, 8192, 8192), (64, 7168, 2048)]
DRY_SHAPES = [(64, 256, 256), (32, 128, 384)]
ACT_SHAPE, DRY_ACT_SHAPE = (16384, 7168), (64, 512)
# Our GEMM against the FP32 reference on the same FP8 operands: only summation order and the tensor cores'
# accumulation inside each 128-K block differ (V3 §3.3.2: Hopper keeps ~14 bits there), so far below 5e-3.
TOL_GEMM = 5e-3


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


def _randn(*shape, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)


def act_quant_row(kernels, timer: Timer, M: int, K: int) -> Row:
    from dsv3lib.fp8 import quant

    device = timer.device
    x = _randn(M, K, device=device, seed=1)
    row = Row("act_quant", f"{M}x{K} bf16", "GB/s", goal=">= 0.80x copy bandwidth")
    q, s = kernels.act_quant(x)
    qr, sr = quant.act_quant_ref(x)
    row.exact = torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    row.rel_err = max_rel_err(quant.act_dequant(q, s), quant.act_dequant(qr, sr))
    y = torch.empty_like(x)
    t_copy, t_q = timer(lambda: y.copy_(x)), timer(lambda: kernels.act_quant(x))
    n = x.numel()
    row.peers["copy"] = 2 * 2 * n / t_copy / 1e6  # read + write bf16
    row.ours = (2 * n + n + 4 * n // 128) / t_q / 1e6  # read bf16, write fp8 + fp32 scales
    row.set_ratio()
    row.extra.update(ms=t_q, copy_ms=t_copy)
    return row


def gemm_row(kernels, timer: Timer, M: int, N: int, K: int, judge: bool) -> Row:
    from dsv3lib.fp8 import quant

    device = timer.device
    x, w = _randn(M, K, device=device, seed=2), _randn(N, K, device=device, seed=3)
    ref_bf16 = x @ w.t()
    aq, a_s = kernels.act_quant(x)
    wq, w_s = kernels.weight_quant(w.contiguous())
    row = Row("fp8_gemm", f"{M}x{N}x{K}", "TFLOP/s", tol=TOL_GEMM,
              goal=">= 1.0x blockwise, >= 1.5x bf16" if M >= 4096 else "(decode shape: reported)")
    row.rel_err = max_rel_err(kernels.fp8_gemm(aq, a_s, wq, w_s), quant.fp8_gemm_ref(aq, a_s, wq, w_s))
    row.extra["rel_err_vs_bf16"] = max_rel_err(kernels.fp8_gemm(aq, a_s, wq, w_s, out_dtype=torch.bfloat16),
                                               ref_bf16)
    at, at_s = quant.quant_per_tensor(x)
    wt, wt_s = quant.quant_per_tensor(w)
    ar, ar_s = quant.quant_per_row(x)
    wr, wr_s = quant.quant_per_row(w)
    peers = {
        "bf16": lambda: torch.matmul(x, w.t()),
        "tensorwise": lambda: torch._scaled_mm(at, wt.t(), scale_a=at_s.float(), scale_b=wt_s.float(),
                                               out_dtype=torch.bfloat16),
        "rowwise": lambda: torch._scaled_mm(ar, wr.t(), scale_a=ar_s.float(), scale_b=wr_s.float().t(),
                                            out_dtype=torch.bfloat16),
        "blockwise": lambda: blockwise_scaled_mm(aq, a_s, wq, w_s),
    }
    flops = 2 * M * N * K
    row.ours = flops / timer(lambda: kernels.fp8_gemm(aq, a_s, wq, w_s, out_dtype=torch.bfloat16)) / 1e9
    for name, fn in peers.items():
        try:
            err = ((fn().float() - ref_bf16.float()).norm() / ref_bf16.float().norm()).item()
            if not err < 0.1:
                raise RuntimeError(f"wrong result: relative error {err:.3f} vs bf16")
            row.peers[name] = flops / timer(fn) / 1e9
        except Exception as e:  # noqa: BLE001 - a missing peer is a table entry, not a crash
            row.peers[name] = None
            row.notes.append(f"{name} n/a: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}")
    row.set_ratio()
    best = getattr(getattr(kernels, "fp8_gemm_kernel", None), "best_config", None)  # the autotuner's choice
    row.extra["config"] = str(best) if best is not None else None
    for peer in ("bf16", "blockwise"):
        if row.peers.get(peer):
            row.extra[f"vs_{peer}"] = row.ours / row.peers[peer]
    if judge and M >= 4096:
        checks = [row.extra.get("vs_bf16", 0) >= 1.5]
        if "vs_blockwise" in row.extra:
            checks.append(row.extra["vs_blockwise"] >= 1.0)
        else:
            row.notes.append("judged on bf16 alone: no blockwise cuBLAS peer in this build")
        row.met = all(checks)
    return row


def section(timer: Timer, dry: bool) -> list[Row]:
    """The FP8 rows: act_quant and the GEMM at each shape (tiny ones in Triton's interpreter for a dry run)."""
    from dsv3lib.fp8 import kernels

    rows = [act_quant_row(kernels, timer, *(DRY_ACT_SHAPE if dry else ACT_SHAPE))]
    if not dry:
        rows[0].met = rows[0].ratio is not None and rows[0].ratio >= 0.80
    for M, N, K in DRY_SHAPES if dry else SHAPES:
        rows.append(gemm_row(kernels, timer, M, N, K, judge=not dry))
    return rows


def main() -> int:
    from bench.common import print_table

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (python -m bench --dry-run runs these rows on the CPU)")
        return 0
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        print(f"this GPU (sm_{cap[0]}{cap[1]}) has no FP8 tensor cores (needs sm_89+): nothing to benchmark")
        return 0
    print_table(section(Timer(torch.device("cuda")), dry=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
