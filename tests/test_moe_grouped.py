"""MoE.routed_grouped with packed expert weights (MoE.pack_experts; chapter 3, bench/moe.py): the grouped GEMMs
read one (E, out, in) buffer in place instead of stacking the weights per call, with the same bits as the
stacked path, gradients to each expert's own parameter, and checkpoints that still save."""

from __future__ import annotations

import copy

import torch
from model_helpers import ATOL, make_moe, small, tiny

from dsv3lib import checkpoint
from dsv3lib.hf import load_hf, save_hf
from dsv3lib.model import MoE, Transformer
from dsv3lib.model.moe import stacked_view

PROJ = ("w1", "w2", "w3")


def _weights(moe: MoE, name: str) -> list[torch.Tensor]:
    return [getattr(e, name).weight for e in moe.experts]


def _run(moe: MoE, x0: torch.Tensor, grad_out: torch.Tensor, path: str = "routed_grouped"):
    """Output and every gradient (input, each expert weight) of one expert path with routing held fixed."""
    with torch.no_grad():
        routing = moe.gate(x0)
    moe.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    y = getattr(moe, path)(x, routing.weights, routing.indices)
    y.backward(grad_out)
    grads = {f"{name}.{e}": (w.grad if w.grad is not None else torch.zeros_like(w))
             for name in PROJ for e, w in enumerate(_weights(moe, name))}
    return y.detach(), x.grad, grads


def _inputs(moe: MoE, n: int = 37, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    dim = moe.cfg.dim
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)


def test_pack_puts_each_projection_in_one_buffer_without_changing_the_parameters():
    moe = make_moe(tiny())
    before = {name: [(id(w), w.detach().clone()) for w in _weights(moe, name)] for name in PROJ}
    assert all(stacked_view(_weights(moe, name)) is None for name in PROJ)  # separate storages at first
    assert moe.pack_experts() is moe
    for name in PROJ:
        ws = _weights(moe, name)
        view = stacked_view(ws)
        assert view is not None and view.shape == (len(ws), *ws[0].shape)
        assert view.data_ptr() == ws[0].data_ptr() and not view.requires_grad  # in place, outside autograd
        for e, (w, (ident, value)) in enumerate(zip(ws, before[name])):
            assert id(w) == ident and isinstance(w, torch.nn.Parameter) and torch.equal(w, value)
            assert torch.equal(view[e], w)
    moe.pack_experts()  # packing twice moves nothing
    assert all(stacked_view(_weights(moe, name)).data_ptr() == _weights(moe, name)[0].data_ptr() for name in PROJ)


def test_packed_grouped_is_the_stacked_grouped_path_bit_for_bit():
    stacked = make_moe(tiny(n_shared_experts=0))
    packed = copy.deepcopy(stacked).pack_experts()
    x0, grad_out = _inputs(stacked)
    want, got = _run(stacked, x0, grad_out), _run(packed, x0, grad_out)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        assert torch.equal(got[2][k], want[2][k]), k
    idle = [k for k, g in got[2].items() if not g.any()]
    assert len(idle) < len(got[2])  # most experts were used; idle ones get zeros, as autograd gives them
    # and the grouped path is the per-expert (sorted) path, to rounding
    ref = _run(stacked, x0, grad_out, path="routed")
    torch.testing.assert_close(got[0], ref[0], atol=ATOL, rtol=0)
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=ATOL, rtol=0, msg=k)


def test_packing_survives_an_optimizer_step_and_moving_undoes_it():
    moe = make_moe(tiny(n_shared_experts=0)).pack_experts()
    x0, grad_out = _inputs(moe)
    _run(moe, x0, grad_out)
    torch.optim.AdamW(moe.parameters(), lr=1e-2).step()  # in-place updates keep the slices in the buffer
    assert all(stacked_view(_weights(moe, name)) is not None for name in PROJ)
    moved = copy.deepcopy(moe)  # like .to(): every parameter gets its own storage
    assert all(stacked_view(_weights(moved, name)) is None for name in PROJ)
    a, b = _run(moe, x0, grad_out), _run(moved, x0, grad_out)  # the stacking path: same results
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_a_packed_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = Transformer(small())
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes
    for m in moes:
        m.pack_experts()
    checkpoint.save(model, tmp_path / "ckpt")  # safetensors refuses shared storage: slices are copied out
    back = checkpoint.load(tmp_path / "ckpt")
    got, want = back.state_dict(), model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    save_hf(model, tmp_path / "hf")  # the Hugging Face layout too
    got = load_hf(tmp_path / "hf").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(stacked_view(_weights(m, "w1")) is not None for m in moes)  # saving left the buffers alone
