"""What the side-by-side benchmarks share: the model they all use, a 28.8M-parameter Llama
(6 layers, hidden 512, 8 heads, vocab 8192, untied) built in code with a fixed seed, so align,
TRL and the engines are measured on exactly the same weights; the fresh worker process each
measurement runs in; what a worker measures (step times through align's lifecycle hooks or a TRL
callback, peak RSS); and the pieces of the drivers that run the variants alternately."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VOCAB = 8192
# Llama shapes by name: layers, hidden, MLP width, heads. "bench" is the 28.8M CPU model (vocab
# 8192); the larger ones mean something on a GPU (vocab 32000: ~134M and ~372M parameters).
SHAPES: dict[str, dict[str, int]] = {
    "bench": {"layers": 6, "hidden": 512, "ffn": 1536, "heads": 8, "vocab": VOCAB},
    "llama-134m": {"layers": 12, "hidden": 768, "ffn": 2048, "heads": 12, "vocab": 32000},
    "llama-372m": {"layers": 24, "hidden": 1024, "ffn": 2816, "heads": 16, "vocab": 32000},
}

# Real models a benchmark can run on instead of one built in code: the name, align's
# ``model.path`` shortcut for it, and its shape (for FLOP counts: query and key-value heads,
# tied embeddings). Both sides load the same folder: the one align dequantized the shortcut's
# GGUF file into (docs/real-model.md), with the model's own tokenizer.
REAL_MODELS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "shortcut": "smollm2-135m",
        "layers": 30,
        "hidden": 576,
        "ffn": 1536,
        "heads": 9,
        "kv_heads": 3,
        "vocab": 49152,
    },
}


def real_model_dir(name: str) -> Path:
    """The HF folder of ``REAL_MODELS[name]``: align resolves its shortcut (converting the GGUF
    file into align's cache the first time), so TRL and align read the same safetensors."""
    from align import ModelConfig
    from align.gguf import resolve_model

    return Path(resolve_model(ModelConfig(path=REAL_MODELS[name]["shortcut"])))


def weight_parameters(dims: dict[str, Any]) -> int:
    """The weights a token multiplies in a Llama of ``dims`` (``SHAPES`` or ``REAL_MODELS``):
    attention (grouped-query when ``kv_heads`` < ``heads``), SwiGLU MLP and the LM head (tied or
    not, it is a matmul); not the embedding lookup."""
    d = dims["hidden"]
    kv_share = dims.get("kv_heads", dims["heads"]) / dims["heads"]
    attention = 2 * d * d + 2 * d * d * kv_share  # q and o, k and v
    return int(dims["layers"] * (attention + 3 * d * dims["ffn"]) + d * dims["vocab"])


# The character-level tokenizer of the online benchmarks (GRPO, PPO): the special tokens, one
# token per character of the arithmetic prompts, then filler tokens up to the vocabulary's size.
SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
CHARACTERS = "0123456789+-*="


def save_character_tokenizer(model_dir: Path, filler: Callable[[int], str], vocab_size: int = VOCAB) -> None:
    """Write the character-level tokenizer to ``model_dir``: every character is one token
    (``SPECIALS``, then ``CHARACTERS``), and the ids above them up to ``vocab_size`` are filler
    tokens, id ``i`` written ``filler(i)``; decoding joins the tokens without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = {c: len(SPECIALS) + i for i, c in enumerate(CHARACTERS)}
    first_filler = len(SPECIALS) + len(characters)
    vocab = SPECIALS | characters | {filler(i): i for i in range(first_filler, vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(model_dir)


def save_bench_llama(model_dir: Path, seed: int = 0, vocab_size: int = VOCAB, shape: str = "bench") -> None:
    """Write the benchmark model (config + safetensors) to ``model_dir``: the 28.8M model, or
    another of ``SHAPES`` (``vocab_size`` applies to "bench"; the others carry their own)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab_size if shape == "bench" else dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir)


