"""Rotary position embedding in DeepSeek's interleaved (complex-pair) form, with YaRN (chapters 0 and 2).

Dimensions (2i, 2i+1) of the RoPE part form one complex number that is rotated by position·θ_i, as in
the official ``inference/model.py``. YaRN (Peng et al. 2023, arXiv 2309.00071; V3 §4.3) stretches only
the low frequencies: dimensions that rotate fewer than ``beta_slow`` times over the original context are
divided by ``rope_factor``, those rotating more than ``beta_fast`` times are kept, with a linear ramp
between. The matching attention-temperature correction lives in ``ModelConfig.softmax_scale``.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig

__all__ = ["rope_frequencies", "precompute_freqs_cis", "apply_rotary_emb"]


def _correction_dim(n_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """The (fractional) pair index whose wavelength fits ``n_rotations`` times into ``max_seq_len``."""
    return dim * math.log(max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Angular frequency θ_i of each of the ``qk_rope_head_dim/2`` pairs, YaRN-corrected if active."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
    if not cfg.yarn_active:
        return freqs.float()
    low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 for high-frequency pairs (kept), 0 for low-frequency pairs (interpolated)
    freqs = freqs / cfg.rope_factor * (1 - keep) + freqs * keep
    return freqs.float()


def precompute_freqs_cis(cfg: ModelConfig) -> torch.Tensor:
    """Unit complex rotations e^{i·t·θ_j} for every position t < max_seq_len: (max_seq_len, rope_dim/2)."""
    freqs = rope_frequencies(cfg)
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)  # complex64


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dimension.

    Args:
        x: (B, T, H, rope_dim) real tensor.
        freqs_cis: (T, rope_dim/2) complex rotations for the positions of x.
    Returns:
        Tensor of x's shape and dtype.
    """
    xc = torch.view_as_complex(x.float().contiguous().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, rope_dim/2)
    rotated = xc * freqs_cis.view(1, xc.size(1), 1, xc.size(-1))
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
