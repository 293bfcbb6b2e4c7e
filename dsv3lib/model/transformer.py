"""The DeepSeek-V3 Transformer: embedding, MLA + FFN/MoE blocks, final norm, output head, MTP modules.

A single-device reference in plain PyTorch (chapter 0). Parallelism, FP8 and compilation are applied
to it as transforms in later chapters, so this file stays readable next to the official
``inference/model.py`` of deepseek-ai/DeepSeek-V3.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .block import Block
from .dtypes import keep_dtype
from .mla import KVCache, LatentCache, new_layer_cache
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import precompute_freqs_cis

__all__ = ["Transformer", "ModelOutput", "mtp_forward", "mtp_loss", "check_index"]  # Block: see .block


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab): position t predicts token t+1
    mtp_logits: list[torch.Tensor]  # depth k: (B, T-k, vocab), position i predicts token i+k+1


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg: expected a ModelConfig (ModelConfig.preset, from_dict), got {type(cfg).__name__}")
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.n_mtp_modules))
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg), persistent=False)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # the RoPE table stays complex64 (a cast to a real dtype would drop its imaginary part)
        return super()._apply(keep_dtype(fn, torch.Tensor.is_complex), recurse)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix (V3 §4.2), ones for norms, zeros for gate biases."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.cfg.init_std)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
        for name, b in self.named_buffers():
            if name.endswith("gate.bias"):
                b.zero_()

    def new_cache(self, batch_size: int, max_len: int | None = None, *,
                  mtp: bool = False) -> list[KVCache | LatentCache]:
        """One cache per main-model layer (or, with ``mtp=True``, per MTP module), in the dtype and on
        the device of the weights. Speculative decoding (chapter 4) keeps both kinds. The kind follows
        ``cfg.attn_impl``: a :class:`LatentCache` ("absorb", the default; chapter 2) or a
        :class:`KVCache` of expanded keys and values ("naive"); each MLA attends the way its cache needs."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        check_index(batch_size, "batch_size", 1)
        if check_index(max_len, "max_len", 1) > self.cfg.max_seq_len:
            raise ValueError(f"max_len: {max_len} must be in [1, max_seq_len={self.cfg.max_seq_len}]")
        w = self.embed.weight
        n = len(self.mtp) if mtp else len(self.layers)
        return [new_layer_cache(self.cfg, batch_size, max_len, w.dtype, w.device) for _ in range(n)]

    def check_tokens(self, tokens: torch.Tensor, start_pos: int,
                     cache: list[KVCache | LatentCache] | None) -> int:
        """Raise ``TypeError``/``ValueError`` naming the argument unless ``forward(tokens, start_pos, cache)``
        is well formed: (B, T) integer ids in the vocabulary, positions within max_seq_len and the cache, a
        cache built for this model (:meth:`check_cache`) whose positions before ``start_pos`` are written.
        Returns ``start_pos`` as an int."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens: expected a (batch, seq) torch.Tensor of ids, got {type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.size(1) == 0:
            raise ValueError("tokens: empty sequence (T=0)")
        if tokens.size(0) == 0:
            raise ValueError("tokens: empty batch (B=0)")
        if tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"tokens: expected an integer tensor, got {tokens.dtype}")
        if tokens.device != self.embed.weight.device:
            raise ValueError(f"tokens: on {tokens.device}, the model on {self.embed.weight.device}")
        start_pos = check_index(start_pos, "start_pos", 0)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.vocab_size)][0].item()
            raise ValueError(f"tokens: id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        end = start_pos + tokens.size(1)
        if end > self.cfg.max_seq_len:
            raise ValueError(f"tokens: positions [{start_pos}, {end}) exceed max_seq_len={self.cfg.max_seq_len}")
        if cache is None:
            return start_pos
        self.check_cache(cache, tokens.device)
        if end > cache[0].k.size(1):
            raise ValueError(f"tokens: positions [{start_pos}, {end}) exceed the cache's max_len={cache[0].k.size(1)}")
        if tokens.size(0) > cache[0].k.size(0):
            raise ValueError(f"tokens: batch {tokens.size(0)} exceeds the cache's {cache[0].k.size(0)}")
        if start_pos > cache[0].filled:
            raise ValueError(f"start_pos: {start_pos} is past the {cache[0].filled} positions written to the cache; "
                             "attention would read empty slots")
        return start_pos

    def check_cache(self, cache: list[KVCache | LatentCache], device: torch.device | None = None) -> None:
        """Raise naming ``cache`` unless it is one cache per layer of the shapes :meth:`new_cache` builds."""
        if not isinstance(cache, (list, tuple)):
            raise TypeError(f"cache: expected the list that new_cache returns, got {type(cache).__name__}")
        if len(cache) != len(self.layers):
            raise ValueError(f"cache: has {len(cache)} layer caches, the model {len(self.layers)} layers "
                             "(an MTP cache, or one from another model?)")
        cfg = self.cfg
        for i, c in enumerate(cache):
            if isinstance(c, LatentCache):
                want = [(cfg.kv_lora_rank + cfg.qk_rope_head_dim,)]
                got = [tuple(c.k.shape[2:])]
                ok = c.kv_lora_rank == cfg.kv_lora_rank
            elif isinstance(c, KVCache):
                want = [(cfg.n_heads, cfg.qk_head_dim), (cfg.n_heads, cfg.v_head_dim)]
                got = [tuple(c.k.shape[2:]), tuple(c.v.shape[2:])]
                ok = c.v.shape[:2] == c.k.shape[:2]
            else:
                raise TypeError(f"cache[{i}]: expected a LatentCache or KVCache, got {type(c).__name__}")
            if got != want or not ok or c.k.shape[:2] != cache[0].k.shape[:2]:
                raise ValueError(f"cache[{i}]: a {type(c).__name__} of shape {[tuple(c.k.shape)] + got[1:]} does not "
                                 f"fit this model's config (another config's cache?); build it with new_cache")
            if device is not None and c.k.device != device:
                raise ValueError(f"cache[{i}]: on {c.k.device}, the tokens on {device}")

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0,
               cache: list[KVCache | LatentCache] | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim) of the main model."""
        start_pos = self.check_tokens(tokens, start_pos, cache)
        freqs_cis = self.freqs_cis[start_pos:start_pos + tokens.size(1)]
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, freqs_cis, None if cache is None else cache[i])
        if cache is not None:
            for c in cache:
                c.filled = max(c.filled, start_pos + tokens.size(1))
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: list[KVCache | LatentCache] | None = None,
                mtp: bool | None = None) -> ModelOutput:
        """Args:
            tokens: (B, T) token ids at positions [start_pos, start_pos + T).
            cache: from :meth:`new_cache`, for incremental decoding.
            mtp: run the MTP modules (default: when there is no cache). Depth k needs T > k tokens;
                depths that do not fit are skipped, so ``mtp_logits`` may be shorter than n_mtp_modules.
        """
        h = self.hidden(tokens, start_pos, cache)
        logits = self.head(h)
        mtp_logits: list[torch.Tensor] = []
        if mtp if mtp is not None else cache is None:
            if start_pos != 0:
                raise ValueError("mtp: MTP modules run on whole sequences (start_pos=0)")
            mtp_logits = mtp_forward(self.mtp, self.embed, self.head, h, tokens, self.freqs_cis)
        return ModelOutput(logits, mtp_logits)


