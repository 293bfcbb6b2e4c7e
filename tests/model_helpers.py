"""Shared builders for the model tests: seeded tiny configs, models, MoE layers, tokens."""

from __future__ import annotations

import torch

from dsv3lib.config import ModelConfig
from dsv3lib.model import (
    MoE,
    Transformer,
)

ATOL = 1e-5


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **overrides)


def small(**overrides) -> ModelConfig:
    """A smaller variant of tiny: 2 layers (1 dense + 1 MoE), so model-level tests stay fast."""
    return tiny(**{"n_layers": 2, **overrides})


def randomise_gate_biases(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Random correction biases b (sigmoid scores are ≈ 0.5 ± 0.05 at init, so 0.05 changes choices)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=g) * scale)


def make_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    randomise_gate_biases(model, seed + 1)
    return model


def make_moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    """A standalone MoE; the gate weight is torch.empty in Gate, so initialise it here."""
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.1)  # u·e_i ~ N(0, 1.1²): a spread of sigmoid scores
    randomise_gate_biases(moe, seed + 1)
    return moe


def random_tokens(cfg: ModelConfig, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def group_of(indices: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return indices // cfg.experts_per_group

