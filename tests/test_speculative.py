"""Speculative decoding with MTP drafts: greedy output is exactly greedy decoding's; sampling keeps the
main model's distribution."""

import pytest
import torch

from dsv3lib.config import ModelConfig
from dsv3lib.data import load_corpus
from dsv3lib.generate import generate
from dsv3lib.model import Transformer
from dsv3lib.speculative import accept_or_resample, speculative_generate
from dsv3lib.train import TrainConfig, train


def random_model(n_mtp: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny", n_layers=2, n_mtp_modules=n_mtp, max_seq_len=96, init_std=0.1))


@pytest.fixture(scope="module")
def trained():
    """A small model trained briefly with 2 MTP depths, so that drafts are often right at both depths."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", n_layers=2, n_mtp_modules=2, max_seq_len=128))
    train(model, TrainConfig(steps=100, batch_size=8, seq_len=64, eval_every=100, eval_batches=1), progress=False)
    return model.eval()


@pytest.mark.parametrize("n_mtp", [1, 3])
def test_greedy_equals_plain_greedy_on_random_models(n_mtp):
    model = random_model(n_mtp)
    for i in range(6):
        prompt = torch.randint(0, 256, (1 + 3 * i,), generator=torch.Generator().manual_seed(i))
        expected = generate(model, prompt, 20)
        for depth in range(1, n_mtp + 1):
            got, stats = speculative_generate(model, prompt, 20, depth=depth)
            assert torch.equal(got, expected), (i, depth)
            assert stats.new_tokens == 20 and len(stats.sources) == 20


@pytest.mark.slow
def test_greedy_equals_plain_greedy_on_a_trained_model(trained):
    val = load_corpus().val
    checked = [0, 0]
    accepted = [0, 0]
    for i in range(8):
        prompt = val[i * 5000:i * 5000 + 1 + 4 * i]
        expected = generate(trained, prompt, 40)
        for depth in (1, 2):
            got, stats = speculative_generate(trained, prompt, 40, depth=depth)
            assert torch.equal(got, expected), (i, depth)
            assert stats.tokens_per_forward >= 1.0
        for k in range(2):
            checked[k] += stats.proposed[k]
            accepted[k] += stats.accepted[k]
    assert accepted[0] > 0 and accepted[1] > 0, "both depths must be exercised"
    assert checked[1] <= checked[0]


@pytest.mark.slow
def test_stats_add_up(trained):
    prompt = load_corpus().val[:16]
    tokens, stats = speculative_generate(trained, prompt, 30, depth=2)
    assert stats.new_tokens == tokens.size(1) - 16 == 30
    assert stats.sources.count("draft") == sum(stats.accepted)
    own = [src for src in stats.sources if src != "draft"]
    assert len(own) == stats.main_forwards  # every main forward yields one token of its own
    assert own[0] == "main" and set(own) <= {"main", "correction", "bonus"}
    # a round stops at its first rejected draft, so each rejection is one correction
    assert own.count("correction") == sum(stats.proposed) - sum(stats.accepted)
    assert stats.tokens_per_forward == pytest.approx(30 / stats.main_forwards)
    assert all(0 <= a <= 1 for a in stats.acceptance)


@pytest.mark.slow
def test_eos_stops_like_plain_generation(trained):
    prompt = load_corpus().val[100:120]
    plain = generate(trained, prompt, 30)
    eos = int(plain[0, 20 + 5])  # the 6th generated token
    expected = generate(trained, prompt, 30, eos_id=eos)
    got, _ = speculative_generate(trained, prompt, 30, depth=2, eos_id=eos)
    first = (expected[0, 20:] == eos).nonzero()[0, 0].item()
    assert torch.equal(got, expected[:, :20 + first + 1])


def test_accept_or_resample_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
    q = torch.tensor([0.10, 0.10, 0.30, 0.30, 0.10, 0.10])
    n = 40_000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    counts = torch.zeros(6)
    for d in drafts:
        counts[accept_or_resample(p, q, d, g)[1]] += 1
    assert (counts / n - p).abs().max() < 0.01
    # if the draft distribution equals the target, everything is accepted
    assert all(accept_or_resample(p, p, d, g)[0] for d in drafts[:500])


@pytest.mark.slow
def test_speculative_sampling_keeps_the_second_token_distribution():
    """Exact marginal of the 2nd new token under the main model vs the frequency of speculative samples."""
    torch.manual_seed(1)
    cfg = ModelConfig.preset("tiny", vocab_size=8, dim=32, n_layers=1, n_dense_layers=1, n_heads=2,
                             max_seq_len=16, init_std=0.5)
    model = Transformer(cfg).eval()
    prompt = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        p1 = torch.softmax(model(prompt, mtp=False).logits[0, -1], -1)
        nxt = torch.cat([prompt.repeat(8, 1), torch.arange(8)[:, None]], 1)
        p2 = torch.softmax(model(nxt, mtp=False).logits[:, -1], -1)  # (8, 8): p(t2 | t1)
    exact = p1 @ p2
    n = 2000
    counts = torch.zeros(8)
    accepted = 0
    for s in range(n):
        tokens, stats = speculative_generate(model, prompt, 3, temperature=1.0, seed=s)
        counts[tokens[0, 4]] += 1
        accepted += stats.accepted[0]
    assert 0 < accepted < n  # the rule was exercised both ways
    assert (counts / n - exact).abs().max() < 0.04  # about 3.5 standard errors at n = 2000


@pytest.mark.parametrize("kwargs, field", [
    (dict(depth=0), "depth"), (dict(depth=2), "depth"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=93), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
])
def test_bad_arguments(kwargs, field):
    model = random_model(1)
    kwargs = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=f"^{field}"):
        speculative_generate(model, [1, 2, 3], **kwargs)
    with pytest.raises(ValueError, match="^prompt"):
        speculative_generate(model, [[1, 2], [3, 4]], 5)


def test_expected_tokens_per_forward():
    from dsv3lib.speculative import expected_tokens_per_forward as e

    assert e(0.85) == pytest.approx(1.85)
    assert e(0.5, depth=3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert e([0.9, 0.5]) == pytest.approx(1 + 0.9 + 0.45)
    assert e(0.0, depth=4) == 1.0
    with pytest.raises(ValueError, match="^acceptance"):
        e(1.5)
