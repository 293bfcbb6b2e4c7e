"""Autoregressive generation with the KV cache: greedy, temperature and top-p sampling (chapter 0).

The cache is the latent (absorbed) one of chapter 2 unless the config says ``attn_impl="naive"``;
chapter 4's speculative decoding (:mod:`dsv3lib.speculative`) reproduces this greedy output exactly.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from .model import Transformer, eval_mode
from .model.transformer import check_index as _check_int

__all__ = ["generate", "sample_next", "top_p_filter", "check_sampling"]


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ``ValueError``/``TypeError`` naming the knob unless 0 ≤ temperature < ∞ and 0 < top_p ≤ 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: must be a number, got {temperature!r}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature: must be finite and >= 0 (0 = greedy), got {temperature}")
    _check_top_p(top_p)


def _check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"top_p: must be a number, got {top_p!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p``; renormalise.

    Args:
        probs: (B, V) probabilities.
    """
    _check_top_p(top_p)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # probability mass strictly above each token
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax if temperature == 0."""
    check_sampling(temperature, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return _multinomial(probs, generator).squeeze(-1)


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.multinomial(probs, 1)``, whose error for NaN/inf probabilities names the logits behind them."""
    try:
        return torch.multinomial(probs, 1, generator=generator)
    except RuntimeError as err:
        if "probability tensor" not in str(err):
            raise
        raise ValueError("logits: contain NaN or inf (or the temperature is too small for them); "
                         "cannot sample from them") from None


def _as_batch(prompt: Sequence[int] | torch.Tensor, model: Transformer) -> torch.Tensor:
    """The prompt as (B, T) long ids on the model's device; lists and NumPy arrays of ints are converted,
    anything else (floats, bools, strings, ragged lists, no tokens) raises naming ``prompt``."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a dsv3lib Transformer, got {type(model).__name__}")
    if isinstance(prompt, (str, bytes)) or prompt is None:
        raise TypeError(f"prompt: expected token ids (list, array or tensor of ints), got {type(prompt).__name__}")
    try:
        tokens = torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"prompt: not a (seq,) or (batch, seq) array of token ids ({err})") from None
    if tokens.numel() and (tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex()):
        raise TypeError(f"prompt: expected integer token ids, got {tokens.dtype}")
    tokens = tokens.to(device=model.embed.weight.device, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"prompt: expected a non-empty (seq,) or (batch, seq) sequence, got {tuple(tokens.shape)}")
    return tokens  # ids outside the vocabulary: the model's check_tokens names them


def _check_eos(eos_id: int | None, vocab_size: int) -> None:
    if eos_id is not None and _check_int(eos_id, "eos_id", 0) >= vocab_size:
        raise ValueError(f"eos_id: {eos_id} is outside the vocabulary [0, {vocab_size})")


def _check_seed(seed: int | None) -> None:
    if seed is not None:
        _check_int(seed, "seed", -2**63)


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             use_cache: bool = True, eos_id: int | None = None) -> torch.Tensor:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens.

    Args:
        prompt: (T,) or (B, T) integer token ids (a tensor, list or NumPy array); all rows share the length T.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling threshold (1.0 = off).
        seed: seeds a private generator, so sampling is reproducible without touching global RNG.
        use_cache: False recomputes the whole prefix each step (the oracle the cache is tested against).
        eos_id: stop once every row has produced this token.
    Returns:
        (B, T + n) prompt and generated tokens, n ≤ max_new_tokens.
    """
    max_new_tokens = _check_int(max_new_tokens, "max_new_tokens", 0)
    check_sampling(temperature, top_p)
    tokens = _as_batch(prompt, model)
    _check_eos(eos_id, model.cfg.vocab_size)
    _check_seed(seed)
    device = tokens.device
    total = tokens.size(1) + max_new_tokens
    if tokens.size(1) > model.cfg.max_seq_len:
        raise ValueError(f"prompt: {tokens.size(1)} tokens exceed max_seq_len={model.cfg.max_seq_len}")
    if total > model.cfg.max_seq_len:
        raise ValueError(f"max_new_tokens: prompt {tokens.size(1)} + {max_new_tokens} new tokens exceed "
                         f"max_seq_len={model.cfg.max_seq_len}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(model):
        cache = model.new_cache(tokens.size(0), total) if use_cache else None
        done = torch.zeros(tokens.size(0), dtype=torch.bool, device=device)
        pos = 0  # first position not yet in the cache
        for _ in range(max_new_tokens):
            if use_cache:
                logits = model(tokens[:, pos:], pos, cache).logits[:, -1]
                pos = tokens.size(1)
            else:
                logits = model(tokens, mtp=False).logits[:, -1]
            nxt = sample_next(logits, temperature, top_p, gen)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
            if eos_id is not None and bool(done.all()):
                break
    return tokens
