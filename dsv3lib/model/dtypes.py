"""Tensors that must keep their dtype when a model is cast with ``.to(dtype)`` / ``.half()``."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["keep_dtype"]


def keep_dtype(fn: Callable[[torch.Tensor], torch.Tensor], keep: Callable[[torch.Tensor], bool]):
    """Wrap an ``nn.Module._apply`` function so tensors for which ``keep(t)`` holds only change device.

    The target device is read off ``fn`` applied to a scalar probe, so any move (``.to``, ``.cuda``,
    ``.cpu``) still applies while dtype casts do not.
    """

    def apply(t: torch.Tensor) -> torch.Tensor:
        if keep(t):
            return t.to(fn(torch.zeros((), device=t.device)).device)
        return fn(t)

    return apply
