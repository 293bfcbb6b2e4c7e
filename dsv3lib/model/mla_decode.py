"""Absorbed-MLA decoding over the latent cache: a torch reference and a Triton flash-decoding kernel
(chapter 2; DeepSeek-V2 report §2.1.2–2.1.3, ``attn_impl="absorb"`` in DeepSeek-V3's ``inference/model.py``).

With the key/value up-projection folded into the query and the output (see :mod:`dsv3lib.model.mla`),
one decoding step of every head attends over the *same* cached vectors: the latent c_KV (``kv_lora_rank``
numbers) plus the shared RoPE key k_R (``qk_rope_head_dim``). It is multi-query attention with a
576-d key (512 + 64) whose first 512 numbers are also the value. The whole step reads the cache once;
that read is the cost, so the kernel is judged by GB/s of cache read (``bench/mla.py``).

Shapes (B sequences, H heads, S cached positions, C = kv_lora_rank, R = qk_rope_head_dim):

    q_latent      (B, H, C)   the no-RoPE query of each head mapped into latent space (W_UK,iᵀ q_C,i)
    q_pe          (B, H, R)   the RoPE part of each head's query, already rotated
    latent_cache  (B, S, C)   normed c_KV of positions 0..S-1 (any strides; last dim contiguous)
    pe_cache      (B, S, R)   rotated k_R of the same positions
    lengths       (B,)        int, 1 ≤ lengths[b] ≤ S: sequence b attends to positions [0, lengths[b])
    returns       (B, H, C)   Σ_j softmax_j(scale·(q_latent·c_j + q_pe·k_R,j)) c_j, in q_latent's dtype

The kernel splits each sequence's context into ``n_splits`` slices (one program per sequence × head
block × slice), each keeping an online softmax and writing a partial output with its log-sum-exp; a
second small kernel merges the slices (flash-decoding, Dao et al. 2023). Logits, softmax and
accumulation run in fp32.
"""

from __future__ import annotations

import math

import torch

from ..dispatch import interpreting, use_triton

__all__ = ["mla_decode_ref", "mla_decode_triton", "mla_decode", "CONFIGS"]

