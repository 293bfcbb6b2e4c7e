"""One transformer block: MLA attention, then a dense FFN or an MoE layer (chapter 0; V3 §2).

Used by the main model (:class:`~dsv3lib.model.transformer.Transformer`) and by each MTP module
(:class:`~dsv3lib.model.mtp.MTPModule`), so both import it from here; pipeline stages (chapter 5) are
slices of the Transformer's own blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .mla import MLA, KVCache, LatentCache
from .moe import MLP, MoE
from .norm import RMSNorm

__all__ = ["Block"]


class Block(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then + ffn(ffn_norm(x)); dense FFN in the first layers."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                cache: KVCache | LatentCache | None = None) -> torch.Tensor:
        """x: (B, T, dim) at positions [start_pos, start_pos + T); the cache, if any, is written there."""
        x = x + self.attn(self.attn_norm(x), start_pos, freqs_cis, cache)
        return x + self.ffn(self.ffn_norm(x))
