"""Serve the lab's model: greedy or sampled decoding with the latent cache and MTP drafts, on 1 or N processes
(chapter 6).

:func:`serve` loads a merged checkpoint (the release's layout, :func:`~dsv3lib.hf.load_hf`) and continues a
prompt with :func:`~dsv3lib.speculative.speculative_generate` (the MTP module drafts, the main model verifies;
V3 §5.4.3) or, with ``mtp=False``, plain :func:`~dsv3lib.generate.generate`. Both decode with the absorbed-MLA
latent cache. Inside a process group of N ranks the routed experts are sharded over the N processes
(:func:`~dsv3lib.parallel.expert.shard_experts`): every decoding step dispatches and combines its tokens by
all-to-all. Each expert runs once per source rank (``batch_sources=False``), the very matrix products one
process runs, so the greedy text is token for token the one-process text, and so is a sampled text with the same
``seed`` (every rank draws from the same logits with the same generator).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ..data import ByteTokenizer
from ..generate import generate
from ..hf import load_hf
from ..model import Transformer
from ..parallel.expert import shard_experts
from ..speculative import SpecStats, speculative_generate

__all__ = ["ServeResult", "load_for_serving", "serve"]


@dataclass
class ServeResult:
    tokens: list[int]  # prompt + new tokens
    new_tokens: int
    text: str  # the new tokens, decoded
    stats: SpecStats | None  # None without MTP
    seconds: float

    def summary(self) -> str:
        speed = f"{self.new_tokens / self.seconds:.1f} tokens/s"
        if self.stats is None:
            return f"{self.new_tokens} tokens, 1 per target forward (no MTP drafts), {speed}"
        s = self.stats
        return (f"{self.new_tokens} tokens; accepted drafts {sum(s.accepted)}/{sum(s.proposed)}, "
                f"{s.tokens_per_forward:.2f} tokens per target forward, {speed}")


def load_for_serving(ckpt: str | os.PathLike) -> Transformer:
    """The merged model of a lab run directory (its ``hf/``) or of a Hugging Face directory itself."""
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt: {path} does not exist")
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--ckpt: {path} holds no config.json (a lab run's directory or its hf/ folder)")
    return load_hf(path)


def serve(model: Transformer, prompt: str, max_new_tokens: int = 64, *, mtp: bool = True, temperature: float = 0.0,
          top_p: float = 1.0, seed: int | None = None) -> ServeResult:
    """Continuation of ``prompt``: greedy (``temperature=0``) or sampled with ``temperature``/``top_p`` (speculative
    sampling with MTP drafts keeps the main model's distribution, chapter 4); in a process group of N > 1 ranks,
    experts sharded over the N."""
    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("--prompt: empty")
    if dist.is_initialized() and dist.get_world_size() > 1:
        shard_experts(model, batch_sources=False)  # every rank: same prompt, same steps, same all-to-alls
    t0 = time.perf_counter()
    if mtp and len(model.mtp):
        out, stats = speculative_generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    else:
        out, stats = generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed), None
    tokens = out[0].tolist()
    new = tokens[len(ids):]
    return ServeResult(tokens, len(new), tok.decode(new), stats, time.perf_counter() - t0)
