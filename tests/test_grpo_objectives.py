"""The GRPO family's math (align_grpo.objectives) against hand computations on small fixed tensors.

Ratios are built as r = exp(log r) in float64; where a test sits *exactly* on a clip boundary the
bound is taken from the tensor's own ratio (1 + (r - 1) == r exactly for r in [1, 2]), so
"at the boundary" does not depend on how exp rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from align.objectives import (
    aggregate,
    batch_whiten,
    entropy_from_logits,
    global_normalizer,
    group_mean,
    group_mean_std,
    kl_penalty,
    leave_one_out,
    overlong_soft_penalty,
    policy_loss,
    truncated_is_weights,
)

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def log_ratios(*ratios: float) -> torch.Tensor:
    """Policy log-probs [1, T] whose ratio to an old log-prob of 0 is each given ratio."""
    return torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)


def exact_ratio(logp: torch.Tensor, index: int) -> float:
    """The ratio exactly as policy_loss computes it: exp over the whole tensor (vectorised exp
    can round differently from a scalar one)."""
    return float(torch.exp(logp.detach()).flatten()[index])


def ones_mask(like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape, dtype=torch.bool)


def values_of(tensor: torch.Tensor | None) -> list[float]:
    assert tensor is not None
    return [float(v) for v in tensor.detach().flatten()]


# --------------------------------------------------------------------------------------------
# Policy loss: clipping
# --------------------------------------------------------------------------------------------


def test_positive_advantage_is_clipped_only_above_one_plus_clip_high() -> None:
    logp = log_ratios(0.5, 1.0, 1.2, 1.5)
    old = torch.zeros_like(logp)
    high = exact_ratio(logp, 2) - 1  # 0.2, with 1.2 exactly on the boundary
    loss, metrics = policy_loss(logp, old, torch.tensor([2.0]), ones_mask(logp), clip_low=0.2, clip_high=high)
    # per token -min(r A, clip(r, 0.8, 1.2) A), A = 2:
    #   r=0.5: -min(1.0, 0.8*2=1.6) = -1.0   (below 1-eps but A > 0: not clipped)
    #   r=1.0: -2.0;  r=1.2: -2.4 (boundary);  r=1.5: -min(3.0, 2.4) = -2.4 (clipped)
    assert loss.item() == pytest.approx((-1.0 - 2.0 - 2.4 - 2.4) / 4)
    loss.backward()
    # d/dlogp of -r A / 4 is -r A / 4 where unclipped; 0 where clipped
    assert values_of(logp.grad) == pytest.approx([-0.25, -0.5, -0.6, 0.0])
    assert float(metrics["clip_fraction_high"]) == 0.25
    assert float(metrics["clip_fraction_low"]) == 0.0
    assert float(metrics["clip_fraction"]) == 0.25
    assert float(metrics["ratio_mean"]) == pytest.approx((0.5 + 1.0 + 1.2 + 1.5) / 4)
    assert float(metrics["ratio_max"]) == pytest.approx(1.5)
    # k3 of KL(old || new): mean of (r - 1) - log r
    k3 = [(r - 1) - math.log(r) for r in (0.5, 1.0, 1.2, 1.5)]
    assert float(metrics["approx_kl"]) == pytest.approx(sum(k3) / 4)


def test_negative_advantage_is_clipped_only_below_one_minus_clip_low() -> None:
    logp = log_ratios(0.5, 0.8, 1.0, 1.5)
    old = torch.zeros_like(logp)
    low = 1 - exact_ratio(logp, 1)  # 0.2, with 0.8 exactly on the boundary
    loss, metrics = policy_loss(logp, old, torch.tensor([-1.0]), ones_mask(logp), clip_low=low, clip_high=0.2)
    # A = -1: -min(-r, -clip(r)) = max(r, clip(r, 0.8, 1.2)):
    #   r=0.5: max(0.5, 0.8) = 0.8 (clipped);  r=0.8: 0.8 (boundary);  r=1.0: 1.0
    #   r=1.5: max(1.5, 1.2) = 1.5 (above 1+eps but A < 0: not clipped)
    assert loss.item() == pytest.approx((0.8 + 0.8 + 1.0 + 1.5) / 4)
    loss.backward()
    assert values_of(logp.grad) == pytest.approx([0.0, 0.2, 0.25, 0.375])
    assert float(metrics["clip_fraction_low"]) == 0.25
    assert float(metrics["clip_fraction_high"]) == 0.0


def test_clip_higher_lets_a_positive_token_grow_further() -> None:
    logp = log_ratios(1.25)
    old = torch.zeros_like(logp)
    advantage = torch.tensor([1.0])
    symmetric, _ = policy_loss(logp, old, advantage, ones_mask(logp), clip_low=0.2, clip_high=0.2)
    dapo, _ = policy_loss(logp, old, advantage, ones_mask(logp), clip_low=0.2, clip_high=0.28)
    assert symmetric.item() == pytest.approx(-1.2)  # clipped at 1.2
    assert dapo.item() == pytest.approx(-1.25)  # 1.25 < 1.28: not clipped


def test_dual_clip_bounds_negative_advantage_losses_only() -> None:
    logp = torch.cat([log_ratios(1.5, 3.0, 5.0), log_ratios(5.0, 1.0, 1.0)]).detach().requires_grad_()
    old = torch.zeros_like(logp)
    dual = exact_ratio(logp, 1)  # 3, with r=3 exactly on the bound
    advantages = torch.tensor([-1.0, 2.0])
    loss, metrics = policy_loss(logp, old, advantages, ones_mask(logp), dual_clip=dual)
    # row 0, A=-1: PPO gives max(r, clip(r)) = 1.5, 3, 5; dual clip min(., 3*1) -> 1.5, 3, 3
    # row 1, A=+2: untouched: -min(10, 2.4) = -2.4, -2, -2
    assert loss.item() == pytest.approx((1.5 + 3.0 + 3.0 - 2.4 - 2.0 - 2.0) / 6)
    loss.backward()
    assert values_of(logp.grad)[2] == 0.0  # dual-clipped: no gradient
    assert values_of(logp.grad)[0] == pytest.approx(1.5 / 6)
    assert float(metrics["dual_clip_fraction"]) == pytest.approx(1 / 6)  # r=5; r=3 is on the bound
    _, beyond = policy_loss(logp, old, advantages, ones_mask(logp), dual_clip=2.9)
    assert float(beyond["dual_clip_fraction"]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, advantages, ones_mask(logp), dual_clip=1.0)


def test_importance_weights_scale_each_token_and_take_no_gradient() -> None:
    logp = log_ratios(1.0, 1.0)
    weights = torch.tensor([[0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(
        logp, torch.zeros_like(logp), torch.tensor([1.0]), ones_mask(logp), is_weights=weights
    )
    assert loss.item() == pytest.approx((-0.5 * 1.0 - 2.0 * 1.0) / 2)
    loss.backward()
    assert weights.grad is None
    assert values_of(logp.grad) == pytest.approx([-0.25, -1.0])


def test_per_token_advantages_equal_broadcast_sequence_advantages() -> None:
    logp = torch.tensor([[-0.1, 0.3, 0.0], [0.2, -0.4, 0.1]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    per_sequence, _ = policy_loss(logp, old, torch.tensor([0.5, -1.5]), mask)
    per_token, _ = policy_loss(logp, old, torch.tensor([[0.5] * 3, [-1.5] * 3]), mask)
    assert float(per_sequence) == float(per_token)


def test_padding_values_never_reach_the_loss_or_the_gradient() -> None:
    logp = torch.tensor([[0.1, float("inf")], [-0.2, float("nan")]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, -float("inf")], [0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, False]])
    weights = torch.tensor([[1.0, float("nan")], [1.0, float("inf")]], dtype=torch.float64)
    for mode in AGGREGATIONS:
        loss, metrics = policy_loss(
            logp, old, torch.tensor([1.0, -1.0]), mask, aggregation=mode, is_weights=weights
        )
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert values_of(grad)[1] == 0.0 and values_of(grad)[3] == 0.0
        assert all(torch.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------
# Aggregation and the global normaliser
# --------------------------------------------------------------------------------------------

# Two completions of 3 and 1 tokens (padding holds 9s), and an empty one (all 7s).
VALUES = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def test_token_mean_weighs_every_token_the_same() -> None:
    assert float(aggregate(VALUES, MASK, "token_mean")) == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_seq_mean_token_mean_weighs_every_non_empty_completion_the_same() -> None:
    # per-completion means 6/3 = 2 and 4/1 = 4; the empty completion is left out
    assert float(aggregate(VALUES, MASK, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)


def test_seq_mean_token_sum_divides_by_a_constant() -> None:
    # sums 6 and 4 over B * L = 3 rows * 4 positions
    assert float(aggregate(VALUES, MASK, "seq_mean_token_sum")) == pytest.approx((6 + 4) / (3 * 4))
    # Dr.GRPO's constant is the configured max completion length, e.g. 5: 10 / (3 * 5)
    normalizer = global_normalizer(MASK, "seq_mean_token_sum", max_completion_length=5)
    assert normalizer == 15.0
    assert float(aggregate(VALUES, MASK, "seq_mean_token_sum", normalizer)) == pytest.approx(10 / 15)


def test_an_empty_mask_aggregates_to_zero_and_unknown_modes_are_refused() -> None:
    empty = torch.zeros_like(MASK)
    for mode in AGGREGATIONS:
        assert float(aggregate(VALUES, empty, mode)) == 0.0
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(VALUES, MASK, "sequence_mean")
    with pytest.raises(ValueError, match="unknown aggregation"):
        global_normalizer(MASK, "sequence_mean")


def test_global_normalizer_counts() -> None:
    assert global_normalizer(MASK, "token_mean") == 4.0
    assert global_normalizer(MASK, "seq_mean_token_mean") == 2.0
    assert global_normalizer(MASK, "seq_mean_token_sum") == 12.0


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_with_the_global_normalizer_sum_to_the_full_batch_loss_and_gradient(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    logp = (0.3 * torch.randn(6, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    old = 0.3 * torch.randn(6, 5, generator=generator, dtype=torch.float64)
    advantages = torch.randn(6, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 0, 4, 2])  # uneven, one empty completion
    mask = torch.arange(5) < lengths.unsqueeze(-1)

    full, _ = policy_loss(logp, old, advantages, mask, aggregation=mode)
    (full_grad,) = torch.autograd.grad(full, logp)

    normalizer = global_normalizer(mask, mode)
    accumulated = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part, _ = policy_loss(
            logp[rows], old[rows], advantages[rows], mask[rows], aggregation=mode, normalizer=normalizer
        )
        accumulated = accumulated + part
    (accumulated_grad,) = torch.autograd.grad(accumulated, logp)
    assert accumulated.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(accumulated_grad, full_grad, rtol=1e-12, atol=1e-15)


def test_averaging_micro_batch_token_means_is_not_the_full_batch_token_mean() -> None:
    # why the normaliser exists: micro-batch [1,2,3] and [4] average to (2 + 4) / 2 = 3, not 2.5
    parts = [aggregate(VALUES[rows], MASK[rows], "token_mean") for rows in (slice(0, 1), slice(1, 2))]
    assert float(sum(parts)) / 2 == pytest.approx(3.0)
    normalizer = global_normalizer(MASK, "token_mean")
    parts = [
        aggregate(VALUES[rows], MASK[rows], "token_mean", normalizer) for rows in (slice(0, 1), slice(1, 2))
    ]
    assert float(sum(parts)) == pytest.approx(2.5)


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------


def test_k1_k2_k3_values() -> None:
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[-1.0, 0.0, -2.0]])  # d = logp - ref = 1, -1, 0
    assert values_of(kl_penalty(logp, ref, "k1")) == pytest.approx([1.0, -1.0, 0.0])
    assert values_of(kl_penalty(logp, ref, "k2")) == pytest.approx([0.5, 0.5, 0.0])
    # k3 = exp(-d) - 1 + d
    expected = [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1, 0.0]
    assert values_of(kl_penalty(logp, ref, "k3")) == pytest.approx(expected)
    assert values_of(kl_penalty(logp, ref)) == pytest.approx(expected)  # k3 is the default


def test_k1_and_k3_are_unbiased_and_k3_is_never_negative() -> None:
    # exact expectation under pi of each estimator, against KL(pi || ref) = sum pi log(pi / ref)
    pi = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = float((pi * (pi / ref).log()).sum())
    for estimator in ("k1", "k3"):
        expectation = float((pi * kl_penalty(pi.log(), ref.log(), estimator)).sum())
        assert expectation == pytest.approx(true_kl, rel=1e-12)
    generator = torch.Generator().manual_seed(0)
    logp, ref_logp = torch.randn(2, 1000, generator=generator) * 3
    assert (kl_penalty(logp, ref_logp, "k3") >= 0).all()
    assert (kl_penalty(logp, ref_logp, "k2") >= 0).all()


def test_k3_stays_finite_for_huge_log_ratios_and_unknown_estimators_are_refused() -> None:
    assert torch.isfinite(kl_penalty(torch.tensor([0.0]), torch.tensor([200.0]), "k3")).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


# --------------------------------------------------------------------------------------------
# Truncated importance sampling
# --------------------------------------------------------------------------------------------


def test_truncated_is_weights_are_capped_detached_and_their_mismatch_is_logged() -> None:
    trainer = torch.tensor(
        [[0.0, math.log(1.5), math.log(3.0), math.log(0.5), float("inf")]], requires_grad=True
    )
    engine = torch.zeros(1, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    weights, metrics = truncated_is_weights(trainer, engine, mask, cap=2.0)
    # ratios 1, 1.5, 3, 0.5 -> min(., 2); padding gets a neutral 1
    assert values_of(weights) == pytest.approx([1.0, 1.5, 2.0, 0.5, 1.0])
    assert not weights.requires_grad
    # mean exp|delta| = (1 + 1.5 + 3 + 2) / 4 (exp|log 0.5| = 2)
    assert float(metrics["is_mismatch"]) == pytest.approx(7.5 / 4)
    assert float(metrics["is_ratio_max"]) == pytest.approx(3.0)
    assert float(metrics["is_capped_fraction"]) == 0.25
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(trainer, engine, mask, cap=0.0)


# --------------------------------------------------------------------------------------------
# Entropy, overlong penalty
# --------------------------------------------------------------------------------------------


def test_entropy_of_a_uniform_distribution_is_log_vocabulary_size() -> None:
    entropy = entropy_from_logits(torch.full((2, 3, 7), 4.0))
    assert entropy.shape == (2, 3)
    assert values_of(entropy) == pytest.approx([math.log(7)] * 6)


def test_entropy_of_a_known_distribution_and_shift_invariance() -> None:
    logits = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)], dtype=torch.float64)
    # -(0.5 log 0.5 + 2 * 0.25 log 0.25) = 0.5 log 2 + log 2
    assert float(entropy_from_logits(logits)) == pytest.approx(1.5 * math.log(2))
    assert float(entropy_from_logits(logits + 1000)) == pytest.approx(1.5 * math.log(2))


def test_overlong_penalty_three_regions() -> None:
    # L = 20, cache C = 4: free up to 16, linear to -1 at 20, -1 beyond
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    penalty = overlong_soft_penalty(lengths, max_len=20, cache_len=4)
    assert values_of(penalty) == pytest.approx([0.0, 0.0, (16 - 17) / 4, (16 - 18) / 4, -1.0, -1.0])
    for bad_cache in (0, 21):
        with pytest.raises(ValueError, match="cache_len"):
            overlong_soft_penalty(lengths, max_len=20, cache_len=bad_cache)


# --------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------

# three prompts x four samples; the middle group has equal rewards
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]])


def test_group_mean_std() -> None:
    # row 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3): +-0.5 / sqrt(1/3) = +-sqrt(3)/2
    # row 2: mean 1, deviations 2, -1, -1, 0, sample variance 6/3 = 2: divided by sqrt(2)
    half_root3 = math.sqrt(3) / 2
    root2 = math.sqrt(2)
    expected = [
        half_root3,
        -half_root3,
        -half_root3,
        half_root3,
        0,
        0,
        0,
        0,
        2 / root2,
        -1 / root2,
        -1 / root2,
        0,
    ]
    assert values_of(group_mean_std(REWARDS)) == pytest.approx(expected, abs=1e-5)


def test_group_mean() -> None:
    expected = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 2, -1, -1, 0]
    assert values_of(group_mean(REWARDS)) == pytest.approx(expected)


def test_leave_one_out() -> None:
    # r_i - (sum - r_i) / 3; row 0 sum 2: 1 - 1/3, 0 - 2/3; row 2 sum 4: 3 - 1/3, 0 - 4/3, 1 - 3/3
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, 8 / 3, -4 / 3, -4 / 3, 0]
    assert values_of(leave_one_out(REWARDS)) == pytest.approx(expected)


def test_batch_whiten() -> None:
    # all 12 rewards: sum 10, mean 5/6; squared deviations 7 * (1/6)^2 + 4 * (5/6)^2 + (13/6)^2
    # = (7 + 100 + 169) / 36 = 23/3; sample variance (23/3) / 11 = 23/33
    std = math.sqrt(23 / 33)
    expected = [(r - 5 / 6) / std for r in values_of(REWARDS)]
    advantages = batch_whiten(REWARDS)
    assert values_of(advantages) == pytest.approx(expected, abs=1e-5)
    assert float(advantages.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(advantages.std()) == pytest.approx(1.0, abs=1e-5)


Estimator = Callable[[torch.Tensor], torch.Tensor]
ESTIMATORS: list[Estimator] = [group_mean_std, group_mean, leave_one_out, batch_whiten]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_equal_rewards_give_zero_advantages(estimator: Estimator) -> None:
    advantages = estimator(torch.full((2, 3), 0.7))
    assert values_of(advantages) == pytest.approx([0.0] * 6, abs=1e-6)


@pytest.mark.parametrize("estimator", [group_mean_std, group_mean, leave_one_out])
def test_groups_of_one_sample_give_zeros_not_nan(estimator: Estimator) -> None:
    advantages = estimator(torch.tensor([[1.0], [0.0], [5.0]]))
    assert values_of(advantages) == [0.0, 0.0, 0.0]


def test_batch_whiten_of_a_single_reward_is_zero_and_integer_rewards_are_accepted() -> None:
    assert values_of(batch_whiten(torch.tensor([[3.0]]))) == [0.0]
    assert values_of(group_mean(torch.tensor([[1, 0]]))) == [0.5, -0.5]


def test_half_precision_log_probs_are_compared_in_float32() -> None:
    # bf16 cannot hold the clip bound 1.2 (its nearest value is 1.1953): computed in bf16, -1.1953
    logp = torch.tensor([[math.log(1.25)]], dtype=torch.bfloat16)
    old = torch.zeros_like(logp)
    loss, metrics = policy_loss(logp, old, torch.tensor([1.0]), ones_mask(logp))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-1.2)
    assert float(metrics["clip_fraction_high"]) == 1.0
    assert kl_penalty(logp, old).dtype == torch.float32
