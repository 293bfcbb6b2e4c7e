"""Multi-token prediction module (chapters 0 and 4; V3 §2.2 eq. 21–23).

Depth k keeps the causal chain: at position i it combines the previous depth's representation h^{k-1}_i
with the embedding of the true token i+k, projects 2d → d, runs one transformer block and predicts token
i+k+1 through the output head it shares with the main model (the embedding is shared too; both are
passed in, not owned). The concatenation order [enorm(embedding) ; hnorm(hidden)] follows the released
checkpoint (``eh_proj``), the reverse of eq. 21's written order. h^0 is the main model's final-normed
hidden state, as in vLLM's DeepSeek MTP (the paper does not say pre or post norm).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .mla import KVCache, LatentCache
from .norm import RMSNorm

__all__ = ["MTPModule"]


class MTPModule(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)  # M_k
        self.block = Block(layer_id, cfg)  # a block like the main ones (MLA + MoE)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # the checkpoint's shared_head.norm

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, freqs_cis: torch.Tensor,
                start_pos: int = 0, cache: KVCache | LatentCache | None = None) -> torch.Tensor:
        """Args:
            h_prev: (B, T', dim) representation h^{k-1} at positions 0..T'-1.
            emb_next: (B, T', dim) embeddings of tokens k..k+T'-1.
        Returns:
            (B, T', dim) final-normed h^k, ready for the shared output head.
        """
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # eq. 21
        h = self.block(h, start_pos, freqs_cis, cache)  # eq. 22
        return self.norm(h)
