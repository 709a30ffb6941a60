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
from typing import Any, Literal

import torch
from pydantic import Field

import align


class RejectionSamplingConfig(align.RunConfig):
    """``align run --algo rs``: best-of-k sampling, then SFT on the winners."""

    algo: Literal["rs"] = "rs"
    rollout: align.RolloutEngineConfig = Field(
        default_factory=lambda: align.RolloutEngineConfig(name="hf"),
        description="The generation engine (hf, vllm, trtllm...).",
    )
    reward: align.RewardConfig
    sampling: align.SamplingConfig = align.SamplingConfig(n=8, temperature=1.0, max_tokens=32)
    eval_sampling: align.SamplingConfig = Field(
        align.SamplingConfig(n=1, temperature=0.0, max_tokens=32),
        description="How held-out prompts are answered for the eval reward (greedy by default).",
    )
    iterations: int = Field(10, gt=0, description="Sample -> score -> keep -> train -> refit rounds.")
    prompts_per_iteration: int = Field(32, gt=0)
    keep_per_prompt: int = Field(1, gt=0, description="Best completions of each prompt kept for SFT.")
    min_reward: float | None = Field(None, description="Keep only completions scoring at least this.")
    sft_epochs: int = Field(1, gt=0, description="Passes over each iteration's kept completions.")


class RejectionSampling(align.Algorithm):
    config: RejectionSamplingConfig

    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        cfg = self.config
        self.reward = align.build_reward(cfg.reward, ctx.registry)
        self.iteration = 0
        data_cfg: align.PromptData = cfg.data  # type: ignore[assignment]
        self.prompts = align.PromptStream(ctx.train_data, cfg.seed, data_cfg.columns.prompt)
        self.rollouts: align.Rollouts | None = None
        self.engine_is_stale = False  # the policy changed since the engine's last refit
        self.pad_id = ctx.backend.tokenizer.pad_token_id

    # ---- the driver --------------------------------------------------------------------
    def planned_steps(self) -> int:
        """Optimizer steps if every prompt keeps ``keep_per_prompt`` completions (an upper
        bound: the learning-rate schedule is laid out over it)."""
        cfg, t = self.config, self.config.trainer
        kept = cfg.prompts_per_iteration * cfg.keep_per_prompt
        micro = -(-kept // t.batch_size)
        return cfg.iterations * cfg.sft_epochs * -(-micro // t.grad_accum)

    def drive(self, learner: Any) -> None:
        try:
            while self.iteration < self.config.iterations and not learner.should_stop:
                self.run_iteration(learner)
                last = self.iteration == self.config.iterations
                every = self.config.trainer.save_every
                if last or (every and self.iteration % every == 0):
                    learner.save_checkpoint()
        finally:
            self.close()

    def run_iteration(self, learner: Any) -> None:
        cfg = self.config
        rollouts = self._rollouts()
        self._sync_engine()
        rows = self.prompts.take(cfg.prompts_per_iteration)
        result = rollouts.generate(rows, self._seeded(cfg.sampling, self.iteration))
        kept = self.select(result.groups)
        metrics = dict(result.metrics)
        metrics.update(iteration=self.iteration + 1, kept=len(kept))
        if kept:
            metrics["kept_reward_mean"] = sum(s.reward for s in kept) / len(kept)
            metrics["logprob_mismatch"] = self.logprob_mismatch(kept)
            started = time.perf_counter()
            self._train_on(learner, kept)
            metrics["train_s"] = time.perf_counter() - started
        metrics["refit_s"] = self._sync_engine()
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
                learner.train_step([self.collate(m) for m in micro[start : start + t.grad_accum]], self.loss)
        self.engine_is_stale = True

    # ---- batches and the loss ----------------------------------------------------------
    def collate(self, samples: list[align.Sample]) -> align.SFTTokens:
        sequences = [(s.prompt.prompt_ids, s.completion_ids) for s in samples]
        return align.SFTTokens(
            tokens=align.lay_out(sequences, self.pad_id, self.config.data.padding_free),
            example_ids=torch.tensor([s.prompt.example_id for s in samples]),
        )

    def loss(self, batch: align.SFTTokens) -> align.LossOutput:
        """Token-mean negative log-likelihood of the kept completions (SFT's loss)."""
        logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        nll = -logps.sum.sum() / logps.count.sum().clamp(min=1)
        return align.LossOutput(nll, {"perplexity": nll.detach().exp()})

    @torch.no_grad()
    def logprob_mismatch(self, samples: list[align.Sample]) -> float:
        """exp(mean over tokens of |engine log p - trainer log p|) for the sampled tokens, taken
        per sequence (sums), before the update: 1.0 when engine and trainer agree exactly."""
        batch = self.collate(samples)
        trainer = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        engine = torch.tensor([sum(s.logprobs) for s in samples], dtype=trainer.sum.dtype)
        tokens = trainer.count.sum().clamp(min=1)
        return float(torch.exp((engine - trainer.sum).abs().sum() / tokens))

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Any) -> dict[str, float]:
        """Held-out reward: each eval prompt answered with ``eval_sampling`` (greedy by default)."""
        rollouts = self._rollouts()
        self._sync_engine()
        rewards: list[float] = []
        lengths: list[int] = []
        for batch in batches:
            result = rollouts.generate(batch.rows, self._seeded(self.config.eval_sampling, 0))
            rewards += [s.reward for s in result.samples]
            lengths += [len(s.completion_ids) for s in result.samples]
        if not rewards:
            return {}
        return {
            "reward": sum(rewards) / len(rewards),
            "completion_tokens": sum(lengths) / len(lengths),
        }

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "prompt_position": self.prompts.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.prompts.position = int(state["prompt_position"])

    # ---- helpers -----------------------------------------------------------------------
    def _rollouts(self) -> align.Rollouts:
        if self.rollouts is None:
            self.rollouts = align.start_rollouts(
                self.ctx, self.config.rollout, reward=self.reward, max_model_len=self.config.data.max_length
            )
            self.engine_is_stale = False
        return self.rollouts

    def _sync_engine(self) -> float:
        """Refit the engine if the policy changed since; returns the seconds it took."""
        if self.rollouts is None or not self.engine_is_stale:
            return 0.0
        seconds = self.rollouts.refit(align.policy_weights(self.ctx))
        self.engine_is_stale = False
        return seconds

    def _seeded(self, sampling: align.SamplingConfig, iteration: int) -> align.SamplingConfig:
        if sampling.seed is not None:
            return sampling.model_copy(update={"seed": sampling.seed + iteration})
        return sampling.model_copy(update={"seed": self.config.seed * 100_003 + iteration})

    def close(self) -> None:
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(RejectionSamplingConfig, batch=align.PromptBatch, data_format="prompts")(RejectionSampling)
