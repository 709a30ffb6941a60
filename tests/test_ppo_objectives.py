"""PPO's math against hand computations on fixed numbers: per-token rewards with the KL
penalty, GAE (masks, gamma = lambda = 1, lambda = 0), whitening, the clipped value loss at and
around its clip boundaries, and the adaptive KL controller."""

from __future__ import annotations

import pytest
import torch

from align_ppo.objectives import (
    AdaptiveKLController,
    explained_variance,
    gae,
    token_rewards,
    value_loss,
    whiten,
)

MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 99.0]])  # 99 is padding: ignored
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, MASK, kl_coef=0.1)
    expected = torch.tensor([[-0.01, -0.02, -0.03 + 1.0], [-0.05, -0.05 - 2.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_token_rewards_skip_a_row_without_tokens():
    mask = torch.tensor([[False, False], [True, False]])
    rewards = token_rewards(torch.tensor([5.0, 3.0]), torch.zeros(2, 2), mask, kl_coef=0.5)
    assert rewards.tolist() == [[0.0, 0.0], [3.0, 0.0]]


def test_gae_by_hand():
    """gamma = 0.9, lambda = 0.8 on one 3-token sequence and one 2-token one (padded)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.3, 5.0]])
    advantages, returns = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # Row 0, backwards: delta_2 = 1 - 0.6 = 0.4; A_2 = 0.4
    # delta_1 = 0 + 0.9 * 0.6 - 0.4 = 0.14; A_1 = 0.14 + 0.72 * 0.4 = 0.428
    # delta_0 = 0 + 0.9 * 0.4 - 0.2 = 0.16; A_0 = 0.16 + 0.72 * 0.428 = 0.46816
    # Row 1: delta_1 = -1 - 0.3 = -1.3 (nothing after its last token); A_1 = -1.3
    # delta_0 = 0.5 + 0.9 * 0.3 - 0.1 = 0.67; A_0 = 0.67 + 0.72 * -1.3 = -0.266
    expected = torch.tensor([[0.46816, 0.428, 0.4], [-0.266, -1.3, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, torch.where(MASK, expected + values, torch.zeros(())), atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_the_return_to_go_minus_the_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    to_go = torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]])
    assert torch.allclose(returns, to_go)
    assert torch.allclose(advantages, torch.where(MASK, to_go - values, torch.zeros(())))


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.5, 2.5]])
    advantages, _ = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.5, lam=0.0)
    expected = [1.0 + 0.5 * 1.5 - 0.5, 2.0 + 0.5 * 2.5 - 1.5, 3.0 - 2.5]
    assert advantages[0].tolist() == pytest.approx(expected)


def test_gae_ignores_whatever_padding_holds():
    rewards = torch.tensor([[1.0, float("nan")]])
    values = torch.tensor([[0.25, float("inf")]])
    advantages, returns = gae(rewards, values, torch.tensor([[True, False]]), gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[0.75, 0.0]] and returns.tolist() == [[1.0, 0.0]]


def test_whiten_uses_the_masked_tokens_only():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1000.0]])
    out = whiten(values, MASK, eps=0.0)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - 3.0) / real.std()  # sample std, sqrt(2.5)
    assert torch.allclose(out[MASK], expected) and out[1, 2] == 0


def test_value_loss_by_hand_across_the_clip_boundaries():
    """c = 0.2, old values 1.0, return 2.0: a value inside the clip range is the plain squared
    error; one that moved past the range away from the return is clipped only if that is
    worse; one past the range toward the return keeps its clipped (larger) error."""
    old = torch.ones(1, 4)
    returns = torch.full((1, 4), 2.0)
    values = torch.tensor([[1.1, 1.5, 0.5, 1.2]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 4, dtype=torch.bool), clip=0.2)
    # 1.1: inside: (1.1 - 2)^2 = 0.81
    # 1.5: toward R past the range: max((1.5-2)^2, (1.2-2)^2) = max(0.25, 0.64) = 0.64 (clipped)
    # 0.5: away from R past the range: max((0.5-2)^2, (0.8-2)^2) = max(2.25, 1.44) = 2.25
    # 1.2: exactly at the boundary: both 0.64, not counted as clipped
    per_token = [0.81, 0.64, 2.25, 0.64]
    assert float(loss) == pytest.approx(0.5 * sum(per_token) / 4)
    assert float(stats["clip_fraction"]) == pytest.approx(0.25)


def test_value_loss_gradient_is_zero_where_the_clipped_term_is_taken():
    values = torch.tensor([[1.5, 1.1]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = value_loss(values, torch.ones(1, 2), torch.full((1, 2), 2.0), mask, 0.2)
    loss.backward()
    assert values.grad is not None
    # 1.5 is clipped to 1.2 (a constant): no gradient; 1.1: d/dV 0.5 (V - 2)^2 / 2 tokens = (1.1 - 2) / 2
    assert values.grad[0].tolist() == pytest.approx([0.0, -0.45])


def test_value_loss_without_clip_and_with_masked_tokens():
    values = torch.tensor([[1.0, 3.0], [0.0, float("nan")]])
    returns = torch.tensor([[2.0, 2.0], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = value_loss(values, torch.zeros(2, 2), returns, mask, clip=None)
    assert float(loss) == pytest.approx(0.5 * (1 + 1 + 1) / 3)
    assert float(stats["clip_fraction"]) == 0


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full((1, 4), 2.5), returns, mask)) == pytest.approx(0.0)


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(coef=0.1, target=6.0, horizon=1000)
    # KL 9 > target: error = min(9/6 - 1, 0.2) = 0.2; beta = 0.1 * (1 + 64/1000 * 0.2)
    assert controller.update(9.0, 64) == pytest.approx(0.1 * 1.0128)
    # KL 4.5: error = 4.5/6 - 1 = -0.25, clipped to -0.2
    before = controller.coef
    assert controller.update(4.5, 100) == pytest.approx(before * (1 - 0.02))
    # On target: unchanged
    before = controller.coef
    assert controller.update(6.0, 100) == pytest.approx(before)
    # Slightly below: unclipped error -0.1
    assert controller.update(5.4, 500) == pytest.approx(before * (1 - 0.05))
