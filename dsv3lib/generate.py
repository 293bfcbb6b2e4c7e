"""Autoregressive generation with the KV cache: greedy, temperature and top-p sampling (chapter 0).

The cache is the latent (absorbed) one of chapter 2 unless the config says ``attn_impl="naive"``;
chapter 4's speculative decoding (:mod:`dsv3lib.speculative`) reproduces this greedy output exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .model import Transformer, eval_mode

__all__ = ["generate", "sample_next", "top_p_filter"]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p``; renormalise.

    Args:
        probs: (B, V) probabilities.
    """
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
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_batch(prompt: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    tokens = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.size(1) == 0:
        raise ValueError(f"prompt: expected a non-empty (seq,) or (batch, seq) sequence, got {tuple(tokens.shape)}")
    return tokens


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             use_cache: bool = True, eos_id: int | None = None) -> torch.Tensor:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens.

    Args:
        prompt: (T,) or (B, T) token ids; all rows share the length T.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling threshold (1.0 = off).
        seed: seeds a private generator, so sampling is reproducible without touching global RNG.
        use_cache: False recomputes the whole prefix each step (the oracle the cache is tested against).
        eos_id: stop once every row has produced this token.
    Returns:
        (B, T + n) prompt and generated tokens, n ≤ max_new_tokens.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    device = model.embed.weight.device
    tokens = _as_batch(prompt, device)
    total = tokens.size(1) + max_new_tokens
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
