"""GRPO loss math against float64 hand computations; each option changes exactly what it should."""
import math

import pytest
import torch

from dsv4.errors import InvalidArgument
from dsv4.posttrain.grpo_loss import (GRPOLossConfig, aggregate, clipped_surrogate, group_advantages, grpo_loss,
                                      k3_kl)

D = torch.float64


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=D)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)              # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(group_advantages(r[:4], 4, eps=0.0), torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=D) / std)
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert torch.allclose(group_advantages(r, 4), torch.tensor(want, dtype=D))
    # eps keeps a group with equal rewards at 0 (not NaN); Dr. GRPO: no std division, only the mean removed
    assert torch.isfinite(group_advantages(r, 4)).all()
    dr = group_advantages(r, 4, scale=False)
    assert torch.allclose(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=D))
    with pytest.raises(InvalidArgument, match="groups"):
        group_advantages(r, 3)


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4, dtype=D)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]], dtype=D))   # ratios
    adv_pos = torch.tensor([2.0], dtype=D)
    loss, bound = clipped_surrogate(logp, old, adv_pos, 0.2)
    # A > 0: min(r A, clip(r) A) -> 0.5*2, 0.9*2, 1.1*2, 1.2*2 (clipped above)
    assert torch.allclose(loss, -torch.tensor([[1.0, 1.8, 2.2, 2.4]], dtype=D))
    assert bound.tolist() == [[False, False, False, True]]
    loss, bound = clipped_surrogate(logp, old, -adv_pos, 0.2)
    # A < 0: min(-2r, -2 clip(r)) -> -1.6 (clip below binds at 0.5), -1.8, -2.2, -3.0
    assert torch.allclose(loss, torch.tensor([[1.6, 1.8, 2.2, 3.0]], dtype=D))
    assert bound.tolist() == [[True, False, False, False]]
    # epsilon_high moves only the upper bound
    loss_hi, bound_hi = clipped_surrogate(logp, old, adv_pos, 0.2, epsilon_high=0.28)
    assert torch.allclose(loss_hi, -torch.tensor([[1.0, 1.8, 2.2, 2.56]], dtype=D))
    loss_lo, _ = clipped_surrogate(logp, old, -adv_pos, 0.2, epsilon_high=0.28)
    assert torch.allclose(loss_lo, torch.tensor([[1.6, 1.8, 2.2, 3.0]], dtype=D))


def test_clipped_tokens_have_no_gradient():
    logp = torch.log(torch.tensor([[1.5, 1.1]], dtype=D)).requires_grad_()
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 2, dtype=D), torch.tensor([1.0], dtype=D), 0.2)
    loss.sum().backward()
    assert logp.grad[0, 0] == 0 and torch.isclose(logp.grad[0, 1], torch.tensor(-1.1, dtype=D))


def test_k3_kl_by_hand_and_unbiased():
    logp, ref = torch.tensor([-1.0], dtype=D), torch.tensor([-2.0], dtype=D)
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([math.exp(-1) + 1 - 1], dtype=D))
    assert k3_kl(logp, logp).item() == 0
    # the mean over samples of the policy approaches the exact KL(p || q)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=D)
    exact = (p * (p / q).log()).sum()
    expect = (p * k3_kl(p.log(), q.log())).sum()          # the expectation over x ~ p
    assert torch.allclose(expect, exact)


def test_aggregations_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate(v, m, "token").item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "sequence").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(v, m, "constant", max_len=8).item() == pytest.approx(10 / (2 * 8))
    # values under the mask never count
    v2 = v.clone()
    v2[0, 3] = v2[1, 2] = 99.0
    for how in ("token", "sequence"):
        assert aggregate(v2, m, how).item() == aggregate(v, m, how).item()


def test_loss_types_change_only_their_parts():
    g = GRPOLossConfig.for_loss_type("grpo", epsilon=0.2)
    dr = GRPOLossConfig.for_loss_type("dr_grpo", epsilon=0.2, max_len=10)
    assert (g.aggregation, g.scale_rewards) == ("token", True)
    assert (dr.aggregation, dr.scale_rewards) == ("constant", False)
    assert (g.epsilon, g.beta) == (dr.epsilon, dr.beta)
    with pytest.raises(InvalidArgument, match="max_len"):
        GRPOLossConfig.for_loss_type("dr_grpo")
    with pytest.raises(InvalidArgument, match="loss_type"):
        GRPOLossConfig.for_loss_type("ppo")


def test_grpo_loss_by_hand_with_kl():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=D))
    old = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5]], dtype=D))
    ref = torch.log(torch.tensor([[0.25, 0.25], [0.5, 0.25]], dtype=D))
    adv = torch.tensor([1.0, -1.0], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0]])
    cfg = GRPOLossConfig(epsilon=0.2, beta=0.5)
    loss, stats = grpo_loss(logp, old, adv, mask, cfg, ref)
    # ratios: [1, 0.5], [2, 1(masked)] ; surrogates: -1, -0.5 (A>0, r<1: unclipped), +2 (A<0: max(-2r, -1.2)... )
    s = [-min(1.0, 1.0), -min(0.5, 0.8), -min(-2.0, -1.2)]
    kl = [math.exp(math.log(0.5)) - math.log(0.5) - 1, 0.0, 0.0]   # ref - logp: log .5, 0, 0
    want = sum(si + 0.5 * ki for si, ki in zip(s, kl)) / 3
    assert loss.item() == pytest.approx(want)
    assert stats["kl"] == pytest.approx(sum(kl) / 3)
    assert stats["clip_frac"] == pytest.approx(0.0)   # ratio 2 with A<0: unclipped side is the min, not the bound
    # beta = 0 drops exactly the KL term; without a reference no KL is asked for
    loss0, stats0 = grpo_loss(logp, old, adv, mask, GRPOLossConfig(epsilon=0.2), ref)
    assert loss0.item() == pytest.approx(sum(s) / 3) and stats0["kl"] == stats["kl"]
    with pytest.raises(InvalidArgument, match="reference"):
        grpo_loss(logp, old, adv, mask, cfg)
