"""The ``hf`` rollout engine: transformers ``generate`` on the engine's own copy of the policy.

The baseline engine, and what runs when no other is installed. It loads the policy from the
folder the learner wrote (``spec.model_dir``) once; a refit copies each new tensor into the
existing parameter (``param.copy_``), so nothing is rebuilt or read from disk again.

Log-probs are those of the unprocessed logits (``log_softmax`` of the model's raw output, before
temperature, top-p and top-k), the same quantity the trainer computes for a token.

A spec with a ``logits_hook`` (``align.LogitsHook``, e.g. ILQL's ``β (Q − V)``) steers sampling:
at every step the hook gets the hidden state the LM head read (captured by a forward pre-hook on
the head) and the raw logits, and what it returns is sampled from (then temperature, top-p and
top-k apply). The reported log-probs stay the model's own, unsteered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

from align import (
    Completion,
    EngineError,
    EngineSpec,
    LogitsHook,
    NamedWeights,
    RolloutEngineConfig,
    SamplingConfig,
    check_prompts,
    resolve_device,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class HFEngineConfig(RolloutEngineConfig):
    """transformers ``generate``: slower than vLLM, but needs nothing beyond the ``hf`` backend."""

    name: Literal["hf"] = "hf"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    batch_size: int = Field(
        64,
        gt=0,
        description="Sequences (prompts x n) generated together. Bounds memory: the raw logits of "
        "every step of a batch are kept to compute the log-probs.",
    )
    device: str | None = Field(
        None,
        description="torch device (auto | cpu | cuda | cuda:N); default: the trainer's (backend.device), "
        "else cuda when available, else cpu.",
    )


class HFEngine:
    """``align.RolloutEngine`` on transformers ``generate`` (see the module docstring)."""

    def __init__(self, cfg: HFEngineConfig, spec: EngineSpec) -> None:
        self.cfg, self.spec = cfg, spec
        self.device = resolve_device(cfg.device or spec.device or "auto", "rollout_engine.device")
        with torch.random.fork_rng(devices=[]):  # loading may initialise (then overwrite) weights
            self.model: Any = _load(spec, cfg.attn_implementation).to(self.device)
        self.eos_token_id = _first(spec.eos_token_id, self.model.config.eos_token_id)
        self.pad_token_id = _first(spec.pad_token_id, self.model.config.pad_token_id, self.eos_token_id, 0)
        # Unseeded calls draw their seed here, so an engine's samples depend only on spec.seed
        # and never on (or disturb) the trainer's global RNG.
        self.seeds = torch.Generator().manual_seed(spec.seed)
        self.asleep = False
        self.steering = _Steering(spec.logits_hook, self.model) if spec.logits_hook is not None else None

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        check_prompts("hf", prompts, self.spec.max_model_len)
        self.wake_up()
        seed = sampling.seed if sampling.seed is not None else _draw_seed(self.seeds)
        prompts_per_batch = max(1, self.cfg.batch_size // sampling.n)
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), prompts_per_batch):
            batch = prompts[start : start + prompts_per_batch]
            # A batch's seed depends on its position only: the same call gives the same samples.
            results += self._generate_batch(batch, sampling, seed + start)
        return results

    def refit(self, weights: NamedWeights) -> None:
        targets = self.model.state_dict(keep_vars=True)
        filled: set[int] = set()
        with torch.no_grad():
            for name, tensor in weights:
                target = targets.get(name)
                if target is None:
                    raise EngineError(
                        f"engine 'hf': refit got weight '{name}', which the model does not have"
                    )
                if target.shape != tensor.shape:
                    raise EngineError(
                        f"engine 'hf': refit weight '{name}' has shape {tuple(tensor.shape)}, "
                        f"the model's is {tuple(target.shape)}"
                    )
                target.copy_(tensor)
                filled.add(id(target))
        missing = [name for name, target in targets.items() if id(target) not in filled]
        if missing:
            raise EngineError(f"engine 'hf': refit did not get {len(missing)} weights, e.g. '{missing[0]}'")

    def sleep(self) -> None:
        # Only an accelerator's memory is worth freeing; on CPU the weights stay where they are.
        if self.device.type != "cpu" and not self.asleep:
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.asleep = True

    def wake_up(self) -> None:
        if self.asleep and self.device.type != "cpu":
            self.model.to(self.device)
        self.asleep = False

    def close(self) -> None:
        del self.model

    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int
    ) -> list[list[Completion]]:
        input_ids, attention_mask = _left_padded(prompts, self.pad_token_id, self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.inference_mode():
                out: Any = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=self._generation_config(sampling),
                    logits_processor=LogitsProcessorList([self.steering]) if self.steering else None,
                )
        new_tokens = out.sequences[:, input_ids.shape[1] :]
        # Raw logits of every step (before temperature / top-p / top-k), one row per sequence.
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        token_logprobs = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        stops = set(sampling.stop_token_ids)
        if not sampling.ignore_eos and self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        completions = []
        for row, prompt in enumerate(prompts[i // sampling.n] for i in range(len(new_tokens))):
            room = self.spec.max_model_len - len(prompt)
            completions.append(
                _completion(new_tokens[row].tolist(), token_logprobs[row].tolist(), stops, room)
            )
        return [completions[i : i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        stops = list(sampling.stop_token_ids)
        if not sampling.ignore_eos and self.eos_token_id is not None:
            stops.append(self.eos_token_id)
        sample = sampling.temperature > 0
        return GenerationConfig(
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=sampling.top_k if sample else None,  # 0: no top-k cut
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=stops or None,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )


class _Steering(LogitsProcessor):
    """Applies a logits hook at each generation step, with the hidden state the LM head read for
    the last position (a forward pre-hook on the head keeps it)."""

    def __init__(self, hook: LogitsHook, model: Any) -> None:
        self.hook = hook
        self.hidden: Tensor | None = None
        model.get_output_embeddings().register_forward_pre_hook(self._keep_hidden)

    def _keep_hidden(self, module: Any, args: tuple[Tensor, ...]) -> None:
        self.hidden = args[0][:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.hidden is None or self.hidden.shape[0] != scores.shape[0]:
            raise EngineError("engine 'hf': the logits hook got no hidden state for this step")
        steered: torch.FloatTensor = self.hook(self.hidden, scores)  # type: ignore[assignment]
        return steered


def build_hf_engine(cfg: HFEngineConfig, spec: EngineSpec) -> HFEngine:
    return HFEngine(cfg, spec)


def _load(spec: EngineSpec, attn_implementation: str) -> Any:
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            spec.model_dir, dtype=DTYPES[spec.dtype], attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as exc:
        raise EngineError(f"engine 'hf': cannot load a causal LM from '{spec.model_dir}': {exc}") from None
    model.eval().requires_grad_(False)
    # generate() fills every setting a call leaves unset from the model's generation config
    # (a checkpoint's generation_config.json: its EOS, a default top_k of 50, a repetition
    # penalty). A blank one leaves only what the sampling settings ask for.
    model.generation_config = GenerationConfig()
    return model


def _left_padded(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _completion(tokens: list[int], logprobs: list[float], stops: set[int], room: int) -> Completion:
    """Cut a generated row at its first stop token (kept) or at the model's length limit;
    what ``generate`` wrote after a sequence finished is padding."""
    end = next((i + 1 for i, token in enumerate(tokens) if token in stops), None)
    if end is not None and end <= room:
        return Completion(tokens[:end], logprobs[:end], "stop")
    end = min(len(tokens), room)
    return Completion(tokens[:end], logprobs[:end], "length")


def _first(*values: Any) -> Any:
    for value in values:
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return value
    return None


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
