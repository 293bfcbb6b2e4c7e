"""Multi-head Latent Attention in two forms over the same weights (chapters 0 and 2; V3 §2.1.1 eq. 1–11).

Queries go through a low-rank path (``wq_a`` → ``q_norm`` → ``wq_b``); keys and values are compressed
jointly into a ``kv_lora_rank`` latent c_KV (``wkv_a`` → ``kv_norm``) and expanded per head by ``wkv_b``.
A separate ``qk_rope_head_dim`` key, produced by ``wkv_a`` next to the latent, carries RoPE and is shared
by all heads (the "decoupled" key).

- :meth:`MLA.naive` expands K and V per head (``wkv_b``) and attends like multi-head attention; with a
  :class:`KVCache` it caches the expanded K and V (n_heads·(qk_head_dim + v_head_dim) numbers per token).
- :meth:`MLA.absorbed` never expands: since q_C,iᵀ(W_UK,i c) = (W_UK,iᵀ q_C,i)ᵀ c, each head's no-RoPE query
  is mapped into latent space, scored against the cached latent, the softmax mixes cached latents, and
  only the mix is mapped out by W_UV,i (then ``wo``). With a :class:`LatentCache` it caches the normed
  c_KV and the rotated k_R: (kv_lora_rank + qk_rope_head_dim) numbers per token (V3: 576, ≈ 71× less
  than the expanded 40,960). DeepSeek-V2 report §2.1.2–2.1.3; ``attn_impl="absorb"`` in V3's inference code.

``MLA.forward`` follows the cache it is given (``LatentCache`` → absorbed, ``KVCache`` → naive). Without a
cache (training, scoring a whole sequence) it runs naive: for T tokens the expanded form's attention costs
T²·H·(qk_head_dim + v_head_dim) multiply-adds against T²·H·(2·kv_lora_rank + qk_rope_head_dim) absorbed
(V3: 320 vs 1088 per pair), while the expansion itself is linear in T. For one new token over a long cache
the balance flips: reading 576 numbers per cached token instead of 40,960 is what makes decoding fast.
A one-token absorbed step calls :func:`~dsv3lib.model.mla_decode.mla_decode` (a Triton kernel on CUDA).
``ModelConfig.attn_impl`` picks which cache ``Transformer.new_cache`` (via :func:`new_layer_cache`) builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .mla_decode import mla_decode
from .norm import RMSNorm
from .rope import apply_rotary_emb

__all__ = ["MLA", "KVCache", "LatentCache", "new_layer_cache", "causal_mask"]


class _CacheSizes:
    """Sizes shared by the cache kinds; each stores a tensor ``k`` of shape (B, max_len, ...)."""

    k: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.k.size(0)

    @property
    def max_len(self) -> int:
        return self.k.size(1)

    @property
    def bytes_per_token(self) -> int:
        """Bytes per cached token of this one layer."""
        return self.nbytes // (self.batch_size * self.max_len)


@dataclass
class KVCache(_CacheSizes):
    """Per-layer cache of expanded keys and values (naive MLA), preallocated to ``max_len`` positions.

    Positions ``[0, start_pos)`` must have been written by earlier calls; a later call with a smaller
    ``start_pos`` simply overwrites (that is how speculative decoding rolls back).
    """

    k: torch.Tensor  # (B, max_len, n_heads, qk_head_dim)
    v: torch.Tensor  # (B, max_len, n_heads, v_head_dim)
    filled: int = 0  # positions [0, filled) have been written (Transformer keeps it; start_pos may not pass it)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        return cls(
            k=torch.zeros(batch_size, max_len, cfg.n_heads, cfg.qk_head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch_size, max_len, cfg.n_heads, cfg.v_head_dim, dtype=dtype, device=device),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held (all batch_size × max_len slots); per token: n_heads·(qk_head_dim + v_head_dim)·size."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass
class LatentCache(_CacheSizes):
    """Per-layer cache of absorbed MLA: per token, the normed latent c_KV and the rotated shared key k_R.

    Both live in one buffer ``k`` of width kv_lora_rank + qk_rope_head_dim, because that is what absorbed
    MLA is: multi-query attention whose single key is [c_KV ; k_R] (576-d in V3) and whose value is c_KV,
    the key's first kv_lora_rank numbers (``v`` is a view, no extra bytes). Same write/rollback rules as
    :class:`KVCache`.
    """

    k: torch.Tensor  # (B, max_len, kv_lora_rank + qk_rope_head_dim): [c_KV ; k_R]
    kv_lora_rank: int
    filled: int = 0  # positions [0, filled) have been written (as KVCache.filled)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return cls(torch.zeros(batch_size, max_len, width, dtype=dtype, device=device), cfg.kv_lora_rank)

    @property
    def latent(self) -> torch.Tensor:
        """(B, max_len, kv_lora_rank) view: normed c_KV (the value, and the key's no-RoPE part)."""
        return self.k[..., : self.kv_lora_rank]

    v = latent

    @property
    def pe(self) -> torch.Tensor:
        """(B, max_len, qk_rope_head_dim) view: the RoPE-rotated shared key k_R."""
        return self.k[..., self.kv_lora_rank:]

    @property
    def nbytes(self) -> int:
        """Bytes held (all batch_size × max_len slots); per token: (kv_lora_rank + qk_rope_head_dim)·size."""
        return self.k.numel() * self.k.element_size()


def new_layer_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                    attn_impl: str | None = None) -> KVCache | LatentCache:
    """An empty one-layer cache of the kind ``attn_impl`` (default ``cfg.attn_impl``) attends with."""
    attn_impl = cfg.attn_impl if attn_impl is None else attn_impl
    if attn_impl == "absorb":
        return LatentCache.empty(cfg, batch_size, max_len, dtype, device)
    if attn_impl == "naive":
        return KVCache.empty(cfg, batch_size, max_len, dtype, device)
    raise ValueError(f"attn_impl: must be 'absorb' or 'naive', got {attn_impl!r}")