try:  # Triton is optional: the reference runs anywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _check(q_latent, q_pe, latent_cache, pe_cache, lengths) -> None:
    B, H, C = q_latent.shape
    S, R = latent_cache.size(1), pe_cache.size(-1)
    if q_pe.shape != (B, H, R):
        raise ValueError(f"q_pe: expected {(B, H, R)}, got {tuple(q_pe.shape)}")
    if latent_cache.dim() != 3 or latent_cache.size(0) != B or latent_cache.size(2) != C:
        raise ValueError(f"latent_cache: expected (B={B}, S, C={C}), got {tuple(latent_cache.shape)}")
    if pe_cache.shape != (B, S, R):
        raise ValueError(f"pe_cache: expected {(B, S, R)}, got {tuple(pe_cache.shape)}")
    if lengths.shape != (B,) or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths: expected an integer tensor of shape ({B},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")


def mla_decode_ref(q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor,
                   pe_cache: torch.Tensor, lengths: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Plain-PyTorch absorbed decode step (the oracle; runs on any device). Shapes: module docstring."""
    _check(q_latent, q_pe, latent_cache, pe_cache, lengths)
    S = latent_cache.size(1)
    kv, pe = latent_cache.float(), pe_cache.float()
    scores = (torch.einsum("bhc,bsc->bhs", q_latent.float(), kv)
              + torch.einsum("bhr,bsr->bhs", q_pe.float(), pe)) * softmax_scale  # (B, H, S)
    beyond = torch.arange(S, device=scores.device) >= lengths.to(scores.device).view(-1, 1)  # (B, S)
    scores = scores.masked_fill(beyond.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1)  # fp32
    return torch.einsum("bhs,bsc->bhc", probs, kv).to(q_latent.dtype)


# ------------------------------------------------------------------------------------------- Triton
# Launch candidates (block_h, block_n, num_warps, num_stages) that bench/mla.py sweeps on a GPU; the
# host wrapper's defaults are a guess to be replaced by the sweep's winner. tl.dot needs every dimension
# ≥ 16, so heads are padded to a BLOCK_H ≥ 16 (masked).
CONFIGS = [
    (bh, bn, w, st)
    for bh in (16, 32, 64)
    for bn in (32, 64)
    for w in (4, 8)
    for st in (1, 2)
]

if triton is not None:

    @triton.jit
    def _mla_decode_split_kernel(
        QL, QP, KV, PE, LEN, O_PART, LSE_PART,
        H, S, C, R, split_len, sm_scale_log2,
        s_qlb, s_qlh, s_qpb, s_qph, s_kvb, s_kvs, s_peb, s_pes,
        s_ob, s_oh, s_os, s_lb, s_lh,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """One (sequence b, head block, context slice): online softmax over the slice's cached tokens."""
        b = tl.program_id(0)
        hb = tl.program_id(1)
        sp = tl.program_id(2)
        length = tl.load(LEN + b).to(tl.int32)
        start = sp * split_len
        stop = tl.minimum(start + split_len, length)

        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = tl.arange(0, BLOCK_N)
        mask_h = offs_h < H
        mask_c = offs_c < C
        mask_r = offs_r < R

        ql = tl.load(QL + b * s_qlb + offs_h[:, None] * s_qlh + offs_c[None, :],
                     mask=mask_h[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_H, BLOCK_C)
        qp = tl.load(QP + b * s_qpb + offs_h[:, None] * s_qph + offs_r[None, :],
                     mask=mask_h[:, None] & mask_r[None, :], other=0.0)  # (BLOCK_H, BLOCK_R)
        if DOT_FP32:
            ql = ql.to(tl.float32)
            qp = qp.to(tl.float32)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            n = n0 + offs_n
            mask_n = n < stop
            kv = tl.load(KV + b * s_kvb + n[:, None] * s_kvs + offs_c[None, :],
                         mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_N, BLOCK_C)
            pe = tl.load(PE + b * s_peb + n[:, None] * s_pes + offs_r[None, :],
                         mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
            if DOT_FP32:
                kv = kv.to(tl.float32)
                pe = pe.to(tl.float32)
                s = tl.dot(ql, tl.trans(kv), input_precision="ieee")
                s += tl.dot(qp, tl.trans(pe), input_precision="ieee")
            else:
                s = tl.dot(ql, tl.trans(kv)) + tl.dot(qp, tl.trans(pe))  # (BLOCK_H, BLOCK_N), fp32 acc
            s = tl.where(mask_n[None, :], s * sm_scale_log2, float("-inf"))  # logits in log2 units
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, kv, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
            m_i = m_new

        empty = l_i == 0.0  # a slice past this sequence's length
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(O_PART + b * s_ob + offs_h[:, None] * s_oh + sp * s_os + offs_c[None, :], o,
                 mask=mask_h[:, None] & mask_c[None, :])
        tl.store(LSE_PART + b * s_lb + offs_h * s_lh + sp, lse, mask=mask_h)

    @triton.jit
    def _mla_decode_combine_kernel(
        O_PART, LSE_PART, OUT, C, n_splits,
        s_ob, s_oh, s_os, s_lb, s_lh, s_outb, s_outh,
        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Merge the slices of one (sequence, head): weights 2^(lse_k − max lse), normalised."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        mask_s = offs_s < n_splits
        mask_c = offs_c < C
        lse = tl.load(LSE_PART + b * s_lb + h * s_lh + offs_s, mask=mask_s, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))  # (BLOCK_S,), 0 for empty slices
        w = w / tl.sum(w, 0)
        o = tl.load(O_PART + b * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_c[None, :],
                    mask=mask_s[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_S, BLOCK_C)
        out = tl.sum(o * w[:, None], 0)
        tl.store(OUT + b * s_outb + h * s_outh + offs_c, out.to(OUT.dtype.element_ty), mask=mask_c)


def _default_splits(B: int, n_head_blocks: int, S: int, block_n: int, device: torch.device) -> int:
    """Enough slices that B × head blocks × slices fills the GPU about twice, each ≥ 4 context blocks."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 8
    want = math.ceil(2 * sms / (B * n_head_blocks))
    return max(1, min(want, math.ceil(S / (4 * block_n))))


def mla_decode_triton(q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor,
                      pe_cache: torch.Tensor, lengths: torch.Tensor, softmax_scale: float, *,
                      block_h: int | None = None, block_n: int = 32, n_splits: int | None = None,
                      num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """Flash-decoding of one absorbed-MLA step with Triton. Same arguments and result as
    :func:`mla_decode_ref` (shapes in the module docstring), plus launch parameters.

    Args:
        block_h: heads per program (default min(32, next power of two ≥ H), at least 16); the cache
            block a program loads serves all of them, so the cache is read ⌈H / block_h⌉ times (the
            repeats mostly from L2, as the head blocks of one slice run side by side). The fp32
            accumulator is block_h × C (32 × 512 over 8 warps: 64 registers a thread).
        block_n: cached positions per loop step.
        n_splits: context slices per sequence (default: enough to fill the GPU, see ``_default_splits``).
    Returns:
        (B, H, C) in q_latent's dtype.
    """
    if triton is None:
        raise RuntimeError("mla_decode_triton: Triton is not installed")
    _check(q_latent, q_pe, latent_cache, pe_cache, lengths)
    for name, t in (("q_latent", q_latent), ("q_pe", q_pe), ("latent_cache", latent_cache), ("pe_cache", pe_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous, got strides {t.stride()}")
    B, H, C = q_latent.shape
    S, R = latent_cache.size(1), q_pe.size(-1)
    block_h = block_h or max(16, min(32, triton.next_power_of_2(H)))
    n_hb = triton.cdiv(H, block_h)
    n_splits = n_splits or _default_splits(B, n_hb, S, block_n, q_latent.device)
    split_len = triton.cdiv(triton.cdiv(S, n_splits), block_n) * block_n  # whole blocks per slice
    n_splits = triton.cdiv(S, split_len)
    lengths = lengths.to(device=q_latent.device, dtype=torch.int32)
    dot_fp32 = interpreting() or q_latent.dtype == torch.float32  # the interpreter's bf16 dot is wrong

    o_part = torch.empty(B, H, n_splits, C, dtype=torch.float32, device=q_latent.device)
    lse_part = torch.empty(B, H, n_splits, dtype=torch.float32, device=q_latent.device)
    _mla_decode_split_kernel[(B, n_hb, n_splits)](
        q_latent, q_pe, latent_cache, pe_cache, lengths, o_part, lse_part,
        H, S, C, R, split_len, softmax_scale * math.log2(math.e),
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_C=triton.next_power_of_2(C),
        BLOCK_R=max(16, triton.next_power_of_2(R)), DOT_FP32=dot_fp32,
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty(B, H, C, dtype=q_latent.dtype, device=q_latent.device)
    _mla_decode_combine_kernel[(B, H)](
        o_part, lse_part, out, C, n_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_C=triton.next_power_of_2(C),
    )
    return out


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor,
               pe_cache: torch.Tensor, lengths: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Dispatch: the Triton kernel where :func:`dsv3lib.dispatch.use_triton` says so (CUDA tensors by default),
    :func:`mla_decode_ref` elsewhere and whenever autograd needs a graph (the kernel has no backward)."""
    tensors = (q_latent, q_pe, latent_cache, pe_cache)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad and use_triton(q_latent, what="mla_decode_triton"):
        return mla_decode_triton(q_latent, q_pe, latent_cache, pe_cache, lengths, softmax_scale)
    return mla_decode_ref(q_latent, q_pe, latent_cache, pe_cache, lengths, softmax_scale)
