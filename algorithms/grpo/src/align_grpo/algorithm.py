"""The driver of the critic-free family (GRPO, Dr.GRPO, RLOO, REINFORCE++).

Per iteration: take ``prompts_per_iteration`` prompts, sample ``sampling.n`` completions of each
with the rollout engine, score them (plus the overlong penalty), drop groups of equal rewards and
sample more (dynamic sampling), take the trainer's log-probs of the samples before any update
(the "old" policy, and the reference's when there is a KL term), turn each group's rewards into
advantages with the configured estimator, train ``epochs`` passes of minibatches on the clipped
policy loss, refit the engine, and log. The math is in ``align.objectives``.

The old policy's pass is skipped when it is redundant (``old_logps_pass: auto``): with one epoch
and the whole rollout batch in one optimizer step, the policy that trains IS the old one, so the
training forward's own log-probs, detached, are the old ones (the ratio is exactly 1, as TRL and
verl do it). The statistics of the old log-probs (entropy, engine mismatch, KL) then come from
that forward.

Resume: checkpoints fall at iteration boundaries (every ``trainer.save_every`` iterations and the
last) with the iteration and the prompt position; sampling seeds and minibatch orders are
functions of (seed, iteration), so a resumed run does what the uninterrupted one did.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import align
from align import objectives
from align_grpo.config import CriticFreeConfig


@dataclass
class ScoredSample:
    """A sample with what its training needs, each per-token tensor over its completion tokens."""

    sample: align.Sample
    engine_logps: Tensor
    ref_logps: Tensor | None
    # The trainer's, before this iteration's updates, and the entropy at each position; None
    # until the training forward gives them when the old policy's pass is skipped.
    old_logps: Tensor | None = None
    entropy: Tensor | None = None
    advantage: float = 0.0
    trained: bool = True  # False: no token is trained on (a truncated completion, when masked)

    @property
    def known_old_logps(self) -> Tensor:
        if self.old_logps is None:
            raise RuntimeError("the old log-probs are read before the training forward gave them")
        return self.old_logps


@dataclass
class RolloutBatch:
    """One micro-batch of the policy loss; per-token tensors are ``[b, T]`` like ``mask``."""

    tokens: align.TokenBatch
    mask: Tensor
    advantages: Tensor
    old_logps: Tensor | None  # None: the training forward's own, detached (the pass was skipped)
    engine_logps: Tensor
    ref_logps: Tensor | None
    normalizer: float  # the loss's denominator (see objectives.aggregate), shared by its step
    items: list[ScoredSample]  # its samples, row by row

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


class CriticFree(align.OnlineAlgorithm):
    config: CriticFreeConfig

    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        cfg = self.config
        self.estimator = ctx.registry.get("advantage_estimator", cfg.advantage.name)
        # The reference exists only for a KL term: without one GRPO needs a single model.
        self.reference = ctx.backend.build_model("reference") if cfg.kl.coef > 0 else None

    # ---- the driver --------------------------------------------------------------------
    def planned_steps(self) -> int:
        """Optimizer steps when no group is dropped (an upper bound: the LR schedule's length)."""
        cfg, t = self.config, self.config.trainer
        samples = cfg.prompts_per_iteration * cfg.sampling.n
        return cfg.iterations * cfg.epochs * math.ceil(samples / (t.batch_size * t.grad_accum))

    def run_iteration(self, learner: Any) -> None:
        metrics: dict[str, float] = {"iteration": self.iteration + 1}
        self.rollouts()
        metrics["refit_s"] = self.sync_engine()
        groups = self.sample_groups(metrics)
        if groups:
            reuse = self.reuses_training_logps(sum(len(group) for group in groups))
            with _timed(metrics, "logps_s"):
                scored = self.score_groups(groups, metrics, old_pass=not reuse)
            with _timed(metrics, "train_s"):
                metrics.update(self.train_on(learner, scored))
            if reuse:  # the old log-probs' statistics, from the training forward's values (over
                # this rank's share of the step with data-parallel ranks; the learner averages them)
                metrics.update(self._rollout_statistics([s for s in scored if s.old_logps is not None]))
            metrics["old_logps_reused"] = float(reuse)
        metrics["refit_s"] += self.sync_engine()
        self.iteration += 1
        learner.log(metrics, split="rollout")

    # ---- rollouts ----------------------------------------------------------------------
    def sample_groups(self, metrics: dict[str, float]) -> list[list[align.Sample]]:
        """``prompts_per_iteration`` groups of ``sampling.n`` scored samples. With dynamic
        sampling, groups whose rewards are all equal (no learning signal: every advantage is 0)
        are dropped and more prompts sampled, up to ``max_extra_rounds`` more times; the
        iteration trains on what it has then."""
        cfg = self.config
        dynamic = cfg.dynamic_sampling
        wanted = cfg.prompts_per_iteration
        kept: list[list[align.Sample]] = []
        generated: list[align.Sample] = []
        totals = {"generate_s": 0.0, "score_s": 0.0}
        rounds = 1 + (dynamic.max_extra_rounds if dynamic.enabled else 0)
        for round_index in range(rounds):
            rows = self.prompts.take(wanted - len(kept))
            result = self.generate(rows, self.seeded(cfg.sampling, self.iteration, round_index))
            for key, value in result.metrics.items():  # with data-parallel ranks: who generated what
                if key in totals or key.startswith("generated_prompts_rank"):
                    totals[key] = totals.get(key, 0.0) + value
            generated += result.samples
            informative = [g for g in result.groups if not dynamic.enabled or len({s.reward for s in g}) > 1]
            kept += informative
            metrics["sampling_rounds"] = round_index + 1
            if len(kept) >= wanted:
                break
        tokens = sum(len(s.completion_ids) for s in generated)
        metrics.update(
            totals,
            reward_mean=sum(s.reward for s in generated) / len(generated),
            generation_tokens_per_s=tokens / max(totals["generate_s"], 1e-9),
            completion_tokens_mean=tokens / len(generated),
            truncated_fraction=sum(s.finish_reason == "length" for s in generated) / len(generated),
            groups=len(kept),
        )
        if dynamic.enabled:
            metrics["dropped_groups"] = len(generated) // cfg.sampling.n - len(kept)
        return kept

    # ---- log-probs, rewards, advantages --------------------------------------------------
    def reuses_training_logps(self, samples: int) -> bool:
        """Whether the old policy's pass is redundant for a rollout batch of ``samples``: one
        epoch in one optimizer step means the policy is still the old one when its training
        forward runs (the pass's values would equal that forward's). With the KL in the reward
        the rewards need the old log-probs before training, so the pass stays."""
        cfg, t = self.config, self.config.trainer
        one_update = cfg.epochs == 1 and samples <= t.batch_size * t.grad_accum
        kl_in_reward = cfg.kl.coef > 0 and cfg.kl.in_ == "reward"
        return cfg.old_logps_pass == "auto" and one_update and not kl_in_reward

    @torch.no_grad()
    def score_groups(
        self, groups: list[list[align.Sample]], metrics: dict[str, float], old_pass: bool = True
    ) -> list[ScoredSample]:
        """The samples with the reference's log-probs, the trainer's (``old_pass``; else the
        training forward gives them) and their advantages."""
        cfg = self.config
        samples = [s for group in groups for s in group]
        old: list[Tensor | None] = [None] * len(samples)
        entropy: list[Tensor | None] = [None] * len(samples)
        ref: list[Tensor | None] = [None] * len(samples)
        # In the training step's precision: the ratio of new to old log-probs is 1 before an update.
        with align.precision_scope(cfg.trainer.precision, self.ctx.policy):
            if old_pass:
                old_values, entropies = self.token_logps(self.ctx.policy, samples, with_entropy=True)
                old, entropy = list(old_values), list(entropies) or entropy
            if self.reference is not None:
                ref = list(self.token_logps(self.reference, samples)[0])
        scored = []
        for i, sample in enumerate(samples):
            if len(sample.logprobs) != len(sample.completion_ids):
                raise align.ConfigError(
                    f"rollout engine '{cfg.rollout.name}' returned {len(sample.logprobs)} log-probs for "
                    f"{len(sample.completion_ids)} tokens; the policy loss needs one per token"
                )
            truncated = sample.finish_reason == "length" and cfg.overlong.mask_truncated
            engine = torch.tensor(sample.logprobs, dtype=torch.float32)
            scored.append(
                ScoredSample(
                    sample, engine, ref[i], old_logps=old[i], entropy=entropy[i], trained=not truncated
                )
            )
        rewards = self.shaped_rewards(scored, len(groups), metrics)
        advantages = self.estimate_advantages(rewards).flatten().tolist()
        for item, advantage in zip(scored, advantages, strict=True):
            item.advantage = advantage
        if old_pass:
            metrics.update(self._rollout_statistics(scored))
        return scored

    def token_logps(
        self, model: Any, samples: list[align.Sample], with_entropy: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Each sample's per-token log-probs (and entropies) under ``model``, in micro-batches."""
        size = self.config.trainer.eval_batch_size or self.config.trainer.batch_size
        chunks = [samples[start : start + size] for start in range(0, len(samples), size)]
        return self.completion_logps(model, chunks, with_entropy)

    def shaped_rewards(
        self, scored: list[ScoredSample], num_groups: int, metrics: dict[str, float]
    ) -> Tensor:
        """``[G, n]`` rewards: the reward's, plus the soft overlong penalty, minus the KL to the
        reference when the KL goes into the reward."""
        cfg = self.config
        rewards = torch.tensor([item.sample.reward for item in scored], dtype=torch.float32)
        soft = cfg.overlong.soft_penalty
        if soft is not None:
            lengths = torch.tensor([len(item.sample.completion_ids) for item in scored])
            penalty = soft.coef * objectives.overlong_soft_penalty(lengths, soft.max_len, soft.cache_len)
            rewards = rewards + penalty.to(rewards.dtype)
            metrics["overlong_penalty_mean"] = float(penalty.mean())
        if cfg.kl.coef > 0 and cfg.kl.in_ == "reward":
            kl = torch.stack([self._sequence_kl(item) for item in scored])
            rewards = rewards - cfg.kl.coef * kl
        return rewards.view(num_groups, cfg.sampling.n)

    def estimate_advantages(self, rewards: Tensor) -> Tensor:
        """The configured estimator's advantages, checked: a plugin's wrong shape or NaN is named."""
        name = self.config.advantage.name
        advantages = self.estimator.factory(self.config.advantage, rewards)
        if not isinstance(advantages, Tensor) or advantages.shape != rewards.shape:
            shape = getattr(advantages, "shape", type(advantages).__name__)
            raise align.ConfigError(
                f"advantage estimator '{name}' ({self.estimator.package}) returned {shape} for rewards "
                f"of shape {tuple(rewards.shape)}; it must return advantages of the same shape"
            )
        if not torch.isfinite(advantages).all():
            raise align.ConfigError(
                f"advantage estimator '{name}' ({self.estimator.package}) returned NaN or inf"
            )
        return advantages.detach().float()

    def _sequence_kl(self, item: ScoredSample) -> Tensor:
        assert item.ref_logps is not None
        return objectives.kl_penalty(item.known_old_logps, item.ref_logps, self.config.kl.estimator).sum()

    def _rollout_statistics(self, scored: list[ScoredSample]) -> dict[str, float]:
        """What the rollout batch says before training: entropy, KL to the reference, and how far
        the engine's log-probs are from the trainer's (1.0: the same)."""
        old = torch.cat([item.known_old_logps for item in scored])
        engine = torch.cat([item.engine_logps for item in scored])
        mask = torch.ones_like(old, dtype=torch.bool)[None]
        _, mismatch = objectives.truncated_is_weights(
            old[None],
            engine[None],
            mask,
            self.config.importance_correction.cap if self.config.importance_correction else 2.0,
        )
        stats = {
            "logprob_mismatch": float(mismatch["is_mismatch"]),
            "is_capped_fraction": float(mismatch["is_capped_fraction"]),
            "advantage_abs_mean": sum(abs(item.advantage) for item in scored) / len(scored),
            "trained_fraction": sum(item.trained for item in scored) / len(scored),
        }
        entropy = [item.entropy for item in scored if item.entropy is not None]
        if entropy and old.numel():
            stats["entropy"] = float(torch.cat(entropy).mean())
        if self.reference is not None and old.numel():
            stats["kl"] = float(sum(self._sequence_kl(item) for item in scored) / old.numel())
        return stats

    # ---- training ----------------------------------------------------------------------
    def train_on(self, learner: Any, scored: list[ScoredSample]) -> dict[str, float]:
        """``epochs`` passes over the rollout batch in a seeded order, one optimizer step per
        ``trainer.batch_size x grad_accum`` samples. Returns the steps' mean metrics."""
        cfg, t = self.config, self.config.trainer
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * self.iteration)
        per_step = t.batch_size * t.grad_accum
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(len(scored), generator=generator).tolist()
            for start in range(0, len(order), per_step):
                if learner.should_stop:  # trainer.max_steps (or a stop request) reached inside the
                    break  # iteration: its remaining minibatches are not trained
                chosen = [scored[i] for i in order[start : start + per_step]]
                mine, parts = self.step_share(chosen)  # all of it, but for data-parallel ranks
                micro = [mine[j : j + t.batch_size] for j in range(0, len(mine), t.batch_size)]
                # The step's loss is its samples' sum over the whole step's denominator; the learner
                # averages the micro-batch losses (and the ranks' gradients), hence the divisions.
                normalizer = self.step_normalizer(chosen) / len(micro) / parts
                step_metrics = learner.train_step([self.collate(m, normalizer) for m in micro], self.loss)
                for key, value in step_metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                steps += 1
        self.policy_changed()
        keep = ("loss", "clip_fraction", "clip_fraction_low", "clip_fraction_high", "approx_kl", "grad_norm")
        return {f"train_{key}": totals[key] / steps for key in keep if key in totals}

    def step_normalizer(self, samples: list[ScoredSample]) -> float:
        """The aggregation's denominator over one optimizer step's samples (tokens, completions,
        or completions x max_tokens), so that gradient accumulation equals one big batch."""
        width = self.config.sampling.max_tokens
        mask = torch.zeros(len(samples), width, dtype=torch.bool)
        for row, item in enumerate(samples):
            mask[row, : len(item.sample.completion_ids)] = item.trained
        return objectives.global_normalizer(mask, self.config.aggregation, width)

    def collate(self, items: list[ScoredSample], normalizer: float) -> RolloutBatch:
        width = max(len(item.sample.completion_ids) for item in items)

        def padded(tensors: list[Tensor]) -> Tensor:
            out = torch.zeros(len(tensors), width, dtype=tensors[0].dtype)
            for row, tensor in enumerate(tensors):
                out[row, : tensor.numel()] = tensor
            return out

        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for row, item in enumerate(items):
            mask[row, : len(item.sample.completion_ids)] = item.trained
        refs = [item.ref_logps for item in items]
        olds = [item.old_logps for item in items]
        return RolloutBatch(
            tokens=self.lay_out([item.sample for item in items]),
            mask=mask,
            advantages=torch.tensor([item.advantage for item in items]),
            old_logps=padded(olds) if all(o is not None for o in olds) else None,  # type: ignore[arg-type]
            engine_logps=padded([item.engine_logps for item in items]),
            ref_logps=padded(refs) if all(r is not None for r in refs) else None,  # type: ignore[arg-type]
            normalizer=normalizer,
            items=items,
        )

    def loss(self, batch: RolloutBatch) -> align.LossOutput:
        """The clipped policy loss (+ KL to the reference, - entropy bonus), aggregated over the
        step's denominator; formulas in ``objectives`` and docs/algorithms/grpo.md."""
        cfg = self.config
        reused = batch.old_logps is None  # the old pass was skipped: this forward is the old policy's
        current = self.ctx.backend.token_logps(
            self.ctx.policy, batch.tokens, with_entropy=cfg.entropy_coef > 0 or reused
        )
        old_logps = current.values.detach() if reused else batch.old_logps
        assert old_logps is not None
        if reused:
            _keep_old_logps(batch, old_logps, current.entropy)
        is_weights = None
        if cfg.importance_correction is not None:
            is_weights, _ = objectives.truncated_is_weights(
                old_logps, batch.engine_logps, batch.mask, cfg.importance_correction.cap
            )
        loss, stats = objectives.policy_loss(
            current.values,
            old_logps,
            batch.advantages,
            batch.mask,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            aggregation=cfg.aggregation,
            is_weights=is_weights,
            normalizer=batch.normalizer,
        )
        metrics = {key: value.detach() for key, value in stats.items()}
        metrics["policy_loss"] = loss.detach()
        if cfg.kl.coef > 0 and cfg.kl.in_ == "loss":
            assert batch.ref_logps is not None
            kl = objectives.kl_penalty(current.values, batch.ref_logps, cfg.kl.estimator)
            loss = loss + cfg.kl.coef * objectives.aggregate(
                kl, batch.mask, cfg.aggregation, batch.normalizer
            )
            metrics["kl"] = _masked_mean(kl.detach(), batch.mask)
        if cfg.entropy_coef > 0:
            assert current.entropy is not None
            bonus = objectives.aggregate(current.entropy, batch.mask, cfg.aggregation, batch.normalizer)
            loss = loss - cfg.entropy_coef * bonus
            metrics["entropy"] = _masked_mean(current.entropy.detach(), batch.mask)
        # The metrics are means over the trained tokens: data-parallel ranks weigh them by it.
        return align.LossOutput(loss, metrics, weight=batch.mask.sum())


def _keep_old_logps(batch: RolloutBatch, old_logps: Tensor, entropy: Tensor | None) -> None:
    """Each sample's old log-probs (and entropies), from the training forward's detached rows."""
    for row, item in enumerate(batch.items):
        length = len(item.sample.completion_ids)
        item.old_logps = old_logps[row, :length].float()
        if entropy is not None:
            item.entropy = entropy[row, :length].detach().float()


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


@contextmanager
def _timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = time.perf_counter() - started
