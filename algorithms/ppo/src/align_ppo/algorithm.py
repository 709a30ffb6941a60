"""The PPO driver (Schulman et al. 2017; for language models Ziegler et al. 2019 and Ouyang et
al. 2022; NeMo-Aligner's actor/critic split as the reference design).

Per iteration: take ``prompts_per_iteration`` prompts, sample ``sampling.n`` completions of each
with the rollout engine, asking the reward for each generation work item's scores as soon as it
is generated (a future: a remote reward scores meanwhile); send the critic its value requests
(futures) for every micro-batch, then take the policy's ("old") and the reference's per-token
log-probs while the critic and the reward work, and only then wait for their answers; build
per-token rewards (the score at the last token, minus ``beta x KL`` to the reference at every
token), GAE advantages and returns, whiten the advantages; then ``epochs`` passes of seeded
minibatches: each minibatch sends the critic one training step (not awaited) and takes one
policy step on the clipped policy loss (minus the entropy bonus). The first
``critic_warmup_iterations`` train only the critic. The adaptive KL controller then moves beta,
and the engine is refit. With ``old_logps_source: engine`` the policy's ("old") pass is not run:
the engine's own per-token log-probs are the old ones (exact for an engine that samples with the
policy's weights in the training precision: hf in fp32).

Resume: checkpoints fall at iteration boundaries with the iteration, the prompt position and
beta; the local critic is the learner's trainable ``critic``, a remote one writes its own state
into ``<checkpoint>/critic``. Seeds and minibatch orders are functions of (seed, iteration).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import align
from align import objectives
from align_ppo.config import PPOConfig
from align_ppo.objectives import AdaptiveKLController, gae, token_rewards, whiten

CRITIC_FOLDER = "critic"


@dataclass
class Experience:
    """One sample with what its training needs, each per-token tensor over its completion."""

    sample: align.Sample
    old_logps: Tensor
    engine_logps: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor


@dataclass
class PolicyBatch:
    """One micro-batch of the policy loss; per-token tensors are ``[b, T]`` like ``mask``."""

    tokens: align.TokenBatch
    mask: Tensor
    advantages: Tensor
    old_logps: Tensor
    engine_logps: Tensor
    normalizer: float  # the step's denominator (objectives.aggregate), shared by its micro-batches

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


class PPO(align.OnlineAlgorithm):
    config: PPOConfig

    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        cfg = self.config
        adaptive = cfg.kl.adaptive
        self.kl_controller = (
            AdaptiveKLController(cfg.kl.coef, adaptive.target, adaptive.horizon) if adaptive else None
        )
        self.kl_coef = cfg.kl.coef
        # The initial policy, for the KL penalty; not built when there is none.
        self.reference = ctx.backend.build_model("reference") if cfg.kl.coef > 0 else None
        self.critic: align.Critic | None = None
        # A critic that keeps its own state (a server) is driven by rank 0 alone with
        # data-parallel ranks; the local critic is a trainable of every rank's learner.
        self.critic_on_main_only = self.ranks > 1 and cfg.critic.name != "local"
        self.eval_rewards = {
            name: align.build_reward(reward, ctx.registry) for name, reward in cfg.eval_rewards.items()
        }

    def setup(self, learner: Any) -> None:
        """The critic is built here, before a resume restores it (a local one is a trainable).
        With data-parallel ranks a critic of its own state (remote) is built on rank 0 only:
        it alone sends the values requests of every rank's rollouts and one train request per
        minibatch (the global one), and deals the values out (``from_main``)."""
        if self.critic_on_main_only and not learner.is_main:
            return
        self.critic = align.build_critic(self.config.critic, self.ctx, learner)

    # ---- the driver --------------------------------------------------------------------
    def planned_steps(self) -> int:
        cfg, t = self.config, self.config.trainer
        samples = cfg.prompts_per_iteration * cfg.sampling.n
        per_epoch = math.ceil(samples / (t.batch_size * t.grad_accum))
        return max(1, (cfg.iterations - cfg.critic_warmup_iterations) * cfg.epochs * per_epoch)

    def drive(self, learner: Any) -> None:
        try:
            super().drive(learner)
            if learner.unsaved:  # stopped early: the checkpoint needs the critic still open
                learner.save_checkpoint()
        finally:
            self._close_critic()

    def run_iteration(self, learner: Any) -> None:
        cfg = self.config
        metrics: dict[str, float] = {"iteration": self.iteration + 1, "kl_coef": self.kl_coef}
        self.rollouts()
        metrics["refit_s"] = self.sync_engine()
        rows = self.prompts.take(cfg.prompts_per_iteration)
        result = self.generate(rows, self.seeded(cfg.sampling, self.iteration), defer_rewards=True)
        with _timed(metrics, "experience_s"):
            experience = self.make_experience(result, metrics)
        metrics.update(result.metrics)
        warmup = self.iteration < cfg.critic_warmup_iterations
        with _timed(metrics, "train_s"):
            metrics.update(self.train_on(learner, experience, train_policy=not warmup))
        metrics["critic_warmup"] = float(warmup)
        if self.kl_controller is not None and "kl" in metrics:
            self.kl_coef = self.kl_controller.update(metrics["kl"], len(experience))
        metrics["refit_s"] += self.sync_engine()
        self.iteration += 1
        learner.log(metrics, split="rollout")

    # ---- experience: values, log-probs, rewards, advantages --------------------------------
    @torch.no_grad()
    def make_experience(self, result: align.RolloutResult, metrics: dict[str, float]) -> list[Experience]:
        """Each sample's old log-probs, values, GAE advantages and returns. The critic's value
        requests go out first, so a remote critic works while the policy scores; the rewards
        (asked for at generation) are awaited after the log-probs too."""
        cfg = self.config
        samples = result.samples
        size = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
        chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
        with _timed(metrics, "critic_values_send_s"):  # a local critic computes them here
            if self.critic_on_main_only:  # rank 0 asks for every rank's values
                pending = [self.critic.values(self.lay_out(chunk)) for chunk in chunks] if self.critic else []
            elif self.ranks > 1:  # data-parallel ranks: each computes its share, all get all
                pending = [_done(values) for values in self.deal_out(chunks, self._values_now)]
            else:
                pending = [self._critic().values(self.lay_out(chunk)) for chunk in chunks]
        with align.precision_scope(cfg.trainer.precision, self.ctx.policy):
            with _timed(metrics, "policy_logps_s"):
                if cfg.old_logps_source == "scored":
                    old, entropy = self.completion_logps(self.ctx.policy, chunks, with_entropy=True)
                else:  # the engine sampled with the policy's weights: its log-probs are pi_old
                    old, entropy = [self._engine_logps(sample) for sample in samples], []
            with _timed(metrics, "reference_logps_s"):
                ref = self.completion_logps(self.reference, chunks)[0] if self.reference is not None else None
        result.wait_for_rewards()  # its metrics: score_s, reward_blocked_s, reward_hidden_s
        with _timed(metrics, "critic_wait_s"):
            if self.critic_on_main_only:
                values = self.from_main(lambda: self._gather_values(pending, chunks))
            else:
                values = self._gather_values(pending, chunks)
        mask = _left_mask([len(s.completion_ids) for s in samples])
        old_logps, ref_logps, value_t = (
            _padded(old, mask),
            _padded(ref, mask) if ref else None,
            _padded(values, mask),
        )
        scores = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        kl = (
            objectives.kl_penalty(old_logps, ref_logps, cfg.kl.estimator)
            if ref_logps is not None
            else torch.zeros_like(old_logps)
        )
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        rewards = token_rewards(scores, kl, mask, self.kl_coef)
        advantages, returns = gae(rewards, value_t, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        experience = [
            Experience(
                sample,
                old[i],
                old[i] if cfg.old_logps_source == "engine" else self._engine_logps(sample),
                values[i],
                advantages[i, : len(sample.completion_ids)],
                returns[i, : len(sample.completion_ids)],
            )
            for i, sample in enumerate(samples)
        ]
        metrics.update(
            score_mean=float(scores.mean()),
            kl=float(kl.sum(dim=1).mean()),  # nats per completion: what the KL controller reads
            value_mean=float(value_t[mask].mean()) if mask.any() else 0.0,
            return_mean=float(returns[mask].mean()) if mask.any() else 0.0,
            advantage_abs_mean=float(advantages[mask].abs().mean()) if mask.any() else 0.0,
        )
        if entropy:
            metrics["entropy"] = float(torch.cat(entropy).mean())
        return experience

    def _values_now(self, chunk: list[align.Sample]) -> Tensor:
        return self._critic().values(self.lay_out(chunk)).result()

    def _gather_values(self, pending: list[Future[Tensor]], chunks: list[list[align.Sample]]) -> list[Tensor]:
        """The critic's answers, checked: one row per sample, at least its length wide."""
        values: list[Tensor] = []
        for future, chunk in zip(pending, chunks, strict=True):
            answer = future.result()
            longest = max(len(s.completion_ids) for s in chunk)
            if not isinstance(answer, Tensor) or answer.dim() != 2 or answer.shape[0] != len(chunk):
                shape = getattr(answer, "shape", type(answer).__name__)
                raise align.CriticError(
                    f"critic '{self.config.critic.name}' answered values of shape {shape} for "
                    f"{len(chunk)} sequences of up to {longest} tokens; expected [{len(chunk)}, {longest}]"
                )
            if answer.shape[1] < longest or not torch.isfinite(answer).all():
                raise align.CriticError(
                    f"critic '{self.config.critic.name}' answered values of shape {tuple(answer.shape)} "
                    f"(finite: {bool(torch.isfinite(answer).all())}) for sequences of up to {longest} tokens"
                )
            values += [answer[row, : len(s.completion_ids)].float() for row, s in enumerate(chunk)]
        return values

    def _engine_logps(self, sample: align.Sample) -> Tensor:
        if len(sample.logprobs) != len(sample.completion_ids):
            raise align.ConfigError(
                f"rollout engine '{self.config.rollout.name}' returned {len(sample.logprobs)} log-probs for "
                f"{len(sample.completion_ids)} tokens; the policy loss needs one per token"
            )
        return torch.tensor(sample.logprobs, dtype=torch.float32)

    # ---- training ----------------------------------------------------------------------
    def train_on(
        self, learner: Any, experience: list[Experience], train_policy: bool = True
    ) -> dict[str, float]:
        """``epochs`` passes over the buffer in a seeded order; per minibatch of
        ``batch_size x grad_accum`` samples one critic step (sent, not awaited) and, unless
        warming the critic up, one policy step. Returns the steps' mean metrics."""
        cfg, t = self.config, self.config.trainer
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * self.iteration)
        per_step = t.batch_size * t.grad_accum
        critic_steps: list[Future[dict[str, float]]] = []
        timings = {"critic_train_send_s": 0.0, "actor_train_s": 0.0}
        policy_totals: dict[str, float] = {}
        policy_steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(len(experience), generator=generator).tolist()
            for start in range(0, len(order), per_step):
                if train_policy and learner.should_stop:  # trainer.max_steps (or a stop request)
                    break  # reached inside the iteration: its remaining minibatches are not trained
                chosen = [experience[i] for i in order[start : start + per_step]]
                with _timed(timings, "critic_train_send_s", add=True):  # a local critic trains here
                    if self.critic is not None or not self.critic_on_main_only:  # rank 0: the global step
                        critic_steps.append(self._critic().train(self.critic_batch(chosen)))
                if not train_policy:
                    continue
                mine, parts = self.step_share(chosen)  # all of it, but for data-parallel ranks
                micro = [mine[j : j + t.batch_size] for j in range(0, len(mine), t.batch_size)]
                normalizer = self.step_normalizer(chosen) / len(micro) / parts
                with _timed(timings, "actor_train_s", add=True):
                    step = learner.train_step([self.collate(m, normalizer) for m in micro], self.loss)
                for key, value in step.items():
                    policy_totals[key] = policy_totals.get(key, 0.0) + float(value)
                policy_steps += 1
        if train_policy:
            self.policy_changed()
        metrics: dict[str, float] = {}
        keep = ("loss", "clip_fraction", "approx_kl", "grad_norm", "entropy")
        metrics.update({f"train_{k}": policy_totals[k] / policy_steps for k in keep if k in policy_totals})
        # The critic's last step finishes while the actor refits; its metrics are read here.
        critic_totals: dict[str, float] = {}
        with _timed(timings, "critic_train_wait_s"):
            results = [future.result() for future in critic_steps]
        for result in results:
            for key, value in result.items():
                critic_totals[key] = critic_totals.get(key, 0.0) + float(value)
        metrics.update(timings)
        metrics.update({f"critic_{k}": v / len(critic_steps) for k, v in critic_totals.items()})
        return metrics

    def critic_batch(self, items: list[Experience]) -> align.CriticBatch:
        mask = _left_mask([len(item.sample.completion_ids) for item in items])
        return align.CriticBatch(
            tokens=self.lay_out([item.sample for item in items]),
            returns=_padded([item.returns for item in items], mask),
            old_values=_padded([item.values for item in items], mask),
            mask=mask,
        )

    def step_normalizer(self, items: list[Experience]) -> float:
        """The aggregation's denominator over one optimizer step's samples, so that gradient
        accumulation equals one big batch."""
        width = self.config.sampling.max_tokens
        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for row, item in enumerate(items):
            mask[row, : len(item.sample.completion_ids)] = True
        return objectives.global_normalizer(mask, self.config.aggregation, width)

    def collate(self, items: list[Experience], normalizer: float) -> PolicyBatch:
        mask = _left_mask([len(item.sample.completion_ids) for item in items])
        return PolicyBatch(
            tokens=self.lay_out([item.sample for item in items]),
            mask=mask,
            advantages=_padded([item.advantages for item in items], mask),
            old_logps=_padded([item.old_logps for item in items], mask),
            engine_logps=_padded([item.engine_logps for item in items], mask),
            normalizer=normalizer,
        )

    def loss(self, batch: PolicyBatch) -> align.LossOutput:
        """The clipped policy loss on per-token GAE advantages (minus the entropy bonus),
        aggregated over the step's denominator; formulas in docs/algorithms/ppo.md."""
        cfg = self.config
        current = self.ctx.backend.token_logps(
            self.ctx.policy, batch.tokens, with_entropy=cfg.entropy_coef > 0
        )
        is_weights = None
        if cfg.importance_correction is not None:
            is_weights, _ = objectives.truncated_is_weights(
                batch.old_logps, batch.engine_logps, batch.mask, cfg.importance_correction.cap
            )
        loss, stats = objectives.policy_loss(
            current.values,
            batch.old_logps,
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
        if cfg.entropy_coef > 0:
            assert current.entropy is not None
            bonus = objectives.aggregate(current.entropy, batch.mask, cfg.aggregation, batch.normalizer)
            loss = loss - cfg.entropy_coef * bonus
            mask = batch.mask
            metrics["entropy"] = torch.where(mask, current.entropy.detach(), 0.0).sum() / mask.sum().clamp(
                min=1
            )
        # The metrics are means over the completion tokens: data-parallel ranks weigh them by it.
        return align.LossOutput(loss, metrics, weight=batch.mask.sum())

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Any) -> dict[str, float]:
        """Held-out reward (``OnlineAlgorithm.evaluate``), plus each of ``eval_rewards`` on the
        same greedy answers: the accuracy of a checkable task while training on a reward model."""
        self.rollouts()
        self.sync_engine()
        samples: list[align.Sample] = []
        for batch in batches:
            samples += self.generate(batch.rows, self.seeded(self.config.eval_sampling, 0)).samples
        if not samples:
            return {}
        metrics = {
            "reward": sum(s.reward for s in samples) / len(samples),
            "completion_tokens": sum(len(s.completion_ids) for s in samples) / len(samples),
        }
        prompts, texts, rows = (
            [s.prompt.prompt for s in samples],
            [s.text for s in samples],
            [s.prompt.row for s in samples],
        )
        for name, reward in self.eval_rewards.items():
            metrics[name] = float(torch.as_tensor(reward(prompts, texts, rows)).float().mean())
        return metrics

    # ---- the critic and state ----------------------------------------------------------
    def _critic(self) -> align.Critic:
        if self.critic is None:
            raise RuntimeError("PPO.setup(learner) builds the critic before the run drives it")
        return self.critic

    def _close_critic(self) -> None:
        if self.critic is not None:
            self.critic.close()

    def release(self) -> None:
        super().release()
        self._close_critic()  # a run that failed before ``drive`` (its server was started)
        for reward in self.eval_rewards.values():
            align.close_reward(reward)

    def save_files(self, folder: Path) -> None:
        if self.critic is not None:
            self.critic.save(folder / CRITIC_FOLDER)

    def load_files(self, folder: Path) -> None:
        if self.critic is not None or not self.critic_on_main_only:  # every rank but 0's has none
            self._critic().load(folder / CRITIC_FOLDER)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kl_coef = float(state.get("kl_coef", self.config.kl.coef))
        if self.kl_controller is not None:
            self.kl_controller.coef = self.kl_coef


def _done(value: Tensor) -> Future[Tensor]:
    future: Future[Tensor] = Future()
    future.set_result(value)
    return future


def _left_mask(lengths: list[int]) -> Tensor:
    width = max(lengths, default=0)
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def _padded(rows: list[Tensor], mask: Tensor) -> Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for row, tensor in enumerate(rows):
        out[row, : tensor.numel()] = tensor.float()
    return out


@contextmanager
def _timed(metrics: dict[str, float], key: str, add: bool = False) -> Iterator[None]:
    """Seconds spent inside, into ``metrics[key]`` (added to what is there with ``add``)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        metrics[key] = metrics.get(key, 0.0) + elapsed if add else elapsed