def online_trainer_settings(threads: int) -> dict[str, Any]:
    """The ``trainer`` settings align's online benchmarks (GRPO, PPO) share besides batch size
    and precision: gradients clipped at 1.0, a constant learning rate, ``threads`` threads,
    nothing saved, evaluated or shown, a metrics row every step (the timers read them)."""
    return {
        "max_grad_norm": 1.0,
        "lr_scheduler": "constant",
        "num_threads": threads,
        "save_every": 0,
        "eval_every": 0,
        "tensorboard": False,
        "progress": False,
        "log_every": 1,
    }


def run_worker(
    script: str, variant: str, workdir: Path, total_steps: int, threads: int, extra: Sequence[str] = ()
) -> tuple[dict[str, Any] | None, str]:
    """Run ``script --worker variant`` (plus ``extra`` arguments) in a fresh process pinned to
    ``threads`` threads with cold caches; returns (its result JSON, or None when it failed, and
    its stderr's tail)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            HF_DATASETS_CACHE=str(Path(tmp) / "datasets-cache"),  # TRL's precompute cache: cold
            TOKENIZERS_PARALLELISM="false",
            TQDM_DISABLE="1",
            PYTHONWARNINGS="ignore",
            VLLM_ENABLE_V1_MULTIPROCESSING="0",  # in-process vLLM, like align's engine
        )
        command = [sys.executable, script, "--worker", variant, "--workdir", str(workdir), "--out", str(out)]
        command += ["--total-steps", str(total_steps), "--threads", str(threads), *extra]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return None, done.stderr[-4000:]
        result: dict[str, Any] = json.loads(out.read_text())
        return result, done.stderr[-4000:]


# ---- what a worker measures ------------------------------------------------------------------------
def peak_rss_mb(include_children: bool = True) -> float:
    """This process's peak resident memory in MiB (ru_maxrss is KiB on Linux), or that of its
    largest child when that is larger and ``include_children`` is set."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not include_children:
        return own / 1024
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def fmt_load(load: Sequence[float]) -> str:
    """A load average (1, 5, 15 min) as ``1.0/2.0/3.0``."""
    return "/".join(f"{value:.1f}" for value in load)


def write_worker_result(result: dict[str, Any], out: Path, started: float) -> None:
    """Finish a worker: add its peak RSS (children included) and its wall time since
    ``started`` (the worker module's import), and write the result JSON the driver reads."""
    result["peak_rss_mb"] = peak_rss_mb()
    result["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(result))


@dataclass
class StepMarks:
    """The wall-clock marks of one training run: one when training starts and one at the end of
    each step (of one metrics ``split`` on align's side), so ``step_s()`` is each step's time
    including whatever happened between steps; and what was recorded at each step."""

    split: str = "train"
    clock: Callable[[], float] = time.perf_counter
    marks: list[float] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)

    def step_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.marks)]


def align_step_timer(
    split: str,
    clock: Callable[[], float] = time.perf_counter,
    add_to_row: Callable[[dict[str, float]], None] | None = None,
) -> StepMarks:
    """A hook plugin to register on align's plugin manager: marks the start of training and the
    end of each step whose metrics have ``split`` (e.g. "train", or "rollout" for a whole
    GRPO/PPO iteration), reading ``clock``; keeps each such step's numeric metrics in ``rows``,
    after ``add_to_row`` added what the benchmark measures itself at that moment."""
    import align  # not at the top: TRL's workers run in venvs without align

    class AlignTimer(StepMarks):
        @align.hookimpl
        def on_train_start(self, run: Any) -> None:
            self.marks.append(self.clock())

        @align.hookimpl
        def on_step_end(self, run: Any, step: int, metrics: dict[str, Any]) -> None:
            if metrics.get("split") != self.split:
                return
            self.marks.append(self.clock())
            row = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            if add_to_row is not None:
                add_to_row(row)
            self.rows.append(row)

    return AlignTimer(split, clock)


