"""Speculative decoding with the MTP modules as the drafter (chapter 4; V3 §2.2 and §5.4.3).

Each round, the MTP modules draft up to D tokens from the main model's last hidden state, one depth
after another (depth k reads depth k−1's representation and the token before it, V3 eq. 21); one
forward pass of the main model over [last token, drafts] then checks all of them at once using the
cache. The longest prefix of drafts the main model agrees with is kept, plus the main model's own token
after it, so every round yields between 1 and D + 1 tokens. Rejected positions are simply overwritten
in the caches next round (they are indexed by position).

Greedy speculative decoding returns exactly the tokens of greedy decoding. With a temperature, drafts
are accepted with probability min(1, p/q) and a rejection is replaced by a sample from norm(max(0, p − q))
(Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318), which leaves the output
distribution that of sampling from the main model.

Only batch size 1 is supported: sequences in a batch would accept different numbers of drafts.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .generate import _as_batch, _check_eos, _check_int, _check_seed, _multinomial, check_sampling, top_p_filter
from .model import KVCache, LatentCache, Transformer, eval_mode

__all__ = [
    "SpecStats", "speculative_generate", "accept_or_resample", "expected_tokens_per_forward",
    "teacher_forced_acceptance",
]


def expected_tokens_per_forward(acceptance: float | Sequence[float], depth: int | None = None) -> float:
    """Mean tokens per main-model forward with ``depth`` drafts per round.

    ``acceptance`` is one probability for every depth, or a list of per-depth conditional probabilities
    (depth k is accepted with probability a_k given that depths < k were). A round yields the accepted
    prefix plus one token of the main model's own: 1 + a_1 + a_1·a_2 + ... (= (1 − p^(D+1)) / (1 − p)
    for a constant p).
    """
    if depth is not None:
        depth = _check_int(depth, "depth", 0)
    try:
        scalar = isinstance(acceptance, numbers.Real)
        rates = [float(acceptance)] * (1 if depth is None else depth) if scalar else [float(a) for a in acceptance]
    except (TypeError, ValueError):
        raise TypeError(f"acceptance: expected a probability or a list of them, got {acceptance!r}") from None
    if depth is not None:
        rates = rates[:depth]
    if any(not 0 <= a <= 1 for a in rates):
        raise ValueError(f"acceptance: probabilities must lie in [0, 1], got {rates}")
    total, reach = 1.0, 1.0
    for a in rates:
        reach *= a
        total += reach
    return total


@dataclass
class SpecStats:
    """What one speculative generation did."""

    depth: int  # drafts per round (D)
    proposed: list[int] = field(default_factory=list)  # per depth: drafts the main model checked
    accepted: list[int] = field(default_factory=list)  # per depth: drafts it accepted
    main_forwards: int = 0  # forward passes of the main model, prefill included
    new_tokens: int = 0
    seconds: float = 0.0
    # per new token, who produced it: "draft" (an accepted draft), "correction" (the main model's token in place
    # of a rejected draft), "bonus" (the main model's token after a round whose drafts were all accepted), or
    # "main" (the main model's token with no draft before it: the first new token, or a round without drafts)
    sources: list[str] = field(default_factory=list)

    @property
    def acceptance(self) -> list[float]:
        """Per depth k: accepted / checked, where depth k is checked only if depths < k were accepted."""
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(1, self.main_forwards)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")


def _probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    return top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int,
                       generator: torch.Generator | None = None) -> tuple[bool, int]:
    """The speculative-sampling rule for one drafted ``token`` drawn from ``q``, target ``p`` (both (V,)).

    Accept with probability min(1, p[token] / q[token]); otherwise draw from norm(max(0, p − q)).
    Either way the returned token is distributed exactly as ``p``.
    """
    if p.dim() != 1 or q.shape != p.shape:
        raise ValueError(f"q: expected the shape of p, one (V,) distribution each, got {tuple(q.shape)} and "
                         f"{tuple(p.shape)}")
    if not 0 <= _check_int(token, "token", 0) < p.numel():
        raise ValueError(f"token: {token} is outside the vocabulary [0, {p.numel()})")
    u = torch.rand((), generator=generator, device=p.device)
    if q[token] > 0 and u * q[token] <= p[token]:
        return True, token
    residual = (p - q).clamp_min(0)
    residual = residual / residual.sum() if residual.sum() > 0 else p
    return False, int(_multinomial(residual, generator))


@dataclass
class _Sampler:
    """How every token is picked: drafts, the main model's checks of them and its own tokens."""

    temperature: float
    top_p: float
    generator: torch.Generator | None

    def choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A token from logits (V,), and the probabilities it was drawn from (None when greedy)."""
        if self.temperature == 0.0:
            return int(logits.argmax()), None
        probs = _probs(logits, self.temperature, self.top_p)
        return int(_multinomial(probs, self.generator)), probs

    def check(self, logits: torch.Tensor, draft: int, draft_probs: torch.Tensor | None) -> tuple[bool, int]:
        """(accepted?, the main model's token at this position): its argmax, or speculative sampling."""
        if self.temperature == 0.0:
            target = int(logits.argmax())
            return target == draft, target
        p = _probs(logits, self.temperature, self.top_p)
        return accept_or_resample(p, draft_probs, draft, self.generator)


def _draft(model: Transformer, sampler: _Sampler, seq: list[int], hidden: list[torch.Tensor], valid: list[int],
           mtp_cache: list[KVCache | LatentCache], budget: int) -> tuple[list[int], list[torch.Tensor | None]]:
    """Depths k = 1..budget each draft one token: depth k drafts token n-1+k (n = len(seq)) from position n-2.

    Depth k runs its MTP module over the positions [valid[k], n-1) it has not yet computed from committed
    tokens, reading depth k-1's outputs ``hidden[k-1]`` and the tokens k ahead; it writes ``hidden[k]``
    and advances ``valid[k]``. Returns the drafts and the probabilities each was drawn from.
    """
    n = len(seq)
    device = model.embed.weight.device
    drafts: list[int] = []
    draft_probs: list[torch.Tensor | None] = []
    for k in range(1, budget + 1):
        start, end = valid[k], n - 1
        ids = torch.tensor([(seq + drafts)[start + k:end + k]], device=device)
        h = model.mtp[k - 1](hidden[k - 1][:, start:end], model.embed(ids), model.freqs_cis[start:end],
                             start, mtp_cache[k - 1])  # (1, end - start, dim)
        hidden[k][:, start:end] = h
        valid[k] = max(0, min(n - k, valid[k - 1]))
        token, probs = sampler.choose(model.head(h[0, -1]))
        drafts.append(token)
        draft_probs.append(probs)
    return drafts, draft_probs


def _verify(model: Transformer, seq: list[int], drafts: list[int],
            main_cache: list[KVCache | LatentCache]) -> tuple[torch.Tensor, torch.Tensor]:
    """One main forward over [seq[-1], drafts] at positions n-1 .. n-1+len(drafts) (n = len(seq)).

    Returns its hidden states (1, 1 + len(drafts), dim) and logits (1 + len(drafts), vocab); row j checks
    draft j, the last row gives the main model's own next token.
    """
    ids = torch.tensor([[seq[-1]] + drafts], device=model.embed.weight.device)
    hv = model.hidden(ids, len(seq) - 1, main_cache)
    return hv, model.head(hv[0])


def _accept(sampler: _Sampler, drafts: list[int], draft_probs: list[torch.Tensor | None], logits: torch.Tensor,
            eos_id: int | None, stats: SpecStats) -> list[int]:
    """The new tokens of a round: the longest accepted prefix of ``drafts``, then the main model's token
    (its correction of the first rejected draft, or, if all were accepted, the one after them), cut after
    ``eos_id``. Counts proposals, acceptances and each token's source in ``stats``."""
    n_before = len(stats.sources)
    new: list[int] = []
    for j, d in enumerate(drafts):
        stats.proposed[j] += 1
        ok, target = sampler.check(logits[j], d, draft_probs[j])
        if not ok:
            new.append(target)
            stats.sources.append("correction")
            break
        stats.accepted[j] += 1
        new.append(d)
        stats.sources.append("draft")
        if d == eos_id:
            break
    else:  # every draft accepted (none was eos): the main model's token after them comes free
        new.append(sampler.choose(logits[len(drafts)])[0])
        stats.sources.append("bonus" if drafts else "main")
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id) + 1]
        del stats.sources[n_before + len(new):]
    return new


