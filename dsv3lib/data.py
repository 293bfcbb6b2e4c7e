"""Corpus, byte tokenizer and batches: the data every chapter trains on.

Chapter 0 builds this: a real, human-written corpus taken from Python's own documentation and standard
library and shipped inside this package (no download), a byte-level tokenizer, random training windows and
deterministic validation windows. Chapter 3 uses the corpus's two domains, English prose and Python code,
to ask whether MoE experts specialise by domain when routed.

Domains (the text ships with the package in ``dsv3lib/corpus/``, built once from CPython 3.11.7 by
``scripts/build_corpus.py``, so every Python version reads the same bytes; PSF licence, see ``corpus/NOTICE``)
    prose  Python's bundled documentation topics, ``pydoc_data.topics.topics`` (one document per topic).
    code   the source of a fixed list of 28 pure-Python stdlib modules (one document each).

Split rule (per domain, deterministic): visit the documents in order of ``crc32(name)`` (a fixed shuffle)
and put each one in ``val`` if it still fits within ``VAL_FRACTION`` of the domain's bytes; the rest are
``train``. So each domain has just under 10% of its bytes in val, is present there, and no document is
in both splits. ``Corpus.describe()`` prints the counts quoted in the book.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

__all__ = [
    "CORPUS_DIR",
    "DOMAINS",
    "SPLITS",
    "VAL_FRACTION",
    "ByteTokenizer",
    "Corpus",
    "load_corpus",
    "read_documents",
    "batches",
    "eval_batches",
    "unigram_entropy",
    "bits_per_byte",
]

DOMAINS = ("prose", "code")
SPLITS = ("train", "val")
VAL_FRACTION = 0.10

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"  # manifest.json + one <domain>.json.gz per domain


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, so ``vocab_size = 256`` and nothing is ever out of vocabulary.

    Id 0 (the NUL byte, which never occurs in the corpus) doubles as the end-of-text marker ``eot_id``
    that separates documents, so ``encode`` refuses text containing NUL.
    """

    vocab_size = 256
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        if "\0" in text:
            raise ValueError("text contains NUL, which is reserved as eot_id = 0")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")
        return bytes(ids).decode("utf-8", errors="replace")


def _read_verified(path: Path, sha256: str | None = None) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} is missing: reinstall dsv3lib (it ships in the package)")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"corpus file {path} does not match its SHA-256 in manifest.json (corrupted or "
                         f"modified; rebuild with scripts/build_corpus.py)")
    return data


def read_documents(root: str | Path = CORPUS_DIR) -> dict[str, dict[str, str]]:
    """domain -> {document name: text}, in corpus order, from the shipped files in ``root``; each file is
    checked against the SHA-256 in ``root/manifest.json`` first."""
    root = Path(root)
    files = json.loads(_read_verified(root / "manifest.json"))["files"]
    by_domain = {entry["domain"]: (name, entry["sha256"]) for name, entry in files.items()}
    docs = {}
    for d in DOMAINS:
        if d not in by_domain:
            raise ValueError(f"corpus manifest {root / 'manifest.json'} lists no file for domain {d!r}")
        name, sha = by_domain[d]
        docs[d] = json.loads(gzip.decompress(_read_verified(root / name, sha)).decode("utf-8"))
    return docs


def _split_names(docs: dict[str, str]) -> dict[str, list[str]]:
    """The split rule in the module docstring; returns split -> names in the domain's own order."""
    size = {n: len(t.encode("utf-8")) for n, t in docs.items()}
    budget = VAL_FRACTION * sum(size.values())
    val, val_bytes = set(), 0
    for name in sorted(docs, key=lambda n: (zlib.crc32(n.encode("utf-8")), n)):
        if val_bytes + size[name] <= budget:
            val.add(name)
            val_bytes += size[name]
    return {"train": [n for n in docs if n not in val], "val": [n for n in docs if n in val]}


def _interleave(streams: dict[str, list[bytes]]) -> list[bytes]:
    """Merge per-domain document lists, always taking the next document from the domain that has
    emitted the smallest fraction of its bytes so far, so every stretch of the result mixes domains."""
    totals = {d: max(1, sum(map(len, docs))) for d, docs in streams.items()}
    done = {d: 0 for d in streams}
    pos = {d: 0 for d in streams}
    out: list[bytes] = []
    while True:
        left = [d for d in streams if pos[d] < len(streams[d])]
        if not left:
            return out
        d = min(left, key=lambda k: done[k] / totals[k])  # ties: first domain in DOMAINS order
        out.append(streams[d][pos[d]])
        done[d] += len(out[-1])
        pos[d] += 1


def _to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # (N,)