def trl_step_timer(
    log_key: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_step: Callable[[], None] | None = None,
) -> tuple[Any, StepMarks]:
    """A ``transformers.TrainerCallback`` that marks the start of training and the end of each
    optimizer step, reading ``clock``, and calls ``on_step`` after each mark; with ``log_key``,
    each logged value of that key is kept as a row ``{log_key: value}``. Returns (the callback,
    its marks)."""
    from transformers import TrainerCallback

    timed = StepMarks("trl", clock)

    class TrlTimer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            timed.marks.append(clock())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            timed.marks.append(clock())
            if on_step is not None:
                on_step()

        def on_log(self, *a: Any, logs: dict[str, float] | None = None, **k: Any) -> None:
            if log_key is not None and logs and log_key in logs:
                timed.rows.append({log_key: float(logs[log_key])})

    return TrlTimer(), timed


@dataclass
class TrainedTokens:
    """Per optimizer step: the tokens trained on (padding left out) and the slots they took
    (padding included), so that tokens/s and the padding share compare across sides."""

    tokens: list[int] = field(default_factory=list)
    slots: list[float] = field(default_factory=list)
    pending: list[int] = field(default_factory=lambda: [0, 0])

    def end_step(self) -> None:
        """Close the step: what was counted since the last call is one step's."""
        self.tokens.append(self.pending[0])
        self.slots.append(self.pending[1])
        self.pending[:] = [0, 0]


def count_trl_tokens(trainer: Any) -> TrainedTokens:
    """Count, through a wrapper around ``trainer.compute_loss`` (a TRL/transformers trainer),
    the attention mask's ones and size of each training batch; call ``end_step`` at each step's
    end (``trl_step_timer(on_step=...)``)."""
    counted = TrainedTokens()
    compute_loss = trainer.compute_loss

    def counting_compute_loss(model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
        if model.training:
            counted.pending[0] += int(inputs["attention_mask"].sum())
            counted.pending[1] += inputs["attention_mask"].numel()
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = counting_compute_loss
    return counted


def align_trained_tokens(rows: Sequence[dict[str, float]]) -> TrainedTokens:
    """The same counts from align's train metrics: ``tokens`` and its ``pad_fraction``."""
    return TrainedTokens(
        tokens=[int(row["tokens"]) for row in rows],
        slots=[row["tokens"] / (1.0 - row.get("pad_fraction", 0.0)) for row in rows],
    )


# ---- the driver ------------------------------------------------------------------------------------
@contextmanager
def workload_dir(path: str | None) -> Iterator[Path]:
    """The folder a driver writes its workload (model, data) to: ``path``, kept afterwards, or
    a temporary folder removed at the end."""
    with tempfile.TemporaryDirectory(prefix="bench-workload-") as tmp:
        workdir = Path(path or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir


def parse_variants(text: str) -> list[str]:
    """The variants of a comma-separated ``--variants``, blanks dropped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def run_line(repeat: int, repeats: int, variant: str, took: float, step_s: Sequence[float]) -> str:
    """The progress line of one run: which repeat, how long the run took, and its step times."""
    steps = ", ".join(f"{s:.2f}" for s in step_s)
    return f"repeat {repeat + 1}/{repeats} {variant}: {took:.0f}s, steps {steps}"


def alternating(variants: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, variant) in the order the drivers run them: the variants in order, then in reverse
    order, and so on, so that a slow drift of the machine's load favours none of them."""
    for repeat in range(repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            yield repeat, variant


def add_run_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The arguments every side-by-side driver takes: --steps, --warmup, --repeats, --threads (the
    first three default to None so that ``apply_defaults`` can fill them in), and the hidden ones
    ``run_worker`` passes to a worker: --worker, --out, --total-steps."""
    parser.add_argument("--steps", type=int, help=f"timed steps per run (default {defaults['steps']})")
    parser.add_argument("--warmup", type=int, help="untimed first steps per run (default 1)")
    parser.add_argument("--repeats", type=int, help="runs per variant, alternating (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--total-steps", type=int, help=argparse.SUPPRESS)


def apply_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Fill in each argument of ``defaults`` the command line left out."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
