"""The current weight-gradient sink: where layers below ``parallel`` send a deferred dW (chapter 5).

A zero-bubble schedule's ``B`` computes input gradients now and leaves weight gradients for ``W``
(:class:`~dsv3lib.parallel.weight_grad.WeightGradStore`). Layers on lower floors that run their own GEMMs
(``FP8Linear``, the MoE's grouped experts) cannot import ``parallel``; instead the store, while it
captures a forward, installs itself here as this thread's *sink*, and such a layer's forward keeps
:func:`current_sink` for its backward. There, ``sink.push(fn)`` either queues ``fn`` (a closure that
adds the weight gradients into ``.grad``; returns True) or refuses (False: compute them now).

Thread-local, as a ``TorchFunctionMode`` is: the pipeline may run one forward in a second thread while the
main thread runs a backward.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

__all__ = ["accumulate", "current_sink", "weight_grad_sink"]

_local = threading.local()


def current_sink():
    """This thread's sink (an object with ``push(fn) -> bool``), or None outside a capture."""
    return getattr(_local, "sink", None)


@contextmanager
def weight_grad_sink(sink):
    """Make ``sink`` this thread's current sink within the block (the previous one comes back after)."""
    prev, _local.sink = current_sink(), sink
    try:
        yield
    finally:
        _local.sink = prev


def accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    """Add a deferred gradient into ``p.grad`` (set it if there is none), as autograd would have."""
    p.grad = g if p.grad is None else p.grad + g
