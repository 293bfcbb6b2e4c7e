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

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .generate import _as_batch, top_p_filter
from .model import Transformer

__all__ = ["SpecStats", "speculative_generate", "accept_or_resample", "expected_tokens_per_forward"]


def expected_tokens_per_forward(acceptance: float | Sequence[float], depth: int | None = None) -> float:
    """Mean tokens per main-model forward with ``depth`` drafts per round.

    ``acceptance`` is one probability for every depth, or a list of per-depth conditional probabilities
    (depth k is accepted with probability a_k given that depths < k were). A round yields the accepted
    prefix plus one token of the main model's own: 1 + a_1 + a_1·a_2 + ... (= (1 − p^(D+1)) / (1 − p)
    for a constant p).
    """
    rates = [float(acceptance)] * (depth or 1) if isinstance(acceptance, (int, float)) else list(acceptance)
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
    sources: list[str] = field(default_factory=list)  # per new token: "draft" (accepted) or "main"

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
    u = torch.rand((), generator=generator, device=p.device)
    if q[token] > 0 and u * q[token] <= p[token]:
        return True, token
    residual = (p - q).clamp_min(0)
    residual = residual / residual.sum() if residual.sum() > 0 else p
    return False, int(torch.multinomial(residual, 1, generator=generator))


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
    n_mtp = len(model.mtp)
    depth = n_mtp if depth is None else depth
    if not 1 <= depth <= n_mtp:
        raise ValueError(f"depth: must be in [1, n_mtp_modules={n_mtp}], got {depth}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature/top_p: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = model.embed.weight.device
    tokens = _as_batch(prompt, device)
    if tokens.size(0) != 1:
        raise ValueError(f"prompt: speculative decoding takes one sequence, got a batch of {tokens.size(0)}")
    # the last verify pass may look up to `depth` positions past the final token
    max_len = tokens.size(1) + max_new_tokens + depth
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"max_new_tokens: prompt {tokens.size(1)} + {max_new_tokens} new + {depth} draft "
                         f"positions exceed max_seq_len={model.cfg.max_seq_len}")
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    greedy = temperature == 0.0

    def choose(logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if greedy:
            return int(logits.argmax()), None
        probs = _probs(logits, temperature, top_p)
        return int(torch.multinomial(probs, 1, generator=gen)), probs

    was_training = model.training
    model.eval()
    stats = SpecStats(depth=depth, proposed=[0] * depth, accepted=[0] * depth)
    t0 = time.perf_counter()
    try:
        seq = tokens[0].tolist()
        prompt_len = len(seq)
        main_cache = model.new_cache(1, max_len)
        mtp_cache = model.new_cache(1, max_len, mtp=True)

        # prefill: the main model reads the prompt and produces the first new token
        h0 = model.hidden(tokens, 0, main_cache)  # (1, T, dim)
        stats.main_forwards += 1
        first, _ = choose(model.head(h0[0, -1]))
        seq.append(first)
        stats.sources.append("main")
        # hidden[k][:, i]: depth-k output at position i (k = 0: the main model's final hidden state)
        hidden = [h0.new_zeros(1, max_len, model.cfg.dim) for _ in range(depth + 1)]
        hidden[0][:, :h0.size(1)] = h0
        valid = [len(seq) - 1] + [0] * depth  # leading positions of hidden[k] computed from committed tokens

        while len(seq) - prompt_len < max_new_tokens and not (eos_id is not None and seq[-1] == eos_id):
            n = len(seq)  # committed tokens; the main model has not yet read seq[n-1]
            budget = min(depth, max_new_tokens - (n - prompt_len) - 1)
            drafts: list[int] = []
            draft_probs: list[torch.Tensor | None] = []
            for k in range(1, budget + 1):  # depth k drafts token n-1+k from position n-2
                start, end = valid[k], n - 1
                ids = torch.tensor([(seq + drafts)[start + k:end + k]], device=device)
                h = model.mtp[k - 1](hidden[k - 1][:, start:end], model.embed(ids), model.freqs_cis[start:end],
                                     start, mtp_cache[k - 1])
                hidden[k][:, start:end] = h
                valid[k] = max(0, min(n - k, valid[k - 1]))
                token, probs = choose(model.head(h[0, -1]))
                drafts.append(token)
                draft_probs.append(probs)

            # verify: one main forward over [seq[n-1], drafts] at positions n-1 .. n-1+len(drafts)
            ids = torch.tensor([[seq[-1]] + drafts], device=device)
            hv = model.hidden(ids, n - 1, main_cache)
            logits = model.head(hv[0])  # (len(drafts) + 1, vocab)
            stats.main_forwards += 1
            new: list[int] = []
            for j, d in enumerate(drafts):
                stats.proposed[j] += 1
                if greedy:
                    target = int(logits[j].argmax())
                    ok = target == d
                else:
                    ok, target = accept_or_resample(_probs(logits[j], temperature, top_p), draft_probs[j], d, gen)
                if not ok:
                    new.append(target)
                    stats.sources.append("main")
                    break
                stats.accepted[j] += 1
                new.append(d)
                stats.sources.append("draft")
                if d == eos_id:
                    break
            else:  # every draft accepted (none was eos): the main model's token after them comes free
                new.append(choose(logits[len(drafts)])[0])
                stats.sources.append("main")
            if eos_id is not None and eos_id in new:
                new = new[:new.index(eos_id) + 1]
                stats.sources = stats.sources[:len(seq) - prompt_len + len(new)]
            hidden[0][:, n - 1:n - 1 + len(new)] = hv[:, :len(new)]
            seq.extend(new)
            valid[0] = len(seq) - 1
    finally:
        model.train(was_training)
    stats.new_tokens = len(seq) - prompt_len
    stats.seconds = time.perf_counter() - t0
    return torch.tensor([seq], device=device), stats
