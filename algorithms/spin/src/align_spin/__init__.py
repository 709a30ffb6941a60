"""align-spin: SPIN, self-play fine-tuning (Chen et al. 2024, "Self-Play Fine-Tuning Converts
Weak Language Models to Strong Language Models", arXiv:2401.01335).

Iteration t: the current policy pi_t answers each SFT prompt (the rollout engine); each gold
response becomes ``chosen`` and the policy's own answer ``rejected``, and the policy trains on
these pairs with any registered paired preference loss (DPO by default: SPIN's logistic loss is
DPO's with lambda = beta) against pi_t as the reference. The result pi_{t+1} starts the next
iteration. The reference is the policy as the iteration starts, so its log-probs are scored
once per iteration with the policy itself before it trains: no second model in memory.

Outputs: ``<output_dir>/iterations/iteration_<t>/generations.jsonl`` (what pi_{t-1} answered,
the pairs of iteration t) and ``.../model`` (pi_t, loadable with transformers) beside the usual
checkpoints. Resume: a checkpoint is written at the end of an iteration; prompts, sampling and
the training order are functions of (seed, iteration), so a killed run resumed ends with the
uninterrupted run's weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

import align

ITERATIONS_DIR = "iterations"


class SPINConfig(align.OnlineConfig):
    """``align run --algo spin``: SFT data; per iteration, gold vs the policy's own answer."""

    algo: Literal["spin"] = "spin"
    # Widened at load time to every installed loss that reads a PreferenceBatch (default dpo).
    loss: align.LossConfig | list[align.LossConfig]
    reward: align.RewardConfig | None = Field(  # type: ignore[assignment]
        None,
        description="Optional: scores held-out answers (eval reward, win rate against the start model) and "
        "gives each pair reward(gold) - reward(generated) (rpo_* losses). It sees row[<completion column>] "
        "= the gold response.",
    )
    sampling: align.SamplingConfig = Field(
        align.SamplingConfig(n=1, temperature=1.0, max_tokens=64),
        description="How the policy answers the training prompts; n > 1 makes n pairs per prompt.",
    )
    iterations: int = Field(3, gt=0, description="Self-play iterations (a new reference each).")
    prompts_per_iteration: int | None = Field(  # type: ignore[assignment]
        None, gt=0, description="Prompts answered per iteration; default: every training prompt."
    )
    epochs: int = Field(1, gt=0, description="Passes over each iteration's pairs.")
    keep_iteration_models: bool = Field(
        True, description="Save each iteration's model under iterations/iteration_<t>/model."
    )