def mtp_forward(modules: nn.ModuleList, embed: nn.Embedding, head: nn.Module, h: torch.Tensor,
                tokens: torch.Tensor, freqs_cis: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every MTP depth that fits, from the main model's final-normed hidden states h (B, T, dim)
    of ``tokens`` (B, T) at positions from 0. Shared by :class:`Transformer` and the last pipeline stage
    (chapter 5), which holds the same modules."""
    out = []
    for k, module in enumerate(modules, start=1):
        if tokens.size(1) <= k:
            break
        # depth k at position i combines h^{k-1}_i with the embedding of token i+k (eq. 21)
        h = module(h[:, :-1], embed(tokens[:, k:]), freqs_cis[: tokens.size(1) - k])
        out.append(head(h))
    return out


def mtp_loss(out: ModelOutput, labels: torch.Tensor, mtp_lambda: float = 0.3,
             ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """L = CE(main) + λ · mean_k CE(depth k)  (V3 eq. 24–25).

    ``labels[:, t]`` is the token after ``tokens[:, t]``, so depth k's targets are ``labels[:, k:]``.
    Each depth's CE is averaged over the positions it has (T−k), where the paper divides by T; the
    difference is k/T of that depth's loss.

    Returns:
        (total, main CE, [CE of each depth]).
    """
    if not isinstance(labels, torch.Tensor) or labels.shape != out.logits.shape[:2]:
        raise ValueError(f"labels: expected a tensor of shape {tuple(out.logits.shape[:2])} (the tokens' (B, T)), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.dtype not in (torch.long, torch.uint8):  # what cross_entropy takes
        raise ValueError(f"labels: expected integer token ids, got {labels.dtype}")
    if isinstance(mtp_lambda, bool) or not isinstance(mtp_lambda, numbers.Real) or not 0 <= mtp_lambda < math.inf:
        raise ValueError(f"mtp_lambda: must be a finite number >= 0, got {mtp_lambda!r}")
    try:  # an id outside [0, vocab) other than ignore_index: torch's IndexError (CPU) does not say which input
        main = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index)
        depth = [
            F.cross_entropy(lg.flatten(0, 1).float(), labels[:, k:].flatten(), ignore_index=ignore_index)
            for k, lg in enumerate(out.mtp_logits, start=1)
        ]
    except IndexError as err:
        raise ValueError(f"labels: an id is outside the vocabulary [0, {out.logits.size(-1)}) and is not "
                         f"ignore_index={ignore_index} ({err})") from None
    total = main + mtp_lambda * torch.stack(depth).mean() if depth else main
    return total, main, depth


def check_index(value, name: str, minimum: int) -> int:
    """``value`` as a Python int, at least ``minimum``; ints, NumPy ints and 0-d integer tensors pass, bools and
    floats raise ``TypeError`` naming ``name`` (shared by the generation entry points)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except (TypeError, RuntimeError):
        raise TypeError(f"{name}: must be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value
