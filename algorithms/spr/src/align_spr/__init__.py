"""align-spr: SPR, successive policy re-weighting (sample, score, weighted SFT; one model in
memory at a time).

The KL-regularised objective max_pi E[r] - beta KL(pi || pi_t) is solved in closed form by
pi_{t+1}(y|x) = pi_t(y|x) exp(r(x, y) / beta) / Z_t(x). SPR fits pi_{t+1} by weighted maximum
likelihood on samples of pi_t: each iteration samples ``sampling.n`` completions per prompt
with the current policy, scores them, and trains SFT on them with weight
w_i = exp(A_i / beta) / Z(x), A_i = r_i - baseline(x). Only the policy is ever trained, and no
reference, critic or reward model has to sit beside it: the engine is freed once it generated,
the reward once it scored (``offload: true``), then the policy trains.

Normaliser: Z(x) is the per-prompt empirical mean of exp(A/beta) over the N samples (so the
weights of a prompt average 1: w = N softmax(r/beta)). The paper estimates it with a learned
model instead; see docs/algorithms/spr.md for why the empirical one is the default here.

Resume: a checkpoint is written at the end of an iteration; sampling and the training order are
functions of (seed, iteration), so a resumed run ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

import align


class SPRConfig(align.OnlineConfig):
    """``align run --algo spr``: sample N per prompt, weight by exp(advantage / beta), weighted SFT."""

    algo: Literal["spr"] = "spr"
    beta: float = Field(
        0.1, gt=0, description="Temperature of the weights exp(A / beta): smaller trusts the reward more."
    )
    baseline: Literal["mean", "max"] = Field(
        "mean",
        description="Per-prompt baseline subtracted from the rewards (A = r - baseline). With the "
        "empirical normaliser it cancels in the weights; it keeps exp() in range.",
    )
    epochs: int = Field(1, gt=0, description="Passes over each iteration's weighted samples.")
    offload: bool = Field(
        True,
        description="One model beside the policy at a time: the engine is freed after generating and "
        "restarted next iteration; the reward is built for scoring and freed. false: keep both "
        "(faster, more memory).",
    )


def spr_weights(rewards: Tensor, beta: float, baseline: str = "mean") -> Tensor:
    """Weights of the samples of each prompt: ``rewards[p, i]`` for N samples of prompt p ->
    w[p, i] = exp(A[p, i] / beta) / mean_j exp(A[p, j] / beta), A = r - baseline(r[p]).
    Each row averages 1 (w = N softmax(r / beta)); computed in log space."""
    rewards = rewards.double()
    base = rewards.mean(dim=1, keepdim=True) if baseline == "mean" else rewards.amax(dim=1, keepdim=True)
    advantage = (rewards - base) / beta
    return (advantage.size(1) * torch.softmax(advantage, dim=1)).float()


class SPR(align.OnlineAlgorithm):
    config: SPRConfig

    def make_reward(self) -> align.RewardSource | None:
        """Built per scoring phase under ``offload`` (a reward model is freed between them)."""
        return None if self.config.offload else super().make_reward()

    # ---- the driver --------------------------------------------------------------------
    def planned_steps(self) -> int:
        cfg, t = self.config, self.config.trainer
        micro = -(-cfg.prompts_per_iteration * cfg.sampling.n // t.batch_size)
        return cfg.iterations * cfg.epochs * -(-micro // t.grad_accum)

    def run_iteration(self, learner: Any) -> None:
        cfg = self.config
        rows = self.prompts.take(cfg.prompts_per_iteration)
        result = self.sample_and_score(rows, self.seeded(cfg.sampling, self.iteration))
        rewards = torch.tensor([[s.reward for s in group] for group in result.groups])
        weights = spr_weights(rewards, cfg.beta, cfg.baseline)
        metrics = dict(result.metrics)
        metrics.update(
            iteration=self.iteration + 1,
            weight_max=float(weights.max()),
            # Kish's effective sample size per prompt, as a share of N: 1 = uniform weights.
            effective_samples=float((weights.sum(1) ** 2 / (weights**2).sum(1)).mean() / weights.size(1)),
        )
        samples = result.samples
        started = time.perf_counter()
        self._train_on(learner, samples, weights.flatten().tolist())
        metrics["train_s"] = time.perf_counter() - started
        self.iteration += 1
        learner.log(metrics, split="rollout")

    def sample_and_score(
        self, rows: list[align.PromptRow], sampling: align.SamplingConfig
    ) -> align.RolloutResult:
        """Generate, then score. Under ``offload`` the engine is freed before the reward is built,
        and the reward is freed before training: one model beside the policy at a time."""
        self.sync_engine()
        rollouts = self.rollouts()
        result = rollouts.generate(rows, sampling)
        if not self.config.offload:
            return result
        self.close()
        reward = super().make_reward()
        rollouts.reward = reward
        try:
            rollouts.score(result)
        finally:
            rollouts.reward = None
            align.close_reward(reward)  # a reward server it started stops with the phase
            del reward
            gc.collect()
        return result

    def _train_on(self, learner: Any, samples: list[align.Sample], weights: list[float]) -> None:
        t = self.config.trainer
        generator = torch.Generator().manual_seed(self.config.seed + 7919 * self.iteration)
        for _ in range(self.config.epochs):
            order = torch.randperm(len(samples), generator=generator).tolist()
            micro = [order[start : start + t.batch_size] for start in range(0, len(order), t.batch_size)]
            for start in range(0, len(micro), t.grad_accum):
                batches = [
                    self.collate([samples[i] for i in m], [weights[i] for i in m])
                    for m in micro[start : start + t.grad_accum]
                ]
                learner.train_step(batches, self.loss)
        self.policy_changed()

    # ---- batches and the loss ----------------------------------------------------------
    def collate(self, samples: list[align.Sample], weights: list[float]) -> WeightedTokens:
        return WeightedTokens(
            tokens=self.lay_out(samples),
            example_ids=torch.tensor([s.prompt.example_id for s in samples]),
            weights=torch.tensor(weights, dtype=torch.float32),
        )

    def loss(self, batch: WeightedTokens) -> align.LossOutput:
        """Weighted token-summed NLL over the batch's tokens: -sum_i w_i log pi(y_i|x_i) / tokens.
        With every weight 1 it is SFT's token-mean loss."""
        logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        weights = batch.weights.to(logps.sum.device, logps.sum.dtype)
        tokens = logps.count.sum().clamp(min=1)
        loss = -(weights * logps.sum).sum() / tokens
        nll = -logps.sum.detach().sum() / tokens
        return align.LossOutput(loss, {"nll": nll})

    @torch.no_grad()
    def evaluate(self, batches: Any) -> dict[str, float]:
        """Held-out reward of ``eval_sampling`` answers (greedy by default), generated and then
        scored with the same freeing as training."""
        rewards: list[float] = []
        lengths: list[int] = []
        for batch in batches:
            result = self.sample_and_score(batch.rows, self.seeded(self.config.eval_sampling, 0))
            rewards += [s.reward for s in result.samples]
            lengths += [len(s.completion_ids) for s in result.samples]
        if not rewards:
            return {}
        return {"reward": sum(rewards) / len(rewards), "completion_tokens": sum(lengths) / len(lengths)}


@dataclass
class WeightedTokens(align.SFTTokens):
    """SFT tokens with one weight per sequence."""

    weights: Tensor


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(SPRConfig, batch=align.PromptBatch, data_format="prompts")(SPR)