def _check_args(model: Transformer, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, depth: int,
                temperature: float, top_p: float) -> tuple[torch.Tensor, int]:
    """The prompt as (1, T) tokens and the cache length the run needs; errors name the argument."""
    tokens = _as_batch(prompt, model)  # first: checks that model is a Transformer
    n_mtp = len(model.mtp)
    if not 1 <= _check_int(depth, "depth", 1 if n_mtp else 0) <= n_mtp:
        raise ValueError(f"depth: must be in [1, n_mtp_modules={n_mtp}], got {depth}")
    _check_int(max_new_tokens, "max_new_tokens", 1)
    check_sampling(temperature, top_p)
    if tokens.size(0) != 1:
        raise ValueError(f"prompt: speculative decoding takes one sequence, got a batch of {tokens.size(0)}")
    # the last verify pass may look up to `depth` positions past the final token
    max_len = tokens.size(1) + max_new_tokens + depth
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"max_new_tokens: prompt {tokens.size(1)} + {max_new_tokens} new + {depth} draft "
                         f"positions exceed max_seq_len={model.cfg.max_seq_len}")
    return tokens, max_len


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
                         depth: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                         seed: int | None = None, eos_id: int | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Like :func:`dsv3lib.generate.generate`, drafting with the MTP modules.

    Args:
        prompt: (T,) or (1, T) token ids.
        depth: drafts per round, 1 ≤ depth ≤ n_mtp_modules (default: all modules).
    Returns:
        (1, T + n) tokens and a :class:`SpecStats`.
    """
    depth = len(getattr(model, "mtp", ())) if depth is None else depth
    tokens, max_len = _check_args(model, prompt, max_new_tokens, depth, temperature, top_p)
    _check_eos(eos_id, model.cfg.vocab_size)
    _check_seed(seed)
    device = tokens.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sampler = _Sampler(temperature, top_p, gen)
    stats = SpecStats(depth=depth, proposed=[0] * depth, accepted=[0] * depth)
    t0 = time.perf_counter()
    with eval_mode(model):
        seq = tokens[0].tolist()
        prompt_len = len(seq)
        main_cache = model.new_cache(1, max_len)
        mtp_cache = model.new_cache(1, max_len, mtp=True)

        # prefill: the main model reads the prompt and produces the first new token
        h0 = model.hidden(tokens, 0, main_cache)  # (1, T, dim)
        stats.main_forwards += 1
        seq.append(sampler.choose(model.head(h0[0, -1]))[0])
        stats.sources.append("main")
        # hidden[k][:, i]: depth-k output at position i (k = 0: the main model's final hidden state)
        hidden = [h0.new_zeros(1, max_len, model.cfg.dim) for _ in range(depth + 1)]
        hidden[0][:, :h0.size(1)] = h0
        valid = [len(seq) - 1] + [0] * depth  # leading positions of hidden[k] computed from committed tokens

        while len(seq) - prompt_len < max_new_tokens and not (eos_id is not None and seq[-1] == eos_id):
            n = len(seq)  # committed tokens; the main model has not yet read seq[n-1]
            budget = min(depth, max_new_tokens - (n - prompt_len) - 1)
            drafts, draft_probs = _draft(model, sampler, seq, hidden, valid, mtp_cache, budget)
            hv, logits = _verify(model, seq, drafts, main_cache)
            stats.main_forwards += 1
            new = _accept(sampler, drafts, draft_probs, logits, eos_id, stats)
            hidden[0][:, n - 1:n - 1 + len(new)] = hv[:, :len(new)]
            seq.extend(new)
            valid[0] = len(seq) - 1
    stats.new_tokens = len(seq) - prompt_len
    stats.seconds = time.perf_counter() - t0
    return torch.tensor([seq], device=device), stats


@torch.no_grad()
def teacher_forced_acceptance(model: Transformer, tokens: torch.Tensor) -> float:
    """Share of depth-1 MTP drafts that greedy verification would accept on a given text (chapter 6).

    Teacher-forced: at position i the MTP module drafts token i+2 from the main model's h_i and the *true*
    token i+1; the main model, having read the true prefix through token i+1, accepts iff its own argmax is
    the same token. This measures acceptance on held-out text rather than on the model's own continuations
    (where a model agrees with itself more easily). tokens: (B, T) with T >= 3.
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens: expected a (batch, T) torch.Tensor of ids, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.size(1) < 3:
        raise ValueError(f"tokens: expected (batch, T >= 3), got {tuple(tokens.shape)}")
    if not len(model.mtp):
        raise ValueError("model: has no MTP module to draft with")
    with eval_mode(model):
        out = model(tokens, mtp=True)
    draft = out.mtp_logits[0].argmax(-1)  # (B, T-1): position i drafts token i+2
    verify = out.logits[:, 1:].argmax(-1)  # (B, T-1): position i+1 predicts token i+2
    return (draft == verify).float().mean().item()
