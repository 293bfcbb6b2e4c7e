"""Generation: cached decoding equals recomputing the prefix; sampling knobs behave."""

import pytest
import torch

from dsv3lib.config import ModelConfig
from dsv3lib.generate import generate, sample_next, top_p_filter
from dsv3lib.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("tiny", max_seq_len=64, init_std=0.1))
    with torch.no_grad():  # a random, non-trivial routing bias
        for layer in m.layers[m.cfg.n_dense_layers:]:
            layer.ffn.gate.bias.normal_(0, 0.05)
    return m


def test_greedy_cached_equals_uncached(model):
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 20)
    uncached = generate(model, prompt, 20, use_cache=False)
    assert cached.shape == (3, 27)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :7], prompt)


def test_sampling_cached_equals_uncached_with_seed(model):
    prompt = [72, 101, 108, 108, 111]
    a = generate(model, prompt, 16, temperature=0.8, top_p=0.9, seed=3)
    b = generate(model, prompt, 16, temperature=0.8, top_p=0.9, seed=3, use_cache=False)
    c = generate(model, prompt, 16, temperature=0.8, top_p=0.9, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generation_restores_training_mode(model):
    model.train()
    generate(model, [1, 2, 3], 2)
    assert model.training


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(top_p_filter(probs, 0.5), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    top = sample_next(torch.log(probs).repeat(200, 1), temperature=1.0, top_p=0.5,
                      generator=torch.Generator().manual_seed(0))
    assert torch.all(top == 0)


def test_eos_stops_generation(model):
    first = generate(model, [5, 6, 7], 1)[0, -1].item()
    out = generate(model, [5, 6, 7], 10, eos_id=first)
    assert out.shape == (1, 4)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=60), "max_new_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
])
def test_bad_arguments_name_the_field(model, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        generate(model, [1, 2, 3, 4, 5], **kwargs)


def test_bad_prompt(model):
    with pytest.raises(ValueError, match="^prompt"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="^tokens: id 300"):
        generate(model, [1, 300], 3)
