"""The math of policy-gradient methods (GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, PPO's actor): the
clipped policy loss, loss aggregation, KL estimators, truncated importance sampling, the entropy bonus, the
overlong penalty and the advantage estimators. Pure torch, no state; every formula is written in
its function's docstring with the paper it comes from (docs/algorithms/grpo.md, "Formulas").

Conventions: per-token tensors are ``[B, T]`` (B completions, T completion positions) with a
mask ``[B, T]`` that is true (or non-zero) on completion tokens. Masked-out positions may hold
any value, even inf or NaN: they are replaced before any arithmetic, so they never reach a value
or a gradient.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
KLEstimator = Literal["k1", "k2", "k3"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)

# exp() of a log-ratio beyond this many nats overflows the k3 estimator long before it means
# anything; verl clamps its "low_var_kl" the same way.
_K3_LOG_RATIO_LIMIT = 20.0


def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _masked(values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """values where mask, else fill; a where (not a product) so inf/NaN padding cannot leak."""
    return torch.where(mask, values, torch.full_like(values, fill))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return _masked(values, mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def aggregate(
    values: Tensor, mask: Tensor, mode: str = "token_mean", normalizer: float | Tensor | None = None
) -> Tensor:
    """Reduce a per-token ``[B, T]`` loss to a scalar, ``numerator / normalizer``.

    - ``token_mean`` (DAPO, Yu et al. 2025, token-level policy-gradient loss):
      ``sum_{i,t} m_it v_it / sum_{i,t} m_it``. Every token weighs the same, so long
      completions are not under-weighted.
    - ``seq_mean_token_mean`` (original GRPO, Shao et al. 2024, eq. 3):
      ``sum_i [sum_t m_it v_it / sum_t m_it] / #{i : sum_t m_it > 0}``. Each completion weighs
      the same; a completion with no token (e.g. masked as overlong) is left out, not counted
      as a zero.
    - ``seq_mean_token_sum`` (Dr.GRPO, Liu et al. 2025, "Understanding R1-Zero-like training",
      with the constant of their code): ``sum_{i,t} m_it v_it / (B * L)``, with ``L`` a
      constant, the maximum completion length (default: T). The constant removes GRPO's length
      bias: a token's weight does not depend on its completion's length.

    ``normalizer`` replaces the denominator (token count, non-empty sequence count, or
    ``B * L``). Pass the value of the *whole* optimizer step, computed once with
    :func:`global_normalizer` on the step's full mask, to every micro-batch: since each
    numerator is a plain sum, the micro-batch losses then add up exactly to the full-batch loss
    and gradient accumulation (summing, not averaging) reproduces the full-batch gradient.
    Under data parallelism with gradients averaged over W ranks, pass
    ``global_normalizer(all ranks' masks) / W``.
    """
    mask = _bool_mask(mask)
    if mode in ("token_mean", "seq_mean_token_sum"):
        numerator = _masked(values, mask).sum()
    elif mode == "seq_mean_token_mean":
        tokens_per_sequence = mask.sum(-1).clamp(min=1)
        numerator = (_masked(values, mask).sum(-1) / tokens_per_sequence).sum()
    else:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    if normalizer is None:
        normalizer = global_normalizer(mask, mode)
    return numerator / normalizer


def global_normalizer(
    mask: Tensor, mode: str = "token_mean", max_completion_length: int | None = None
) -> float:
    """The denominator :func:`aggregate` uses for ``mask`` in ``mode``, at least 1 (an empty
    batch gives a zero loss, not NaN): the number of completion tokens (``token_mean``), of
    non-empty completions (``seq_mean_token_mean``), or ``B * max_completion_length``
    (``seq_mean_token_sum``; default length: the mask's width T)."""
    mask = _bool_mask(mask)
    if mode == "token_mean":
        count = int(mask.sum())
    elif mode == "seq_mean_token_mean":
        count = int((mask.sum(-1) > 0).sum())
    elif mode == "seq_mean_token_sum":
        length = mask.shape[-1] if max_completion_length is None else max_completion_length
        count = mask.shape[0] * length
    else:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    return float(max(count, 1))


# --------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    is_weights: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate loss and its metrics.

    Per token, with ``r = exp(logp - old_logp)`` and advantage ``A`` (``[B]``, broadcast over
    the tokens, or ``[B, T]``):

    - PPO's clipped surrogate (Schulman et al. 2017, eq. 7), with separate bounds
      (DAPO's clip-higher, Yu et al. 2025):
      ``l = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``.
      The gradient is zero where the clip is active: ``r > 1 + clip_high`` with ``A > 0``, or
      ``r < 1 - clip_low`` with ``A < 0``.
    - Dual clip (Ye et al. 2020, "Mastering complex control in MOBA games with deep RL"),
      ``dual_clip = c > 1``: for ``A < 0``, ``l = min(l, -c A)``, which bounds the loss of a
      token whose ratio has grown far beyond ``1 + clip_high`` while its advantage is negative.
    - Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
      brings you off-policy RL training"): ``l = w l`` with ``w`` from
      :func:`truncated_is_weights`, correcting for the rollout engine's numerics differing from
      the trainer's. ``w`` is used detached.

    The per-token losses are reduced by :func:`aggregate` (``aggregation``, ``normalizer``).

    Metrics (detached, means over the mask's tokens of this call): ``clip_fraction_low`` and
    ``clip_fraction_high`` (tokens where that clip zeroes the gradient), ``clip_fraction``
    (their sum), ``dual_clip_fraction``, ``ratio_mean``, ``ratio_max``, and ``approx_kl``,
    Schulman's k3 estimate of KL(old || new) from samples of the old policy:
    ``mean((r - 1) - log r)``.
    """
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = _bool_mask(mask)
    # exp of a bf16/fp16 log-ratio is too coarse to see a 0.2 clip; compute in at least float32
    dtype = torch.promote_types(logp.dtype, torch.float32)
    log_ratio = _masked(logp.to(dtype) - old_logp.to(dtype), mask)
    ratio = torch.exp(log_ratio)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(ratio.dtype).expand_as(ratio)

    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    dual_clipped = torch.zeros_like(mask)
    if dual_clip is not None:
        dual_bound = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (per_token > dual_bound)
        per_token = torch.where(dual_clipped, dual_bound, per_token)
    if is_weights is not None:
        per_token = per_token * _masked(is_weights.detach().to(per_token.dtype), mask, 1.0)

    loss = aggregate(per_token, mask, aggregation, normalizer)
    return loss, _policy_metrics(
        ratio.detach(), log_ratio.detach(), advantages, mask, clip_low, clip_high, dual_clipped
    )


def _policy_metrics(
    ratio: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clipped: Tensor,
) -> dict[str, Tensor]:
    advantages = advantages.detach()
    low = mask & (ratio < 1 - clip_low) & (advantages < 0)
    high = mask & (ratio > 1 + clip_high) & (advantages > 0)
    tokens = mask.sum().clamp(min=1)
    low_fraction = low.sum() / tokens
    high_fraction = high.sum() / tokens
    return {
        "clip_fraction_low": low_fraction,
        "clip_fraction_high": high_fraction,
        "clip_fraction": low_fraction + high_fraction,
        "dual_clip_fraction": (dual_clipped & mask).sum() / tokens,
        "ratio_mean": _masked_mean(ratio, mask),
        "ratio_max": _masked(ratio, mask, float("-inf")).max() if mask.any() else ratio.new_tensor(1.0),
        "approx_kl": _masked_mean((ratio - 1) - log_ratio, mask),
    }


# --------------------------------------------------------------------------------------------
# KL to the reference, importance weights, entropy, overlong penalty
# --------------------------------------------------------------------------------------------


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL divergence", http://joschu.net/blog/kl-approx.html).

    With ``d = logp - ref_logp`` (so the blog's ``r = pi_ref / pi = exp(-d)``):

    - ``k1 = d`` (``-log r``): unbiased, high variance, negative on some tokens;
    - ``k2 = d^2 / 2`` (``(log r)^2 / 2``): biased, low variance, >= 0;
    - ``k3 = exp(-d) - 1 + d`` (``(r - 1) - log r``): unbiased, low variance, >= 0; GRPO's
      choice (Shao et al. 2024, eq. 4). ``d`` is clamped to +-20 first (as verl does) so a
      token's exp cannot overflow; below that the value is exact.

    Used in the loss (``beta * aggregate(kl_penalty(...))``) or subtracted from the reward.
    """
    dtype = torch.promote_types(logp.dtype, torch.float32)
    log_ratio = logp.to(dtype) - ref_logp.to(dtype)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-_K3_LOG_RATIO_LIMIT, _K3_LOG_RATIO_LIMIT)
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def truncated_is_weights(
    trainer_logp: Tensor, engine_logp: Tensor, mask: Tensor, cap: float = 2.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance-sampling weights between the trainer and the rollout engine
    (TIS: Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"; the truncation is IMPALA's, Espeholt et al. 2018).

    The engine sampled the tokens with its own numerics (``engine_logp``); the trainer's
    log-probs of the same policy (``trainer_logp``, taken before the update) differ. Per token
    ``w = min(exp(trainer_logp - engine_logp), cap)``, detached; 1 outside the mask.

    Metrics over the mask's tokens: ``is_mismatch`` = mean of ``exp(|trainer_logp -
    engine_logp|)`` (1 when the two agree), ``is_ratio_max`` (before the cap), and
    ``is_capped_fraction`` (tokens whose ratio exceeded the cap).
    """
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    mask = _bool_mask(mask)
    log_ratio = _masked(trainer_logp.detach() - engine_logp.detach(), mask)
    ratio = torch.exp(log_ratio)
    weights = ratio.clamp(max=cap)
    tokens = mask.sum().clamp(min=1)
    metrics = {
        "is_mismatch": _masked_mean(torch.exp(log_ratio.abs()), mask),
        "is_ratio_max": _masked(ratio, mask, float("-inf")).max() if mask.any() else ratio.new_tensor(1.0),
        "is_capped_fraction": (mask & (ratio > cap)).sum() / tokens,
    }
    return weights, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last axis, per position: ``H = -sum_v p_v log p_v =
    logsumexp(z) - sum_v p_v z_v``, for an entropy bonus ``-coef * aggregate(H)`` (PPO,
    Schulman et al. 2017, eq. 9). Logits must be finite."""
    probabilities = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probabilities * logits).sum(-1)


def overlong_soft_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, overlong reward shaping), added to each completion's
    reward. With ``L = max_len`` and ``C = cache_len``:

    - ``0`` when ``|y| <= L - C``;
    - ``((L - C) - |y|) / C`` when ``L - C < |y| <= L`` (falls linearly to -1 at ``|y| = L``);
    - ``-1`` when ``|y| > L``.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = lengths.to(torch.get_default_dtype())
    free_length = max_len - cache_len
    ramp = (free_length - lengths) / cache_len
    return torch.where(lengths <= free_length, torch.zeros_like(lengths), ramp.clamp(min=-1.0))


# --------------------------------------------------------------------------------------------
# Advantage estimators: rewards [G, n] (G prompts x n samples each) -> advantages [G, n]
# --------------------------------------------------------------------------------------------


def _as_float(rewards: Tensor) -> Tensor:
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def _std(values: Tensor, dim: int | None) -> Tensor:
    """Sample std (Bessel's correction, as torch, TRL and verl), 0 where one value is all."""
    count = values.numel() if dim is None else values.shape[dim]
    if count < 2:
        return torch.zeros_like(values.mean() if dim is None else values.mean(dim, keepdim=True))
    return values.std() if dim is None else values.std(dim, keepdim=True)


def group_mean_std(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, "DeepSeekMath", eq. 3 / section 4.1.2, outcome supervision):
    ``A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps)``, sample std over the group.
    A group of one sample, or of equal rewards, gets zeros."""
    rewards = _as_float(rewards)
    return (rewards - rewards.mean(-1, keepdim=True)) / (_std(rewards, -1) + eps)


def group_mean(rewards: Tensor) -> Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): ``A_ij = r_ij -
    mean_j r_ij``, without GRPO's division by the std (which up-weights near-solved and
    near-failed prompts)."""
    rewards = _as_float(rewards)
    return rewards - rewards.mean(-1, keepdim=True)


def leave_one_out(rewards: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to basics: revisiting REINFORCE style
    optimization for learning from human feedback in LLMs"; Kool et al. 2019):
    ``A_ij = r_ij - 1/(n-1) sum_{k != j} r_ik`` (= ``n/(n-1) (r_ij - mean_j r_ij)``): each
    sample's baseline is the mean of the other samples of its prompt, so it is unbiased.
    A group of one sample has no other sample: zeros."""
    rewards = _as_float(rewards)
    samples = rewards.shape[-1]
    if samples < 2:
        return torch.zeros_like(rewards)
    others_mean = (rewards.sum(-1, keepdim=True) - rewards) / (samples - 1)
    return rewards - others_mean


def batch_whiten(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ (Hu 2025, "REINFORCE++: a simple and efficient approach for aligning large
    language models", arXiv:2501.03262): ``A = (r - mean(r)) / (std(r) + eps)`` over the whole batch,
    every prompt's samples together (sample std); no per-prompt baseline. One reward, or all
    equal, gives zeros."""
    rewards = _as_float(rewards)
    return (rewards - rewards.mean()) / (_std(rewards, None) + eps)
