"""PPO's own math, beside the policy-gradient pieces of ``align.objectives``: per-token rewards
with the KL penalty, generalized advantage estimation, advantage whitening, the clipped value
loss and the adaptive KL controller. Pure torch; formulas in each docstring and in
docs/algorithms/ppo.md.

Conventions as in ``align.objectives``: per-token tensors are ``[B, T]``, one completion per
row, left-aligned, with a bool mask true on its tokens. Masked-out positions may hold anything;
they never reach a value or a gradient, and every output is zero there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from align import objectives


def _where(mask: Tensor, values: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros_like(values))


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """The reward of each token (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2):
    ``r_t = -beta * KL_t``, plus the sequence's reward-model score ``s`` at its last token:
    ``r_{T-1} += s``. ``scores`` is ``[B]``; ``kl`` the per-token estimate ``[B, T]``. A row
    without tokens gets nothing."""
    mask = mask.bool()
    rewards = _where(mask, -kl_coef * kl.float())
    lengths = mask.sum(dim=1)
    rows = torch.nonzero(lengths > 0).flatten()
    last = lengths[rows] - 1
    return rewards.index_put((rows, last), scores.float()[rows], accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-dimensional continuous
    control using generalized advantage estimation", eq. 16):

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        (V after the last token: 0)
        A_t     = delta_t + gamma * lam * A_{t+1}           (A after the last token: 0)
        R_t     = A_t + V(s_t)                              (the critic's regression target)

    ``lam = 1`` gives the discounted return minus ``V(s_t)`` (Monte-Carlo); ``lam = 0`` the
    one-step TD error. Returns ``(advantages, returns)``, float32, zero where ``mask`` is
    false. No gradient flows (``values`` are the critic's old values)."""
    mask = mask.bool()
    rewards = _where(mask, rewards.detach().float())
    values = _where(mask, values.detach().float())
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(mask[:, t], advantage, torch.zeros_like(advantage))
        # Past a sequence's end nothing follows: its last token bootstraps from 0.
        next_value = torch.where(mask[:, t], values[:, t], torch.zeros_like(next_value))
        next_advantage = advantages[:, t]
    returns = _where(mask, advantages + values)
    return advantages, returns


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x - mean(x)) / (std(x) + eps)`` over the tokens under ``mask`` (all rows together,
    sample std: ``align.objectives.batch_whiten``), zero elsewhere: advantage normalization as
    in OpenAI's baselines PPO2 and Ouyang et al. (2022)."""
    mask = mask.bool()
    out = torch.zeros_like(values, dtype=torch.float32)
    if mask.any():
        out[mask] = objectives.batch_whiten(values[mask].float(), eps)
    return out


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss (Schulman et al. 2017's baselines implementation; Ziegler et al.
    2019; NeMo-Aligner's critic), the mean over masked tokens of

        V_clip = old_V + clamp(V - old_V, -c, c)
        L_V    = max((V - R)^2, (V_clip - R)^2) / 2

    so that a value may not move more than ``c`` from the one the advantages were computed
    with, unless that brings it closer to the return. ``clip=None``: ``(V - R)^2 / 2``. Metrics:
    ``clip_fraction`` (share of tokens where the clipped term is the larger, strictly),
    ``value_mean``, ``explained_variance`` (``1 - Var(R - V) / Var(R)``)."""
    mask = mask.bool()
    values = values.float()
    old_values = old_values.detach().float()
    returns = returns.detach().float()
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token = unclipped
        clipped_taken = torch.zeros_like(mask)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped = (clipped_values - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipped_taken = clipped > unclipped
    tokens = mask.sum().clamp(min=1)
    loss = 0.5 * _where(mask, per_token).sum() / tokens
    stats = {
        "clip_fraction": (clipped_taken & mask).sum() / tokens,
        "value_mean": _where(mask, values.detach()).sum() / tokens,
        "explained_variance": explained_variance(values.detach(), returns, mask),
    }
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 for a perfect critic, 0 for one no
    better than a constant (0 when the returns do not vary)."""
    mask = mask.bool()
    if int(mask.sum()) < 2:
        return torch.zeros(())
    r, v = returns[mask].float(), values[mask].float()
    variance = r.var()
    if float(variance) == 0.0:
        return torch.zeros(())
    return 1 - (r - v).var() / variance


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019), "Fine-tuning language models from human preferences", section 2.2:
    after each batch of ``n`` samples with mean KL ``KL_t`` (nats per completion),

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + n / horizon * e_t)

    a proportional controller that moves beta by at most a factor e^0.2 per ``horizon`` samples."""

    coef: float
    target: float
    horizon: int

    def update(self, kl: float, samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + samples / self.horizon * error
        return self.coef
