"""``eval_mode``: run a block of code with a model in eval mode, then restore its mode (chapter 0).

Evaluation, generation, speculative decoding and load measurement all need dropout-free, deterministic
forwards without changing what the caller had set; this is the one place that remembers and restores it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the ``with`` block; afterwards (even after an exception) ``model.train(m)``
    with the mode ``m`` the model had on entry."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
