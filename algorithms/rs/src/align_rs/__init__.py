"""align-rs: rejection sampling (best-of-k fine-tuning, "expert iteration").

Per iteration: sample ``k`` completions of each of ``prompts_per_iteration`` prompts with the
rollout engine, score them with the reward, keep the best ``keep_per_prompt`` of each prompt
(only those at or above ``min_reward``, when set), train SFT on the kept ones, and refit the
engine with the new weights. The kept completions maximise the reward among the samples, so
fine-tuning on them moves the policy towards higher reward (Dong et al. 2023, RAFT;
Touvron et al. 2023, Llama 2's rejection sampling fine-tuning).

Resume: a checkpoint is written at the end of an iteration (every ``trainer.save_every``
iterations, and the last), with the iteration and the prompt position inside; sampling seeds
are a function of (seed, iteration), so a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

import align


class RejectionSamplingConfig(align.OnlineConfig):
    """``align run --algo rs``: best-of-k sampling, then SFT on the winners."""

    algo: Literal["rs"] = "rs"
    keep_per_prompt: int = Field(1, gt=0, description="Best completions of each prompt kept for SFT.")
    min_reward: float | None = Field(None, description="Keep only completions scoring at least this.")
    sft_epochs: int = Field(1, gt=0, description="Passes over each iteration's kept completions.")


@dataclass
class WeightedSFT:
    """A micro-batch (or a data-parallel rank's part of one) and the weight of its loss."""

    sft: align.SFTTokens
    weight: float

    @property
    def tokens(self) -> align.TokenBatch:
        return self.sft.tokens

    @property
    def num_tokens(self) -> int:
        return self.sft.num_tokens


class RejectionSampling(align.OnlineAlgorithm):
    config: RejectionSamplingConfig

    # ---- the driver --------------------------------------------------------------------
    def planned_steps(self) -> int:
        """Optimizer steps if every prompt keeps ``keep_per_prompt`` completions (an upper
        bound: the learning-rate schedule is laid out over it)."""
        cfg, t = self.config, self.config.trainer
        kept = cfg.prompts_per_iteration * cfg.keep_per_prompt
        micro = -(-kept // t.batch_size)
        return cfg.iterations * cfg.sft_epochs * -(-micro // t.grad_accum)

    def run_iteration(self, learner: Any) -> None:
        cfg = self.config
        self.sync_engine()
        rows = self.prompts.take(cfg.prompts_per_iteration)
        result = self.generate(rows, self.seeded(cfg.sampling, self.iteration))
        kept = self.select(result.groups)
        metrics = dict(result.metrics)
        metrics.update(iteration=self.iteration + 1, kept=len(kept))
        if kept:
            metrics["kept_reward_mean"] = sum(s.reward for s in kept) / len(kept)
            metrics["logprob_mismatch"] = self.logprob_mismatch(kept)
            started = time.perf_counter()
            self._train_on(learner, kept)
            metrics["train_s"] = time.perf_counter() - started
        metrics["refit_s"] = self.sync_engine()
        self.iteration += 1
        learner.log(metrics, split="rollout")

    def select(self, groups: list[list[align.Sample]]) -> list[align.Sample]:
        """The best ``keep_per_prompt`` samples of each prompt (ties keep sampling order), above
        ``min_reward`` when set."""
        cfg = self.config
        kept = []
        for group in groups:
            ranked = sorted(group, key=lambda s: -s.reward)[: cfg.keep_per_prompt]
            kept += [s for s in ranked if cfg.min_reward is None or s.reward >= cfg.min_reward]
        return kept

    def _train_on(self, learner: Any, kept: list[align.Sample]) -> None:
        t = self.config.trainer
        generator = torch.Generator().manual_seed(self.config.seed + 7919 * self.iteration)
        for _ in range(self.config.sft_epochs):
            order = torch.randperm(len(kept), generator=generator).tolist()
            micro = [
                [kept[i] for i in order[start : start + t.batch_size]]
                for start in range(0, len(order), t.batch_size)
            ]
            for start in range(0, len(micro), t.grad_accum):
                step = [self.share_of(m) for m in micro[start : start + t.grad_accum]]
                learner.train_step(step, self.weighted_loss)
        self.policy_changed()

    # ---- batches and the loss ----------------------------------------------------------
    def collate(self, samples: list[align.Sample]) -> align.SFTTokens:
        return align.SFTTokens(
            tokens=self.lay_out(samples),
            example_ids=torch.tensor([s.prompt.example_id for s in samples]),
        )

    def loss(self, batch: align.SFTTokens) -> align.LossOutput:
        """Token-mean negative log-likelihood of the kept completions (SFT's loss)."""
        logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        nll = -logps.sum.sum() / logps.count.sum().clamp(min=1)
        return align.LossOutput(nll, {"perplexity": nll.detach().exp()})

    def share_of(self, samples: list[align.Sample]) -> WeightedSFT:
        """This rank's part of a micro-batch (all of it with one rank). Its token mean weighted
        by ``parts x its tokens / the micro-batch's tokens`` averages over the data-parallel
        ranks to the whole micro-batch's token mean."""
        mine, parts = self.step_share(samples)
        batch = self.collate(mine)
        if parts == 1:
            return WeightedSFT(batch, 1.0)
        whole = _scored_tokens(self.collate(samples))
        return WeightedSFT(batch, parts * _scored_tokens(batch) / max(1, whole))

    def weighted_loss(self, part: WeightedSFT) -> align.LossOutput:
        out = self.loss(part.sft)
        return out if part.weight == 1.0 else align.LossOutput(out.loss * part.weight, out.metrics)

    @torch.no_grad()
    def logprob_mismatch(self, samples: list[align.Sample]) -> float:
        """exp(mean over tokens of |engine log p - trainer log p|) for the sampled tokens, taken
        per sequence (sums), before the update: 1.0 when engine and trainer agree exactly."""
        batch = self.collate(samples)
        trainer = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        engine = torch.tensor([sum(s.logprobs) for s in samples], dtype=trainer.sum.dtype)
        tokens = trainer.count.sum().clamp(min=1)
        return float(torch.exp((engine - trainer.sum).abs().sum() / tokens))


def _scored_tokens(batch: align.SFTTokens) -> int:
    """The tokens the loss averages over (the completions')."""
    return int(batch.tokens.loss_mask.sum())


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(RejectionSamplingConfig, batch=align.PromptBatch, data_format="prompts")(RejectionSampling)
