"""Loss-free balancing: the bias moves by ±γ toward the mean load and evens out the loads."""

import pytest
import torch

from dsv3lib.balancing import BiasBalancer, max_violation
from dsv3lib.config import ModelConfig
from dsv3lib.model import MoE


def test_max_violation():
    assert max_violation(torch.tensor([4, 4, 4, 4])) == 0.0
    assert max_violation(torch.tensor([8, 4, 2, 2])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="^counts"):
        max_violation(torch.zeros(4))


def test_bias_update_is_sign_of_deficit():
    torch.manual_seed(0)
    moe = MoE(ModelConfig.preset("tiny"))
    moe.gate.last_counts = torch.tensor([10, 0, 5, 5] * 4)  # mean 5
    BiasBalancer(moe, gamma=0.1).update()
    assert torch.allclose(moe.gate.bias, torch.tensor([-0.1, 0.1, 0.0, 0.0] * 4))


def test_balancer_evens_out_a_skewed_router():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight[:4] += 1.0  # experts 0-3 attract about half of all tokens each
    x = torch.randn(1024, cfg.dim)
    balancer = BiasBalancer(moe, gamma=0.005)
    moe(x)
    start = max_violation(moe.gate.last_counts)
    late = []
    for _ in range(300):
        moe(x)
        balancer.update()
        late.append(max_violation(moe.gate.last_counts))
    assert start > 0.9 and sum(late[-20:]) / 20 < 0.35  # sign updates oscillate by ±γ around balance
    assert moe.gate.bias[:4].max() < 0 < moe.gate.bias[4:].max()


def test_bad_gamma():
    with pytest.raises(ValueError, match="^gamma"):
        BiasBalancer(MoE(ModelConfig.preset("tiny")), gamma=0.0)
