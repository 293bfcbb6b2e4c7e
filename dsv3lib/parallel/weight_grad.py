"""Deferred weight gradients for zero-bubble schedules: a store of dW = dYᵀ·X closures (chapter 5).

Zero-bubble schedules (ZB1P, DualPipe, DualPipeV) split a stage's backward into ``B``, the input
gradient that the previous stage is waiting for, and ``W``, the weight gradients that nobody waits for and
that can fill a bubble later. For a linear layer y = x·Wᵀ the split is clean: ``B`` needs only
dX = dY·W, and ``W`` is the single GEMM dW = dYᵀ·X on tensors the backward already has.

:class:`WeightGradStore` makes that split real: while it is *capturing* (:meth:`WeightGradStore.capture`),
a linear layer's backward returns dX at once and, if the store is *deferring* (:meth:`WeightGradStore.defer`),
pushes a closure for dW (and d bias) instead of computing it; :meth:`WeightGradStore.flush` later runs a
chunk's closures, adding into ``.grad``. Three paths are covered:

- every ``F.linear`` with a parameter weight (``nn.Linear``, the routers' ``F.linear(x, self.weight)``)
  runs through :class:`DeferredLinear`; a ``torch.overrides.TorchFunctionMode`` intercepts the calls, so
  the model's modules stay untouched (no Linear swapping);
- ``FP8Linear`` (:mod:`dsv3lib.fp8.linear`) defers its FP8 Wgrad GEMM itself;
- the MoE's grouped experts (``grouped_mm = True``, :meth:`~dsv3lib.model.MoE.routed_grouped`) defer
  their three grouped weight GEMMs.

The last two live below ``parallel`` and cannot import it: ``capture`` also installs the store as the
thread's weight-gradient sink (:mod:`dsv3lib.wgrad`), which their forwards read. Their deferred dW are
the very tensors an immediate backward would produce (tests: ``torch.equal``). Weights used any other
way (MLA's absorbed path multiplies ``wkv_b.weight`` in an ``einsum``) and non-linear parameters (norm
scales; the routers' biases are not trained) get their gradients during ``B`` as usual.

The official DualPipe does the same with a ``WeightGradStore`` fed by its own Linear layers
(deepseek-ai/DualPipe); ``DeferredLinear``'s gradients are the same sums in a different order (tests: to 1e-6).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..wgrad import accumulate as _accumulate
from ..wgrad import weight_grad_sink

__all__ = ["DeferredLinear", "WeightGradStore"]


class WeightGradStore:
    """Closures computing linear layers' weight gradients, kept per chunk until :meth:`flush`."""

    def __init__(self):
        self._queue: list | None = None  # where backward puts closures while deferring
        self._pending: dict = {}  # chunk key -> list of closures

    @contextmanager
    def capture(self):
        """Within this block (in this thread), ``F.linear`` with a parameter weight records a
        :class:`DeferredLinear` node, and FP8 linears and grouped experts keep this store as their sink."""
        with _LinearMode(self), weight_grad_sink(self):
            yield

    @contextmanager
    def defer(self, key) -> None:
        """Run a backward in this block: captured linears return dX and queue their dW under ``key``."""
        if key in self._pending:
            raise ValueError(f"key: weight gradients of {key!r} are already waiting")
        self._queue = []
        try:
            yield
        finally:
            self._pending[key], self._queue = self._queue, None

    def push(self, fn) -> bool:
        """Queue ``fn`` if deferring (returns True); otherwise the caller computes now (False)."""
        if self._queue is None:
            return False
        self._queue.append(fn)
        return True

    def flush(self, key) -> int:
        """Run ``key``'s weight-gradient closures (the ``W`` op); returns how many ran."""
        if key not in self._pending:
            raise KeyError(f"key: no weight gradients waiting for {key!r}")
        fns = self._pending.pop(key)
        for fn in fns:
            fn()
        return len(fns)

    def __len__(self) -> int:
        """Chunks whose weight gradients are still waiting."""
        return len(self._pending)


class DeferredLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight (and bias) gradient can wait in a :class:`WeightGradStore`."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.params, ctx.store = (weight, bias), store  # the parameters themselves, to add into their .grad
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy.matmul(weight) if ctx.needs_input_grad[0] else None  # (..., in)
        need_w, need_b = ctx.needs_input_grad[1], ctx.params[1] is not None and ctx.needs_input_grad[2]

        def grads():
            dy2, x2 = dy.reshape(-1, dy.size(-1)), x.reshape(-1, x.size(-1))  # (tokens, out), (tokens, in)
            return (dy2.t().mm(x2) if need_w else None), (dy2.sum(0) if need_b else None)

        if (need_w or need_b) and ctx.store.push(lambda: _apply(grads(), *ctx.params)):
            return dx, None, None, None
        dw, db = grads()
        return dx, dw, db, None


def _apply(grads, weight, bias) -> None:
    dw, db = grads
    if dw is not None:
        _accumulate(weight, dw)
    if db is not None:
        _accumulate(bias, db)


class _LinearMode(TorchFunctionMode):
    def __init__(self, store: WeightGradStore):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if isinstance(weight, nn.Parameter) and torch.is_grad_enabled():
                return DeferredLinear.apply(x, weight, bias, self.store)
        return func(*args, **kwargs)