@dataclass(frozen=True, eq=False)
class Corpus:
    """The tokenised corpus. Every document is followed by ``eot_id``; treat the tensors as read-only.

    tokens[split]                  (N,) long, both domains interleaved document by document
    domain_tokens[split][domain]   (N_d,) long, one domain's documents in order
    doc_names[split][domain]       the documents' names (topic names / stdlib paths)
    n_bytes[split][domain]         UTF-8 bytes of text (eot markers not counted)
    """

    tokens: dict[str, torch.Tensor]
    domain_tokens: dict[str, dict[str, torch.Tensor]]
    doc_names: dict[str, dict[str, tuple[str, ...]]]
    n_bytes: dict[str, dict[str, int]]

    @property
    def train(self) -> torch.Tensor:
        return self.tokens["train"]

    @property
    def val(self) -> torch.Tensor:
        return self.tokens["val"]

    def describe(self) -> str:
        """One line per domain: documents and tokens in train / val, then the totals."""
        lines = []
        for d in (*DOMAINS, "all"):
            docs = [sum(len(self.doc_names[s][x]) for x in DOMAINS) if d == "all" else len(self.doc_names[s][d])
                    for s in SPLITS]
            toks = [len(self.tokens[s]) if d == "all" else len(self.domain_tokens[s][d]) for s in SPLITS]
            share = toks[1] / (toks[0] + toks[1])
            lines.append(f"{d:>5}: {docs[0]:3d} + {docs[1]:2d} documents, "
                         f"{toks[0]:8,d} train + {toks[1]:6,d} val tokens ({share:.1%} val)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "Corpus(\n" + self.describe() + "\n)"


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """Read (verifying checksums), split and tokenise both domains (~0.1 s; cached, so call it freely)."""
    eot = bytes([ByteTokenizer.eot_id])
    raw = read_documents()
    tokens, domain_tokens, doc_names, n_bytes = {}, {}, {}, {}
    splits = {d: _split_names(raw[d]) for d in DOMAINS}
    for d in DOMAINS:
        for n, text in raw[d].items():
            if "\0" in text:
                raise ValueError(f"{d} document {n!r} contains NUL, which is reserved as eot_id")
    for s in SPLITS:
        # ByteTokenizer.encode, done on bytes directly: each document followed by eot
        streams = {d: [raw[d][n].encode("utf-8") + eot for n in splits[d][s]] for d in DOMAINS}
        domain_tokens[s] = {d: _to_tensor(b"".join(streams[d])) for d in DOMAINS}
        tokens[s] = _to_tensor(b"".join(_interleave(streams)))
        doc_names[s] = {d: tuple(splits[d][s]) for d in DOMAINS}
        n_bytes[s] = {d: len(domain_tokens[s][d]) - len(doc_names[s][d]) for d in DOMAINS}
    return Corpus(tokens, domain_tokens, doc_names, n_bytes)


def _check_window_args(tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D tensor")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if seq_len + 1 > len(tokens):
        raise ValueError(f"seq_len + 1 = {seq_len + 1} exceeds the {len(tokens)} tokens available")


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, *,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random training windows: yields (x, y), each (batch_size, seq_len) long, y = x shifted by one.

    Window starts are drawn uniformly with a CPU ``torch.Generator`` seeded with ``seed``, so the same
    seed gives the same stream. Windows may cross document boundaries (the eot token marks them).
    """
    _check_window_args(tokens, batch_size, seq_len)  # here, so bad arguments fail at the call
    return _random_windows(tokens, batch_size, seq_len, seed)


def _random_windows(tokens, batch_size, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)  # (T+1,)
    n_starts = len(tokens) - seq_len
    while True:
        starts = torch.randint(n_starts, (batch_size,), generator=g)  # (B,)
        idx = (starts[:, None] + offsets).to(tokens.device)  # (B, T+1)
        window = tokens[idx].long()
        yield window[:, :-1], window[:, 1:]


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, *,
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation windows: window i has targets tokens[i*T+1 : (i+1)*T+1], so every target
    after the first token is predicted exactly once; the tokens past the last full window are dropped.
    Yields (x, y) of (batch_size, seq_len), the final batch possibly smaller; stops after ``max_batches``.
    """
    _check_window_args(tokens, batch_size, seq_len)
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches must be positive or None, got {max_batches}")
    return _eval_windows(tokens, batch_size, seq_len, max_batches)


def _eval_windows(tokens, batch_size, seq_len, max_batches):
    n_windows = (len(tokens) - 1) // seq_len
    offsets = torch.arange(seq_len + 1, device=tokens.device)  # (T+1,)
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        starts = torch.arange(first, min(first + batch_size, n_windows), device=tokens.device) * seq_len
        window = tokens[starts[:, None] + offsets].long()  # (B, T+1)
        yield window[:, :-1], window[:, 1:]


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy in nats of the empirical token distribution: the loss of the best model that ignores context.

    A trained model's validation loss must beat this to show it learned anything beyond byte frequencies.
    """
    tokens = torch.as_tensor(tokens).flatten()
    if tokens.numel() == 0:
        raise ValueError("tokens is empty")
    counts = torch.bincount(tokens.long()).double()
    p = counts[counts > 0] / tokens.numel()
    return float(-(p * p.log()).sum())


def bits_per_byte(nats: float) -> float:
    """Convert a per-token loss in nats to bits per byte (one token is one byte here): nats / ln 2."""
    return nats / math.log(2)
