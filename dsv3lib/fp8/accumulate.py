"""A model of the FP8 tensor core's limited-precision accumulator, and the paper's fix (chapter 1).

V3 §3.3.2 and §3.5.2: the H800's FP8 MMA aligns a group of products to the largest exponent, keeps
about 14 bits of each (right shifts drop the rest) and accumulates at that width, so a K=4096 GEMM can
be off by ~2%. DeepSeek's fix: every N_C = 128 K-elements (4 WGMMAs) copy the partial sum to FP32
registers on CUDA cores and start over. ISCA'25 §3.1.1 describes the accumulator as FP22 (1 sign,
8 exponent, 13 fraction bits), which is the default here.

The model (vectorised over rows, float64 inside so only the modelled roundings happen):
  for each group of ``group`` products (one MMA step along K):
    e   = exponent of the largest magnitude among the group's products and the running sum
    ulp = 2^(e − man_bits)                    # what survives the alignment shift
    sum = trunc(sum / ulp)·ulp + Σ trunc(p / ulp)·ulp
  with promotion: every ``promote_every`` products, fp32_acc = fp32(fp32_acc + sum); sum = 0.
"""

from __future__ import annotations

import torch

__all__ = ["tensor_core_dot", "accumulation_experiment"]


def _trunc_to(x: torch.Tensor, ulp: torch.Tensor) -> torch.Tensor:
    return torch.trunc(x / ulp) * ulp  # toward zero: a right shift of the aligned significand


def tensor_core_dot(a: torch.Tensor, b: torch.Tensor, *, man_bits: int = 13, group: int = 32,
                    promote_every: int | None = None) -> torch.Tensor:
    """Row-wise dot products ``(a * b).sum(-1)`` as the modelled tensor core computes them.

    Args:
        a, b: (M, K) values (typically already on the FP8 grid, so each product is exact).
        man_bits: fraction bits the accumulator keeps after alignment (13 ⇒ 14 significant bits).
        group: products aligned and added in one step (32 for an FP8 WGMMA's K).
        promote_every: N_C; ``None`` accumulates all of K in limited precision.
    Returns:
        (M,) float64 results.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"tensor_core_dot: a and b must both be (M, K), got {tuple(a.shape)}, {tuple(b.shape)}")
    M, K = a.shape
    if K % group or (promote_every is not None and promote_every % group):
        raise ValueError(f"tensor_core_dot: K={K} and promote_every={promote_every} must be multiples of group={group}")
    p = a.double() * b.double()  # (M, K)
    run = torch.zeros(M, dtype=torch.float64, device=a.device)  # limited-precision running sum
    out = torch.zeros(M, dtype=torch.float32, device=a.device)  # FP32 registers on the CUDA cores
    for k0 in range(0, K, group):
        chunk = p[:, k0:k0 + group]  # (M, group)
        big = torch.maximum(chunk.abs().amax(dim=1), run.abs())
        _, e = torch.frexp(big)  # big = m·2^e, 0.5 <= m < 1 ⇒ leading bit 2^(e-1)
        ulp = torch.ldexp(torch.ones_like(big), e - 1 - man_bits)
        ulp = torch.where(big > 0, ulp, torch.ones_like(ulp))
        run = _trunc_to(run, ulp) + _trunc_to(chunk, ulp[:, None]).sum(dim=1)
        if promote_every is not None and (k0 + group) % promote_every == 0:
            out = (out.double() + run).float()
            run = torch.zeros_like(run)
    if promote_every is None:
        return run
    return (out.double() + run).float().double()


def accumulation_experiment(K: int = 4096, M: int = 256, *, man_bits: int = 13, group: int = 32,
                            promote_every: int | None = 128, seed: int = 0) -> dict[str, float]:
    """Max and mean relative error of :func:`tensor_core_dot` against the exact (float64) dot.

    Inputs are |N(0,1)| rounded to E4M3 — positive, so the running sum grows and the bits it drops
    matter most (the worst case the paper's "up to ~2%" describes). Returns ``max_rel``, ``mean_rel``.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).abs().to(torch.float8_e4m3fn).float()
    b = torch.randn(M, K, generator=g).abs().to(torch.float8_e4m3fn).float()
    exact = (a.double() * b.double()).sum(dim=1)
    got = tensor_core_dot(a, b, man_bits=man_bits, group=group, promote_every=promote_every)
    rel = ((got - exact).abs() / exact.abs()).float()
    return {"max_rel": rel.max().item(), "mean_rel": rel.mean().item()}
