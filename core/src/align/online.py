"""Pieces every online method shares: start a rollout engine from the learner's policy, sample
and score completions, refit the engine after an update, and measure each phase.

An online algorithm (rejection sampling, GRPO, PPO...) drives the learner through
generate -> score -> train -> refit with these, so none of them writes its own loop for it.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import Field

from align import distributed
from align.algorithm import Algorithm, Context
from align.backends import save_merged
from align.batches import TokenBatch
from align.builtin.prompts import PromptRow, prompt_rows
from align.config import RewardConfig, RolloutEngineConfig, RunConfig
from align.errors import UserError
from align.layout import lay_out
from align.registry import Registry
from align.rewards import close_reward, submit_reward
from align.rollout import EngineError, EngineSpec, LogitsHook, RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from align.protocols import RewardSource

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Sample:
    """One completion of one prompt, decoded, with the engine's token log-probs and its reward."""

    prompt: PromptRow
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    reward: float = math.nan


@dataclass
class RolloutResult:
    """``samples`` grouped by prompt: ``groups[i]`` holds the ``n`` samples of ``rows[i]``.
    ``pending``: rewards still being computed (``generate(..., defer_rewards=True)``), until
    ``wait_for_rewards()``."""

    groups: list[list[Sample]]
    metrics: dict[str, float] = field(default_factory=dict)
    pending: PendingRewards | None = field(default=None, repr=False, compare=False)

    @property
    def samples(self) -> list[Sample]:
        return [s for group in self.groups for s in group]

    def wait_for_rewards(self) -> None:
        """Fill every sample's ``reward`` from the pending requests (nothing when none are
        pending). Metrics: ``score_s`` (the reward's own time, request to answer),
        ``reward_blocked_s`` (what of it the caller waited) and ``reward_hidden_s`` (the rest,
        hidden behind the caller's work), plus ``reward_mean``. With data-parallel ranks it is
        a collective call (each rank's rewards go to every rank)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        self.metrics.update(pending.wait())
        samples = self.samples
        self.metrics["reward_mean"] = sum(s.reward for s in samples) / max(1, len(samples))


@dataclass
class ScoreRequest:
    """One work item's rewards, asked for (``align.submit_reward``) and maybe not yet answered."""

    future: Future[torch.Tensor]
    sent_at: float
    blocked_s: float  # how long sending took: all of the scoring for a reward without ``submit``
    answered_at: float | None = None

    def answered(self, _: Future[torch.Tensor]) -> None:
        self.answered_at = time.perf_counter()


class PendingRewards:
    """The rewards of a rollout's work items (``parts``): this rank's requests, by item."""

    def __init__(self, parts: Sequence[RolloutResult], requests: dict[int, ScoreRequest], ranks: int) -> None:
        self.parts, self.requests, self.ranks = list(parts), requests, ranks

    def wait(self) -> dict[str, float]:
        started = time.perf_counter()
        mine = {item: request.future.result().tolist() for item, request in self.requests.items()}
        waited = time.perf_counter() - started
        every = mine
        if self.ranks > 1:  # each rank scored the items it generated; all ranks need all rewards
            every = {item: values for theirs in distributed.gather(mine) for item, values in theirs.items()}
        for item, part in enumerate(self.parts):
            for sample, value in zip(part.samples, every[item], strict=True):
                sample.reward = float(value)
        scoring = sum(
            (request.answered_at or started + waited) - request.sent_at for request in self.requests.values()
        )
        blocked = waited + sum(request.blocked_s for request in self.requests.values())
        return {
            "score_s": scoring,
            "reward_blocked_s": blocked,
            "reward_hidden_s": max(0.0, scoring - blocked),
        }


