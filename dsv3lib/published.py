"""Attention configurations of published peer models, as data, for KV-cache comparisons (chapter 2).

ISCA'25 (arXiv 2505.09343) Table 1 compares DeepSeek-V3's cache per token with two dense models that
use grouped-query attention. Their fields below are copied from each model's released Hugging Face
``config.json`` (meta-llama/Llama-3.1-405B, Qwen/Qwen2.5-72B); only what attention arithmetic needs.
DeepSeek-V3 itself is ``ModelConfig.preset("deepseek-v3")``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .accounting import kv_cache_bytes_per_token_gqa

__all__ = ["AttentionConfig", "PUBLISHED", "gqa_kv_bytes_per_token"]


@dataclass(frozen=True)
class AttentionConfig:
    """Multi-head attention with ``n_kv_heads`` key/value heads shared by groups of query heads
    (n_kv_heads = n_heads: MHA; 1: MQA; in between: GQA)."""

    name: str
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads (query heads)
    n_kv_heads: int  # num_key_value_heads
    head_dim: int  # hidden_size / num_attention_heads
    max_seq_len: int  # max_position_embeddings

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}")


PUBLISHED: dict[str, AttentionConfig] = {
    "llama-3.1-405b": AttentionConfig("Llama-3.1-405B", dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                                      head_dim=128, max_seq_len=131072),
    "qwen2.5-72b": AttentionConfig("Qwen2.5-72B", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                   head_dim=128, max_seq_len=32768),  # the model card enables YaRN ×4 for 131,072
}


def gqa_kv_bytes_per_token(cfg: AttentionConfig, bytes_per_element: int = 2) -> int:
    """K and V of every layer for one token: 2·n_layers·n_kv_heads·head_dim·bytes (ISCA Table 1, BF16:
    Llama-3.1-405B 516,096 B, Qwen2.5-72B 327,680 B)."""
    return kv_cache_bytes_per_token_gqa(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, bytes_per_element)
