"""WeightGradStore (dsv3lib.parallel.weight_grad): linear layers' dW wait for the W op and come out the same."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3lib.config import ModelConfig
from dsv3lib.fp8 import FP8Linear, convert_to_fp8
from dsv3lib.model import MoE, Transformer
from dsv3lib.parallel.stages import build_stages
from dsv3lib.parallel.weight_grad import WeightGradStore


def _stage(*, fp8=False, grouped=False, packed=False):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", n_layers=4, n_mtp_modules=0, max_seq_len=32))
    for m in model.modules():
        if isinstance(m, MoE):
            m.grouped_mm = grouped
            if packed:
                m.pack_experts()
    if fp8:
        convert_to_fp8(model)
    return build_stages(model, 2)[1]  # the last stage: two MoE layers, norm, head


def _linear_weights(module):
    """Parameters used as F.linear weights: every nn.Linear's, plus the routers' (F.linear on self.weight)."""
    ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    ids |= {id(m.weight) for m in module.modules() if type(m).__name__ == "Gate"}
    return ids


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _b_then_w(st):
    """A plain backward of ``st``, then the same backward split into B (capture + defer) and W (flush).
    Returns the plain grads, the grads present after B, those after W, and how many closures W ran."""
    x = torch.randn(2, 16, st.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    dy = torch.randn(2, 16, st.dim, generator=torch.Generator().manual_seed(2))
    params = list(st.parameters())
    torch.autograd.backward(st(x), dy, inputs=[x] + params)
    ref, ref_dx = _grads(st), x.grad.clone()

    st.zero_grad(set_to_none=True)
    x.grad = None
    store = WeightGradStore()
    with store.capture():
        out = st(x)
    with store.defer("mb0"):
        torch.autograd.backward(out, dy, inputs=[x] + params)
    assert torch.equal(x.grad, ref_dx)  # B: the input grad is complete
    after_b = _grads(st)
    assert len(store) == 1
    ran = store.flush("mb0")  # W
    assert len(store) == 0
    return ref, after_b, _grads(st), ran


def test_deferred_grads_equal_plain_backward():
    st = _stage()
    ref, after_b, got, ran = _b_then_w(st)
    linear = _linear_weights(st)
    waiting = [n for n, p in st.named_parameters() if id(p) in linear and n in ref]
    assert waiting and not set(waiting) & set(after_b)
    assert set(after_b) == set(ref) - set(waiting)  # norms: during B
    assert ran >= len(waiting)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6, msg=n)


def _same_grads(got, ref, exact):
    """The deferred gradients are the plain backward's: bit for bit for the names in ``exact``, to 1e-6 for the
    rest (DeferredLinear sums its dW in another order)."""
    assert set(got) == set(ref)
    for n in ref:
        if n in exact:
            assert torch.equal(got[n], ref[n]), n
        else:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6, msg=n)


def test_fp8_linears_defer_their_wgrad():
    """FP8Linear runs its own GEMMs (no F.linear): its Wgrad waits for W and gives the same bits."""
    st = _stage(fp8=True)
    fp8 = {f"{mn}.{pn}" for mn, m in st.named_modules() if isinstance(m, FP8Linear) for pn, _ in m.named_parameters()}
    ref, after_b, got, _ = _b_then_w(st)
    assert fp8 & set(ref) and not fp8 & set(after_b)
    linear = _linear_weights(st)  # the rest: the routers (F.linear) and the head (kept in high precision)
    assert set(after_b) == {n for n, p in st.named_parameters() if n in ref and n not in fp8 and id(p) not in linear}
    _same_grads(got, ref, exact=fp8)


@pytest.mark.parametrize("packed", [False, True], ids=["stacked", "packed"])
def test_grouped_experts_defer_their_wgrad(packed):
    """``grouped_mm = True`` multiplies stacked expert weights (torch._grouped_mm): their dW wait for W too,
    whether the weights are stacked per call or packed in one buffer (MoE.pack_experts)."""
    st = _stage(grouped=True, packed=packed)
    experts = {n for n, _ in st.named_parameters() if ".experts." in n}
    ref, after_b, got, _ = _b_then_w(st)
    assert experts <= set(ref) and not experts & set(after_b)  # idle experts get zeros, as in autograd
    _same_grads(got, ref, exact=experts)


def test_capture_is_per_thread():
    """A forward run in another thread while this one captures is not captured (the pipeline's overlap)."""
    lin = FP8Linear(8, 4)
    x = torch.randn(3, 8)
    store = WeightGradStore()
    ys = []
    with store.capture():
        helper = threading.Thread(target=lambda: ys.append(lin(x)))
        helper.start()
        helper.join()
    with store.defer(0):
        ys[0].sum().backward()
    assert lin.weight.grad is not None and store.flush(0) == 0


def test_capture_without_defer_computes_at_once():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 5, 8)
    store = WeightGradStore()
    with store.capture():
        y = lin(x)
    y.square().sum().backward()
    got = (lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad(set_to_none=True)
    lin(x).square().sum().backward()
    torch.testing.assert_close(got, (lin.weight.grad, lin.bias.grad), rtol=0, atol=1e-6)
    assert len(store) == 0


def test_bias_deferred_and_accumulates_into_existing_grad():
    lin = nn.Linear(8, 4)
    x = torch.randn(6, 8)
    lin(x).sum().backward()
    first = (lin.weight.grad.clone(), lin.bias.grad.clone())
    store = WeightGradStore()
    with store.capture():
        y = lin(x)
    with store.defer(0):
        y.sum().backward()
    assert torch.equal(lin.weight.grad, first[0]) and torch.equal(lin.bias.grad, first[1])  # not yet
    store.flush(0)
    torch.testing.assert_close((lin.weight.grad, lin.bias.grad), (2 * first[0], 2 * first[1]))


def test_plain_tensors_and_no_grad_are_left_alone():
    store = WeightGradStore()
    w = torch.randn(4, 8, requires_grad=True)  # not a Parameter: not a layer's weight
    x = torch.randn(2, 8)
    with store.capture():
        y = F.linear(x, w)
        with torch.no_grad():
            z = nn.Linear(8, 4)(x)
    assert y.grad_fn.name() != "DeferredLinearBackward" and z.grad_fn is None


def test_misuse_raises():
    store = WeightGradStore()
    with store.defer("a"):
        pass
    with pytest.raises(ValueError, match="already waiting"), store.defer("a"):
        pass
    with pytest.raises(KeyError, match="no weight gradients"):
        store.flush("b")
