"""Single-device reference DeepSeek-V3 in plain PyTorch (chapter 0)."""

from .block import Block
from .mla import MLA, KVCache, LatentCache, new_layer_cache
from .modes import eval_mode
from .moe import MLP, Gate, MoE, Routing
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import apply_rotary_emb, precompute_freqs_cis, rope_frequencies
from .transformer import ModelOutput, Transformer, mtp_loss

__all__ = [
    "MLA", "KVCache", "LatentCache", "new_layer_cache", "MLP", "Gate", "MoE", "Routing", "MTPModule", "RMSNorm",
    "apply_rotary_emb",
    "precompute_freqs_cis", "rope_frequencies", "Block", "ModelOutput", "Transformer", "mtp_loss", "eval_mode",
]