def causal_mask(t_new: int, start_pos: int, device=None) -> torch.Tensor | None:
    """Additive mask (t_new, start_pos + t_new): query i (at position start_pos + i) sees keys ≤ its own."""
    if t_new == 1:
        return None  # one query sees the whole prefix
    mask = torch.full((t_new, start_pos + t_new), float("-inf"), device=device)
    return mask.triu_(start_pos + 1)


class MLA(nn.Module):
    """One MLA layer; :meth:`naive` and :meth:`absorbed` share its weights (module docstring)."""

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

    def queries(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope (B, T, H, qk_nope_head_dim), q_pe (B, T, H, qk_rope_head_dim) rotated; eq. 7–8)."""
        q_nope, q_pe = self.project_q(x).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary_emb(q_pe, freqs_cis)

    def latent(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a token contributes to the cache: (normed c_KV (B, T, kv_lora_rank), rotated k_R
        (B, T, qk_rope_head_dim)); eq. 1 and 3, kv_norm on the latent only."""
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis).squeeze(2)  # one key for all heads
        return self.kv_norm(kv), k_pe

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``wkv_b`` split per head: (W_UK (H, qk_nope_head_dim, C), W_UV (H, v_head_dim, C)), C = kv_lora_rank."""
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                cache: KVCache | LatentCache | None = None) -> torch.Tensor:
        """Absorbed with a :class:`LatentCache`, naive otherwise (module docstring). Args as :meth:`naive`."""
        if isinstance(cache, LatentCache):
            return self.absorbed(x, start_pos, freqs_cis, cache)
        return self.naive(x, start_pos, freqs_cis, cache)

    def naive(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
              cache: KVCache | None = None) -> torch.Tensor:
        """Attention over per-head expanded keys and values.

        Args:
            x: (B, T, dim) hidden states of positions [start_pos, start_pos + T).
            start_pos: position of x[:, 0]; with a cache, positions before it are read from the cache.
            freqs_cis: (T, qk_rope_head_dim/2) rotations for those positions.
            cache: optional KVCache written at [start_pos, start_pos + T).
        Returns:
            (B, T, dim).
        """
        B, T, _ = x.shape
        q_nope, q_pe = self.queries(x, freqs_cis)
        latent, k_pe = self.latent(x, freqs_cis)
        kv = self.wkv_b(latent).view(B, T, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, qk_head_dim), eq. 9
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)  # eq. 4

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

    def absorbed(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                 cache: LatentCache | None = None) -> torch.Tensor:
        """Attention in latent space, ``wkv_b`` folded into query and output. Same args/result as
        :meth:`naive` with a :class:`LatentCache`; logits and softmax in fp32."""
        B, T, _ = x.shape
        q_nope, q_pe = self.queries(x, freqs_cis)  # (B, T, H, nope), (B, T, H, rope)
        latent, k_pe = self.latent(x, freqs_cis)  # (B, T, C), (B, T, rope)
        w_uk, w_uv = self.up_weights()  # (H, nope, C), (H, v, C)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # W_UK,iᵀ q_C,i: (B, T, H, C)

        if cache is not None:
            end = start_pos + T
            cache.latent[:B, start_pos:end] = latent
            cache.pe[:B, start_pos:end] = k_pe
            latent, k_pe = cache.latent[:B, :end], cache.pe[:B, :end]  # (B, S, C), (B, S, rope)
        elif start_pos != 0:
            raise ValueError(f"start_pos: {start_pos} needs a cache holding the earlier positions")
        S = latent.size(1)

        if T == 1:  # decoding: one query per sequence over the whole cache (Triton on CUDA)
            lengths = torch.full((B,), S, dtype=torch.int32, device=x.device)
            o = mla_decode(q_lat[:, 0], q_pe[:, 0], latent, k_pe, lengths, self.softmax_scale).unsqueeze(1)
        else:  # prefill / verify: T queries, causal
            kv = latent.float()
            scores = (torch.einsum("bthc,bsc->bths", q_lat.float(), kv)
                      + torch.einsum("bthr,bsr->bths", q_pe.float(), k_pe.float())) * self.softmax_scale
            scores = scores + causal_mask(T, S - T, x.device).view(1, T, 1, S)
            o = torch.einsum("bths,bsc->bthc", scores.softmax(dim=-1), kv).to(x.dtype)  # (B, T, H, C)
        out = torch.einsum("bthc,hdc->bthd", o, w_uv)  # W_UV,i per head: (B, T, H, v_head_dim)
        return self.wo(out.flatten(2))