@dataclass
class Pair:
    """Gold (chosen) and the policy's answer (rejected) to one prompt, with the reference's
    log-prob sums of both (filled before training)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    example_id: int
    sample: align.Sample
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0
    reward_gap: float | None = None  # reward(gold) - reward(generated), with a reward


class SPIN(align.OnlineAlgorithm):
    config: SPINConfig
    run_outputs = (ITERATIONS_DIR,)  # overwrite=true replaces an earlier run's iterations too

    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        self.losses = align.resolve_losses(self.config.loss, ctx.registry)
        for term in self.losses:
            if ctx.registry.get("loss", term.config.name).meta.get("needs_token_logps", False):
                raise align.ConfigError(
                    f"loss: '{term.config.name}' needs per-token reference log-probs, which spin does "
                    "not keep (it scores the reference once per iteration, as sums); choose another loss"
                )
        with_beta = [t.config for t in self.losses if t.needs_reference and hasattr(t.config, "beta")]
        self.beta = float(getattr(with_beta[0], "beta", 0.1)) if with_beta else None
        self.tokenizer = ctx.backend.tokenizer
        columns = getattr(self.config.data, "columns", None)
        self.prompt_column = getattr(columns, "prompt", "prompt")
        self.completion_column = getattr(columns, "completion", "completion")
        self.start_rewards: dict[int, float] | None = None  # the start model's held-out rewards

    def make_reward(self) -> align.RewardSource | None:
        return None if self.config.reward is None else super().make_reward()

    # ---- the driver --------------------------------------------------------------------
    def planned_steps(self) -> int:
        cfg, t = self.config, self.config.trainer
        pairs = (cfg.prompts_per_iteration or len(self.ctx.train_data)) * cfg.sampling.n
        micro = -(-pairs // t.batch_size)
        return cfg.iterations * cfg.epochs * -(-micro // t.grad_accum)

    def run_iteration(self, learner: Any) -> None:
        cfg, number = self.config, self.iteration + 1
        self.sync_engine()
        rows = self.iteration_rows()
        result = self.rollouts().generate(rows, self.seeded(cfg.sampling, self.iteration))
        pairs, skipped = self.make_pairs(result.samples)
        if learner.is_main:
            self.write_generations(number, result.samples)
        metrics = dict(result.metrics)
        metrics.update(iteration=number, pairs=len(pairs), **skipped)
        if pairs:
            started = time.perf_counter()
            if self.reward is not None:
                self.score_gold(pairs)
            self.score_reference(learner, pairs)
            self._train_on(learner, pairs)
            metrics["train_s"] = time.perf_counter() - started
        self.iteration = number
        if cfg.keep_iteration_models:
            self.save_iteration_model(number)
        learner.log(metrics, split="rollout")

    def iteration_rows(self) -> list[align.PromptRow]:
        """This iteration's prompts: a shuffle seeded by (seed, iteration), the first
        ``prompts_per_iteration`` of it (all by default)."""
        data = self.ctx.train_data
        generator = torch.Generator().manual_seed(self.config.seed + 1_000_003 * (self.iteration + 1))
        order = torch.randperm(len(data), generator=generator).tolist()
        return [self.prompt_row(data[i]) for i in order[: self.config.prompts_per_iteration or len(data)]]

    def prompt_row(self, row: dict[str, Any]) -> align.PromptRow:
        """An SFT row as a prompt to answer; the reward sees the prompt's text and the gold
        response under the data's completion column."""
        prompt = self.tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)
        gold = self.tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        original = {
            self.prompt_column: prompt,
            self.completion_column: gold,
            "completion_ids": row["completion_ids"],
        }
        return align.PromptRow(int(row["example_id"]), list(row["prompt_ids"]), prompt, original)

    def make_pairs(self, samples: list[align.Sample]) -> tuple[list[Pair], dict[str, int]]:
        """(gold, generated) pairs. Skipped and counted: an empty generation (nothing but the
        end token) and one equal to the gold response (the pair carries no signal)."""
        eos = self.tokenizer.eos_token_id
        pairs, empty, identical = [], 0, 0
        for s in samples:
            gold = list(s.prompt.row["completion_ids"])
            if not [t for t in s.completion_ids if t != eos]:
                empty += 1
            elif s.completion_ids == gold:
                identical += 1
            else:
                pairs.append(Pair(s.prompt.prompt_ids, gold, list(s.completion_ids), s.prompt.example_id, s))
        return pairs, {"skipped_empty": empty, "skipped_identical": identical}

    def score_gold(self, pairs: list[Pair]) -> None:
        """With a reward, each pair's reward gap (gold minus generated): what the reward-aware
        losses (``rpo_*``) read; the others ignore it."""
        assert self.reward is not None
        rows = [p.sample.prompt for p in pairs]
        gold = self.reward(
            [r.prompt for r in rows], [r.row[self.completion_column] for r in rows], [r.row for r in rows]
        )
        for pair, value in zip(pairs, gold.tolist(), strict=True):
            pair.reward_gap = value - pair.sample.reward

    @torch.no_grad()
    def score_reference(self, learner: Any, pairs: list[Pair]) -> None:
        """The reference's log-prob sums: the policy as this iteration starts, in the precision
        it trains in."""
        size = self.config.trainer.batch_size
        with learner.forward_precision():
            for start in range(0, len(pairs), size):
                chunk = pairs[start : start + size]
                batch = self.collate(chunk)
                logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
                chosen, rejected = logps.split(batch.num_pairs)
                for pair, c, r in zip(chunk, chosen.sum.tolist(), rejected.sum.tolist(), strict=True):
                    pair.ref_chosen, pair.ref_rejected = c, r

    def _train_on(self, learner: Any, pairs: list[Pair]) -> None:
        t = self.config.trainer
        generator = torch.Generator().manual_seed(self.config.seed + 7919 * self.iteration)
        for _ in range(self.config.epochs):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            micro = [order[start : start + t.batch_size] for start in range(0, len(order), t.batch_size)]
            for start in range(0, len(micro), t.grad_accum):
                batches = [self.collate([pairs[i] for i in m]) for m in micro[start : start + t.grad_accum]]
                learner.train_step(batches, self.loss)
        self.policy_changed()

    # ---- batches and the loss ----------------------------------------------------------
    def collate(self, pairs: list[Pair]) -> SPINPairs:
        gaps = [p.reward_gap for p in pairs]
        sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
            (p.prompt_ids, p.rejected_ids) for p in pairs
        ]
        return SPINPairs(
            tokens=align.lay_out(sequences, self.pad_id, self.config.data.padding_free),
            num_pairs=len(pairs),
            example_ids=torch.tensor([p.example_id for p in pairs]),
            ref_chosen=torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64),
            ref_rejected=torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64),
            reward_gap=None if None in gaps else torch.tensor(gaps, dtype=torch.float32),
        )

    def loss(self, batch: SPINPairs) -> align.LossOutput:
        logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        chosen, rejected = logps.split(batch.num_pairs)
        dtype, device = chosen.sum.dtype, chosen.sum.device
        pairs = align.PreferenceBatch(
            chosen_logps=chosen.sum,
            rejected_logps=rejected.sum,
            chosen_lengths=chosen.count,
            rejected_lengths=rejected.count,
            ref_chosen_logps=batch.ref_chosen.to(device, dtype),
            ref_rejected_logps=batch.ref_rejected.to(device, dtype),
            reward_gap=batch.reward_gap,
        )
        out = align.combine_losses(self.losses, pairs)
        out.metrics |= self.margin_metrics(pairs)
        return out

    def margin_metrics(self, b: align.PreferenceBatch) -> dict[str, Tensor]:
        """How far the policy has moved from the reference towards gold and away from its own
        answers: beta * log-ratio margins (mean log-probs for reference-free losses)."""
        with torch.no_grad():
            if self.beta is not None:
                chosen, rejected = self.beta * b.chosen_logratios, self.beta * b.rejected_logratios
            else:
                chosen, rejected = b.chosen_logps_mean, b.rejected_logps_mean
            margin = chosen - rejected
            return {
                "reward_accuracy": align.pairwise_accuracy(margin),
                "reward_margin": margin.mean(),
                "reward_chosen": chosen.mean(),
                "reward_rejected": rejected.mean(),
            }

    # ---- outputs -----------------------------------------------------------------------
    def iteration_dir(self, number: int) -> Path:
        return Path(self.config.output_dir) / ITERATIONS_DIR / f"iteration_{number}"

    def write_generations(self, number: int, samples: list[align.Sample]) -> None:
        """One JSON line per answer: the prompt, gold, the policy's answer (and its reward)."""
        lines = []
        for s in samples:
            record = {
                "example_id": s.prompt.example_id,
                "prompt": s.prompt.prompt,
                "gold": s.prompt.row[self.completion_column],
                "generated": s.text,
                "finish_reason": s.finish_reason,
            }
            if self.reward is not None:
                record["reward"] = s.reward
            lines.append(json.dumps(record))
        folder = self.iteration_dir(number)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "generations.jsonl.tmp"
        partial.write_text("".join(line + "\n" for line in lines))
        os.replace(partial, folder / "generations.jsonl")  # a killed run never leaves half a file

    def save_iteration_model(self, number: int) -> None:
        """pi_t in HF layout. A resumed run that redoes iteration t writes the same weights again
        (the earlier attempt's folder is replaced only once the new one is complete)."""
        target = self.iteration_dir(number) / "model"
        partial = target.with_name("model.tmp")
        if partial.exists():
            shutil.rmtree(partial)
        self.ctx.backend.save_pretrained(self.ctx.policy, partial)
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)

    # ---- evaluation and state ----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[align.SFTTokens]) -> dict[str, float]:
        """Token-mean NLL of the gold responses; with a reward, the held-out reward of
        ``eval_sampling`` answers and the win rate against the start model's answers (ties
        count half: 0.5 before training)."""
        nll = tokens = 0.0
        ids: list[int] = []
        for batch in batches:
            logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
            nll -= float(logps.sum.sum())
            tokens += float(logps.count.sum())
            ids += batch.example_ids.tolist()
        metrics = {"gold_nll": nll / max(tokens, 1.0)}
        if self.reward is None or not ids:
            return metrics
        rows = self.eval_rows(ids)
        self.sync_engine()
        result = self.rollouts().generate(rows, self.seeded(self.config.eval_sampling, 0))
        rewards: dict[int, float] = {}
        for row, group in zip(rows, result.groups, strict=True):
            rewards[row.example_id] = sum(s.reward for s in group) / len(group)
        if self.start_rewards is None:
            self.start_rewards = dict(rewards)
        metrics["reward"] = sum(rewards.values()) / len(rewards)
        metrics["win_rate_vs_start"] = win_rate(rewards, self.start_rewards)
        return metrics

    def eval_rows(self, example_ids: list[int]) -> list[align.PromptRow]:
        by_id = {int(row["example_id"]): row for row in self.ctx.eval_data}
        return [self.prompt_row(by_id[i]) for i in example_ids]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.start_rewards is not None:
            state["start_rewards"] = {str(k): v for k, v in self.start_rewards.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("start_rewards")
        self.start_rewards = None if saved is None else {int(k): float(v) for k, v in saved.items()}


def win_rate(rewards: dict[int, float], baseline: dict[int, float]) -> float:
    """Share of the prompts both answered where ``rewards`` beats ``baseline`` (a tie: half)."""
    common = [i for i in rewards if i in baseline]
    if not common:
        return float("nan")
    wins = sum(1.0 if rewards[i] > baseline[i] else 0.5 if rewards[i] == baseline[i] else 0.0 for i in common)
    return wins / len(common)


@dataclass
class SPINPairs:
    """Pairs in one ``TokenBatch`` (gold answers ``0..n-1``, the policy's ``n..2n-1``) with the
    reference's log-prob sums of both."""

    tokens: align.TokenBatch
    num_pairs: int
    example_ids: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    reward_gap: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(
        SPINConfig,
        batch=align.SFTTokens,
        data_format="sft",
        loss_batch=align.PreferenceBatch,
        default_loss="dpo",
    )(SPIN)