def build_engine(cfg: RolloutEngineConfig, registry: Registry, spec: EngineSpec) -> RolloutEngine:
    """The configured engine, started on ``spec``. A crash while starting is a user error naming
    the engine (an unsupported model shape, a missing package), never a traceback."""
    entry = registry.get("rollout_engine", cfg.name)
    if spec.logits_hook is not None and not entry.meta.get("logits_hook", False):
        able = [e.name for e in registry.entries("rollout_engine") if e.meta.get("logits_hook")]
        raise EngineError(
            f"rollout engine '{cfg.name}' ({entry.package}) cannot steer sampling with a logits hook "
            f"(such as ILQL's heads); engines that can: {', '.join(able) or 'none installed'}"
        )
    try:
        engine: RolloutEngine = entry.factory(cfg, spec)
    except UserError:
        raise
    except Exception as exc:
        raise EngineError(
            f"rollout engine '{cfg.name}' ({entry.package}) could not start: {type(exc).__name__}: {exc}"
        ) from exc
    return engine


class Rollouts:
    """An engine plus what turns its token ids into scored samples (the trainer's tokenizer and
    the reward). Owns the engine: ``close()`` frees it."""

    def __init__(
        self,
        engine_cfg: RolloutEngineConfig,
        registry: Registry,
        tokenizer: Any,
        model_dir: Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        reward: RewardSource | None = None,
        logits_hook: LogitsHook | None = None,
        device: str | None = None,
    ) -> None:
        self.tokenizer, self.reward = tokenizer, reward
        self.version = 0  # how many refits the engine has taken
        spec = EngineSpec(
            model_dir=model_dir,
            dtype=dtype,  # type: ignore[arg-type]
            max_model_len=max_model_len,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            seed=seed,
            logits_hook=logits_hook,
            device=device,
        )
        self.engine = build_engine(engine_cfg, registry, spec)
        self.engine_name = engine_cfg.name

    def generate(
        self, rows: Sequence[PromptRow], sampling: SamplingConfig, score: bool = True
    ) -> RolloutResult:
        """``sampling.n`` completions per row, decoded and (with a reward and ``score``) scored."""
        started = time.perf_counter()
        with self._engine_errors("generating"):
            outputs = self.engine.generate([r.prompt_ids for r in rows], sampling)
        generated = time.perf_counter() - started
        groups = [
            [
                Sample(row, list(c.token_ids), list(c.logprobs), c.finish_reason, self._decode(c.token_ids))
                for c in completions
            ]
            for row, completions in zip(rows, outputs, strict=True)
        ]
        result = RolloutResult(groups)
        tokens = sum(len(s.completion_ids) for s in result.samples)
        result.metrics.update(
            generate_s=generated,
            generation_tokens_per_s=tokens / max(generated, 1e-9),
            completion_tokens_mean=tokens / max(1, len(result.samples)),
            truncated_fraction=sum(s.finish_reason == "length" for s in result.samples)
            / max(1, len(result.samples)),
        )
        if self.reward is not None and score:
            self.score(result)
        return result

    def submit_scores(self, samples: Sequence[Sample]) -> ScoreRequest:
        """Ask the reward for ``samples``' scores (``align.submit_reward``): returns at once with
        a reward that sends requests (``remote``), after scoring with one that does not."""
        assert self.reward is not None
        sent_at = time.perf_counter()
        future = submit_reward(
            self.reward,
            [s.prompt.prompt for s in samples],
            [s.text for s in samples],
            [s.prompt.row for s in samples],
        )
        request = ScoreRequest(future, sent_at, time.perf_counter() - sent_at)
        if future.done():  # scored while sending: all of it blocked the caller
            request.answered_at = sent_at + request.blocked_s
        else:
            future.add_done_callback(request.answered)
        return request

    def score(self, result: RolloutResult) -> None:
        assert self.reward is not None
        samples = result.samples
        started = time.perf_counter()
        rewards = self.reward(
            [s.prompt.prompt for s in samples], [s.text for s in samples], [s.prompt.row for s in samples]
        )
        for sample, value in zip(samples, torch.as_tensor(rewards).tolist(), strict=True):
            sample.reward = float(value)
        result.metrics["score_s"] = time.perf_counter() - started
        result.metrics["reward_mean"] = sum(s.reward for s in samples) / max(1, len(samples))

    def refit(self, weights: Any) -> float:
        """Swap new weights into the engine in place; returns the seconds it took."""
        started = time.perf_counter()
        with self._engine_errors("taking new weights (refit)"):
            self.engine.refit(weights)
        self.version += 1
        return time.perf_counter() - started

    def close(self) -> None:
        self.engine.close()

    @contextmanager
    def _engine_errors(self, doing: str) -> Iterator[None]:
        """An engine that dies mid-run is named, with what it was doing; the run stops with exit
        code 2 and its last checkpoint is kept."""
        try:
            yield
        except UserError:
            raise
        except Exception as exc:
            raise EngineError(
                f"rollout engine '{self.engine_name}' failed while {doing}: {type(exc).__name__}: {exc}. "
                "The last checkpoint is kept; rerun with --resume once the engine works."
            ) from exc

    def _decode(self, token_ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text


def policy_weights(ctx: Context) -> Any:
    """The policy's weights as (HF name, tensor) pairs, what ``refit`` takes."""
    named = getattr(ctx.backend, "named_weights", None)
    if callable(named):
        return named(ctx.policy)
    return ((name, tensor.detach()) for name, tensor in ctx.policy.state_dict().items())


def start_rollouts(
    ctx: Context,
    engine_cfg: RolloutEngineConfig,
    *,
    reward: RewardSource | None = None,
    max_model_len: int = 1024,
    logits_hook: LogitsHook | None = None,
) -> Rollouts:
    """Start an engine on the policy's current weights, written once to a temporary HF folder
    the engine loads from (later updates arrive by ``refit``, never through the disk); adapters
    (LoRA) are merged into the weights the engine gets."""
    cfg = ctx.config
    with tempfile.TemporaryDirectory(prefix="align-engine-") as folder:
        model_dir = Path(folder) / "policy"
        save_merged(ctx.backend, ctx.policy, model_dir)
        return Rollouts(
            engine_cfg,
            ctx.registry,
            ctx.backend.tokenizer,
            model_dir,
            dtype=cfg.model.dtype,
            max_model_len=max_model_len,
            seed=cfg.seed,
            reward=reward,
            logits_hook=logits_hook,
            device=backend_device(ctx.backend),
        )


@contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """``module`` in eval mode (dropout off, LoRA's adapter dropout too) for a scoring pass,
    then back in the mode it was in. A pass that stands for the old policy or the reference
    must not sample dropout masks: the engine generated without them, and an old policy whose
    log-probs change from call to call makes the importance ratio noise."""
    # Each submodule's own mode comes back (a frozen part kept in eval mode stays so), not a
    # blanket ``train()``.
    if not isinstance(module, torch.nn.Module):  # a stand-in without modes: nothing to switch
        yield
        return
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


class PromptStream:
    """The training prompts in a seeded order, one shuffle per pass over the data, read from
    ``position`` on: an online method's place in its prompts, which its checkpoints hold so that
    a resumed run takes the prompts the uninterrupted one would have."""

    def __init__(self, data: Any, seed: int, prompt_column: str = "prompt", position: int = 0) -> None:
        self.data, self.seed, self.prompt_column = data, seed, prompt_column
        self.position = position  # prompts taken so far, over all passes
        self._order: list[int] = []
        self._order_pass = -1

    def take(self, count: int) -> list[PromptRow]:
        """The next ``count`` prompts (passing into the next shuffled pass when one runs out)."""
        indices = []
        for position in range(self.position, self.position + count):
            data_pass, index = divmod(position, len(self.data))
            indices.append(self._order_of(data_pass)[index])
        self.position += count
        return prompt_rows([self.data[i] for i in indices], self.prompt_column)

    def _order_of(self, data_pass: int) -> list[int]:
        if self._order_pass != data_pass:
            generator = torch.Generator().manual_seed(self.seed + data_pass)
            self._order = torch.randperm(len(self.data), generator=generator).tolist()
            self._order_pass = data_pass
        return self._order


class OnlineConfig(RunConfig):
    """Keys every online algorithm has: an engine, a reward, how to sample, how many rounds.
    An algorithm's config subclasses it (and may change the defaults)."""

    rollout: RolloutEngineConfig = Field(
        default_factory=lambda: RolloutEngineConfig(name="hf"),
        description="The generation engine (hf, vllm, trtllm...).",
    )
    reward: RewardConfig
    sampling: SamplingConfig = Field(
        SamplingConfig(n=8, temperature=1.0, max_tokens=32),
        description="How rollouts are sampled; n is the number of samples per prompt.",
    )
    eval_sampling: SamplingConfig = Field(
        SamplingConfig(n=1, temperature=0.0, max_tokens=32),
        description="How held-out prompts are answered for the eval reward (greedy by default).",
    )
    iterations: int = Field(10, gt=0, description="Generate -> score -> train -> refit rounds.")
    prompts_per_iteration: int = Field(32, gt=0, description="Prompts sampled per iteration.")
    generation_chunk: int | None = Field(
        None,
        gt=0,
        description="Prompts per work item of the generation queue that data-parallel ranks "
        "(backend.nproc_per_node > 1) share: a rank claims the next item when done with its last, so a "
        "faster rank takes more. Item i is sampled with seed + its first prompt's index. null: one item "
        "with one rank, else prompts / (4 x ranks).",
    )


class OnlineAlgorithm(Algorithm):
    """What every online algorithm shares, so none of them copies it: the rounds of the driver
    (``trainer.eval_every``/``save_every`` count iterations; checkpoints fall only between
    iterations), the engine started lazily on the policy and refit when the policy changed, the
    seeded prompt stream, seeds per (iteration, round), the held-out reward evaluation and the
    resumable state. A subclass writes ``run_iteration(learner)`` and calls
    ``policy_changed()`` after it trains."""

    config: OnlineConfig

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        cfg = self.config
        self.reward: RewardSource | None = self.make_reward()
        self.iteration = 0
        prompt_column = getattr(getattr(cfg.data, "columns", None), "prompt", "prompt")
        self.prompts = PromptStream(ctx.train_data, cfg.seed, prompt_column)
        self._rollouts: Rollouts | None = None
        self._engine_is_stale = False  # the policy changed since the engine's last refit
        self.pad_id = ctx.backend.tokenizer.pad_token_id
        # Data-parallel actors (align.distributed): ranks sharing generation and each step.
        self.ranks = distributed.actor_ranks(ctx.backend)
        self.work = distributed.WorkQueue()

    def lay_out(self, samples: Sequence[Sample]) -> TokenBatch:
        """Samples as one token batch (prompt, then completion scored), padded or packed as
        ``data.padding_free`` says."""
        sequences = [(s.prompt.prompt_ids, s.completion_ids) for s in samples]
        return lay_out(sequences, self.pad_id, getattr(self.config.data, "padding_free", False))

    def completion_logps(
        self, model: Any, chunks: Iterable[Sequence[Sample]], with_entropy: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each sample's per-token log-probs (and entropies) of its completion under ``model``,
        float32, one forward per chunk (the caller sizes the chunks to fit memory), with dropout
        off (``eval_mode``): these are the old policy's and the reference's, which the engine
        sampled without dropout. With data-parallel ranks the chunks are dealt out between them
        (a collective call)."""
        logps: list[torch.Tensor] = []
        entropies: list[torch.Tensor] = []
        with eval_mode(model):
            for chunk_logps, chunk_entropies in self.deal_out(
                list(chunks), lambda chunk: self._chunk_logps(model, chunk, with_entropy)
            ):
                logps += chunk_logps
                entropies += chunk_entropies
        return logps, entropies

    def deal_out(self, items: Sequence[T], work: Callable[[T], R]) -> list[R]:
        """``work(item)`` for every item, in order. With data-parallel ranks item i is done by
        rank i mod ranks and every rank gets every result (a collective call): for passes whose
        results every rank needs (log-probs, values before training)."""
        me = distributed.rank() if self.ranks > 1 else 0
        mine = {i: work(items[i]) for i in range(me, len(items), self.ranks)}
        if self.ranks == 1:
            return [mine[i] for i in range(len(items))]
        done = {i: result for theirs in distributed.gather(mine) for i, result in theirs.items()}
        return [done[i] for i in range(len(items))]

    def from_main(self, work: Callable[[], R]) -> R:
        """``work()`` done by rank 0 alone, its result given to every data-parallel rank (a
        collective call): for what one rank alone may do, such as talking to a server that keeps
        state. A user error raised there is raised on every rank, so none waits forever."""
        if self.ranks == 1:
            return work()
        outcome: tuple[bool, Any] = (True, None)
        if distributed.rank() == 0:
            try:
                outcome = (True, work())
            except UserError as exc:
                outcome = (False, exc)
        succeeded, value = distributed.gather(outcome)[0]
        if not succeeded:
            raise value
        result: R = value
        return result

    def _chunk_logps(
        self, model: Any, chunk: Sequence[Sample], with_entropy: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = self.ctx.backend.token_logps(model, self.lay_out(chunk), with_entropy=with_entropy)
        logps, entropies = [], []
        for row, sample in enumerate(chunk):
            length = len(sample.completion_ids)
            logps.append(out.values[row, :length].float())
            if out.entropy is not None:
                entropies.append(out.entropy[row, :length].float())
        return logps, entropies

    def generate(
        self, rows: Sequence[PromptRow], sampling: SamplingConfig, defer_rewards: bool = False
    ) -> RolloutResult:
        """``sampling.n`` scored completions of each row: the engine's ``generate`` in work items
        of ``generation_chunk`` prompts, which data-parallel ranks share through a load-balanced
        queue (a collective call: every rank passes the same rows and gets every group, in row
        order). Metrics: the rollout's, plus ``generated_prompts_rank<r>``.

        ``defer_rewards``: each work item's rewards are asked for as soon as it is generated and
        not awaited: the samples' rewards are NaN until ``result.wait_for_rewards()``, which the
        caller calls when it needs them (after its log-prob passes, so that a remote reward
        works meanwhile)."""
        chunk = self._chunk_size(len(rows))
        starts = list(range(0, len(rows), chunk))
        started = time.perf_counter()

        def work(item: int) -> RolloutResult:
            first = starts[item]
            seed = None if sampling.seed is None else sampling.seed + first
            part = self.rollouts().generate(
                rows[first : first + chunk], sampling.model_copy(update={"seed": seed}), score=not deferred
            )
            if deferred:
                requests[item] = self.rollouts().submit_scores(part.samples)
            return part

        deferred = defer_rewards and self.reward is not None
        requests: dict[int, ScoreRequest] = {}  # not in the parts: futures do not travel between ranks
        parts = self.work.run(len(starts), work, self.ranks)
        result = self._merged(parts, started, scored=not deferred)
        if deferred:
            result.pending = PendingRewards(parts, requests, self.ranks)
        return result

    def _merged(self, parts: list[RolloutResult], started: float, scored: bool) -> RolloutResult:
        """The work items' results as one, with the rollout's metrics."""
        if self.ranks == 1 and len(parts) == 1:
            return parts[0]
        result = RolloutResult([group for part in parts for group in part.groups])
        samples, elapsed = result.samples, time.perf_counter() - started
        tokens = sum(len(s.completion_ids) for s in samples)
        result.metrics.update(
            generate_s=elapsed,
            generation_tokens_per_s=tokens / max(elapsed, 1e-9),
            completion_tokens_mean=tokens / max(1, len(samples)),
            truncated_fraction=sum(s.finish_reason == "length" for s in samples) / max(1, len(samples)),
        )
        if self.reward is not None and samples and scored:
            result.metrics["score_s"] = sum(part.metrics.get("score_s", 0.0) for part in parts)
            result.metrics["reward_mean"] = sum(s.reward for s in samples) / len(samples)
        if self.ranks > 1:
            prompts_done = [0] * self.ranks
            for item, owner in enumerate(self.work.last.ranks):
                prompts_done[owner] += len(parts[item].groups)
            for owner, count in enumerate(prompts_done):
                result.metrics[f"generated_prompts_rank{owner}"] = count
        return result

    def _chunk_size(self, prompts: int) -> int:
        if self.config.generation_chunk is not None:
            return self.config.generation_chunk
        if self.ranks == 1:
            return max(1, prompts)
        return max(1, math.ceil(prompts / (4 * self.ranks)))

    def step_share(self, items: Sequence[T]) -> tuple[list[T], int]:
        """This rank's share of one optimizer step's ``items`` and the number of parts the step
        was split into (``align.distributed.share_of``): a loss normalised over the whole step
        divides its denominator by the parts, since the learner averages the ranks' gradients."""
        return distributed.share_of(items, self.ranks)

    def make_reward(self) -> RewardSource | None:
        """The run's reward, built when the algorithm starts and kept for the whole run. An
        algorithm that keeps one model in memory at a time (SPR) returns None here and builds
        the reward for each scoring phase instead; one whose reward is optional, when unset."""
        from align.rewards import build_reward

        return build_reward(self.config.reward, self.ctx.registry)

    # ---- the driver --------------------------------------------------------------------
    def drive(self, learner: Any) -> None:
        """Iterations until the last (the evaluation after the last one is the learner's)."""
        t = self.config.trainer
        try:
            while self.iteration < self.config.iterations and not learner.should_stop:
                self.run_iteration(learner)
                last = self.iteration == self.config.iterations
                if not last and t.eval_every and self.iteration % t.eval_every == 0:
                    learner.evaluate()
                if last or (t.save_every and self.iteration % t.save_every == 0):
                    learner.save_checkpoint()
        finally:
            self.close()

    def run_iteration(self, learner: Any) -> None:
        """One round: sample, score, train, and ``self.iteration += 1``."""
        raise NotImplementedError

    # ---- the engine --------------------------------------------------------------------
    def rollouts(self) -> Rollouts:
        """The engine (started on the policy's current weights the first time) and the reward."""
        if self._rollouts is None:
            self._rollouts = start_rollouts(
                self.ctx, self.config.rollout, reward=self.reward, max_model_len=self.config.data.max_length
            )
            self._engine_is_stale = False
        return self._rollouts

    def policy_changed(self) -> None:
        """Call after training: the next ``sync_engine`` refits the engine."""
        self._engine_is_stale = True

    def sync_engine(self) -> float:
        """Refit the engine if the policy changed since; returns the seconds it took."""
        if self._rollouts is None or not self._engine_is_stale:
            return 0.0
        seconds = self._rollouts.refit(policy_weights(self.ctx))
        self._engine_is_stale = False
        return seconds

    def seeded(self, sampling: SamplingConfig, iteration: int, round_index: int = 0) -> SamplingConfig:
        """``sampling`` with a seed per (run seed, iteration, sampling round): a resumed run
        samples what the uninterrupted one did."""
        base = sampling.seed if sampling.seed is not None else self.config.seed * 100_003
        return sampling.model_copy(update={"seed": base + 1000 * iteration + round_index})

    def close(self) -> None:
        """Free the engine (the next ``rollouts()`` starts it again: the final evaluation does)."""
        if self._rollouts is not None:
            self._rollouts.close()
            self._rollouts = None

    def release(self) -> None:
        """The end of the run: the engine and the reward (a server it started, its client)."""
        self.close()
        if self.reward is not None:
            close_reward(self.reward)

    # ---- evaluation and state ----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Any) -> dict[str, float]:
        """Held-out reward: each eval prompt answered with ``eval_sampling`` (greedy by default),
        by the engine holding the policy's current weights."""
        self.rollouts()
        self.sync_engine()
        rewards: list[float] = []
        lengths: list[int] = []
        for batch in batches:
            result = self.generate(batch.rows, self.seeded(self.config.eval_sampling, 0))
            rewards += [s.reward for s in result.samples]
            lengths += [len(s.completion_ids) for s in result.samples]
        if not rewards:
            return {}
        return {"reward": sum(rewards) / len(rewards), "completion_tokens": sum(lengths) / len(lengths)}

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "prompt_position": self.prompts.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.prompts.position = int(state["prompt_position"])


def backend_device(backend: object) -> str | None:
    """The device a backend trains on (its ``device`` attribute), for the rollout engine to
    follow; None for a backend that does not say."""
    device = getattr(backend, "device", None)
    return None if device is None else str(device)
