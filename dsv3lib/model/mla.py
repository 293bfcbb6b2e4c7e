"""Multi-head Latent Attention, the naive (expanded per-head) form (chapters 0 and 2; V3 §2.1.1 eq. 1–11).

Queries go through a low-rank path (``wq_a`` → ``q_norm`` → ``wq_b``); keys and values are compressed
jointly into a ``kv_lora_rank`` latent c_KV (``wkv_a`` → ``kv_norm``) and expanded per head by ``wkv_b``.
A separate ``qk_rope_head_dim`` key, produced by ``wkv_a`` next to the latent, carries RoPE and is shared
by all heads (the "decoupled" key). This file expands K and V per head, like training does; chapter 2
adds the absorbed form that caches only the latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary_emb

__all__ = ["MLA", "KVCache", "causal_mask"]


@dataclass
class KVCache:
    """Per-layer cache of expanded keys and values, preallocated to ``max_len`` positions.

    Positions ``[0, start_pos)`` must have been written by earlier calls; a later call with a smaller
    ``start_pos`` simply overwrites (that is how speculative decoding rolls back).
    """

    k: torch.Tensor  # (B, max_len, n_heads, qk_head_dim)
    v: torch.Tensor  # (B, max_len, n_heads, v_head_dim)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        return cls(
            k=torch.zeros(batch_size, max_len, cfg.n_heads, cfg.qk_head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch_size, max_len, cfg.n_heads, cfg.v_head_dim, dtype=dtype, device=device),
        )

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def causal_mask(t_new: int, start_pos: int, device=None) -> torch.Tensor | None:
    """Additive mask (t_new, start_pos + t_new): query i (at position start_pos + i) sees keys ≤ its own."""
    if t_new == 1:
        return None  # one query sees the whole prefix
    mask = torch.full((t_new, start_pos + t_new), float("-inf"), device=device)
    return mask.triu_(start_pos + 1)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = cfg.softmax_scale

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) → (B, T, n_heads, qk_head_dim), RoPE not yet applied."""
        q = self.wq(x) if self.cfg.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        return q.view(*x.shape[:2], self.n_heads, self.qk_head_dim)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """Args:
            x: (B, T, dim) hidden states of positions [start_pos, start_pos + T).
            start_pos: position of x[:, 0]; with a cache, positions before it are read from the cache.
            freqs_cis: (T, qk_rope_head_dim/2) rotations for those positions.
            cache: optional KVCache written at [start_pos, start_pos + T).
        Returns:
            (B, T, dim).
        """
        B, T, _ = x.shape
        q = self.project_q(x)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)  # per-head RoPE queries (eq. 8)

        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)  # (B, T, 1, rope): one key for all heads (eq. 3)
        kv = self.wkv_b(self.kv_norm(kv)).view(B, T, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, qk_head_dim), eq. 9
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)  # eq. 4

        if cache is not None:
            end = start_pos + T
            cache.k[:B, start_pos:end] = k
            cache.v[:B, start_pos:end] = v
            k, v = cache.k[:B, :end], cache.v[:B, :end]
        elif start_pos != 0:
            raise ValueError(f"start_pos: {start_pos} needs a cache holding the earlier positions")

        mask = causal_mask(T, k.size(1) - T, x.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask.to(q.dtype), scale=self.softmax_scale,
        )  # (B, H, T, v_head_dim)
        return self.wo(out.transpose(1, 2).flatten(2))
