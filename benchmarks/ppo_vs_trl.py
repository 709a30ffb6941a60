"""PPO step speed and peak memory: align's ``ppo`` against TRL's ``PPOTrainer`` on the same work.

TRL 1.16 (align's pinned version) has no PPO trainer: TRL 1.10 moved it to
``trl.experimental.ppo`` and TRL 1.13 removed it (huggingface/trl#7020). TRL 1.12.0 is the last
release with it, and it runs on the same torch 2.13 / transformers 5.19 / accelerate 1.15 /
datasets 5.2 as align; it is installed in a separate venv, which the TRL worker re-executes
itself in (``--trl-python``, default /tmp/trl_ppo_venv/bin/python)::

    python3 -m venv /tmp/trl_ppo_venv
    /tmp/trl_ppo_venv/bin/pip install torch==2.13.0 numpy==1.26.4 pyarrow==25.0.1 transformers==5.19.0 \\
        datasets==5.2.0 accelerate==1.15.0 trl==1.12.0     # the CPU torch wheel, as the Makefile's

The workload is ppo_time_split.py's (the 28.8M Llama with a character-level tokenizer, the
arithmetic prompts, a reward model of the same size that the value model starts from) and per
step (one PPO iteration, TRL's "update"): 32 prompts x 1 completion of exactly 32 sampled
tokens (temperature 1; EOS ignored in align, no stop token in TRL, so both sample 1,024 tokens),
the KL penalty to the initial policy in the reward (k1, coef 0.05: both keep a reference model),
GAE (gamma 1, lambda 0.95), advantages whitened, 2 PPO epochs of 2 minibatches of 16 (4 optimizer
steps), clip 0.2, value clip 0.2, AdamW lr 1e-6 constant, fp32, sdpa, N threads. The differences
the designs bring: TRL trains policy and value model as one module with one optimizer (loss =
policy loss + 0.1 x value loss, one backward), align trains them as two trainables (the critic
its own step); align clips gradients at 1.0, TRL's PPO loop does not clip; TRL runs its
log-prob, reference, value and reward forwards on the whole rollout batch (32), align on
micro-batches of 16. Each run is a fresh process, the variants alternate, the first step of
each run is not timed.

    python benchmarks/ppo_vs_trl.py                     # align-local, trl: 3 timed steps x 2 repeats
    python benchmarks/ppo_vs_trl.py --variants align-local,align-remote,trl --json out.json

Variants: ``align-local`` (the critic in the actor's process: one process, like TRL's),
``align-remote`` (the critic in a PyTriton server, asynchronous; its peak RSS is the actor
process's alone, the server's is not counted), ``align-local-engine`` (``align-local`` with the
old log-probs from the engine's sampling, ``old_logps_source: engine``, as TRL takes them),
``trl``. A ``-bf16`` suffix runs a variant in bf16
mixed precision: ``trainer.precision: bf16_mixed`` for align (bfloat16 autocast over float32
weights and optimizer state; the hf engine generates with the float32 weights), ``bf16=True``
for TRL (accelerate's autocast over float32 weights; **TRL's default**: ``PPOConfig`` sets bf16
unless fp16 is asked for). Ratios are printed for every align variant over every TRL variant.

    python benchmarks/ppo_vs_trl.py --variants align-local,trl,align-local-bf16,trl-bf16
    python benchmarks/ppo_vs_trl.py --bound 5.06   # the matmul bound of a step (TRL's step: 5.06 s)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_model import (
    SHAPES,
    add_run_arguments,
    alternating,
    apply_defaults,
    fmt_load,
    parse_variants,
    run_line,
    run_worker,
    trl_step_timer,
    weight_parameters,
    workload_dir,
    write_worker_result,
)
from ppo_time_split import (
    CLIP,
    EPOCHS,
    KL_COEF,
    LR,
    MINIBATCH,
    NEW_TOKENS,
    PROMPTS_FILE,
    PROMPTS_PER_STEP,
    SEED,
    VALUE_CLIP,
    prepare,
)

ALIGN_VARIANTS = {"align-local": "local", "align-local-engine": "local", "align-remote": "remote-async"}
# What a variant changes in align's config besides its critic: ``-engine`` takes the old log-probs
# from the hf engine's sampling (``old_logps_source: engine``), as TRL does, instead of a scoring pass.
ALIGN_OVERRIDES: dict[str, dict[str, Any]] = {"align-local-engine": {"old_logps_source": "engine"}}
BF16 = "-bf16"  # the suffix of a variant in bf16 mixed precision
VARIANTS = tuple(v + suffix for suffix in ("", BF16) for v in (*ALIGN_VARIANTS, "trl"))
DEFAULTS = {"variants": "align-local,trl", "steps": 3, "warmup": 1, "repeats": 2}
TRL_PYTHON_ENV = "ALIGN_BENCH_TRL_PYTHON"
DEFAULT_TRL_PYTHON = "/tmp/trl_ppo_venv/bin/python"


# ---- workers (one per subprocess) ----------------------------------------------------------------
def base_variant(variant: str) -> str:
    """The variant without its precision suffix (``trl-bf16`` -> ``trl``)."""
    return variant.removesuffix(BF16)


def is_bf16(variant: str) -> bool:
    return variant.endswith(BF16)


def run_trl(workdir: Path, out: Path, steps: int, threads: int, bf16: bool) -> dict[str, Any]:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    tokenizer.padding_side = "left"  # TRL's PPO generates from left-padded prompts
    prompts = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    data = datasets.Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})

    def load(kind: Any, folder: str) -> Any:
        return kind.from_pretrained(workdir / folder, dtype=torch.float32, attn_implementation="sdpa")

    policy = load(AutoModelForCausalLM, "model")
    reward_model = load(AutoModelForSequenceClassification, "reward")
    value_model = load(AutoModelForSequenceClassification, "reward")  # align: critic.init reward
    args = PPOConfig(
        output_dir=str(out),
        seed=SEED,
        per_device_train_batch_size=PROMPTS_PER_STEP,  # prompts per update (one completion each)
        gradient_accumulation_steps=1,
        num_mini_batches=PROMPTS_PER_STEP // MINIBATCH,
        num_ppo_epochs=EPOCHS,
        total_episodes=PROMPTS_PER_STEP * steps,
        local_rollout_forward_batch_size=PROMPTS_PER_STEP,
        response_length=NEW_TOKENS,
        stop_token=None,  # no stop token: every completion has NEW_TOKENS tokens
        temperature=1.0,
        missing_eos_penalty=None,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        cliprange=CLIP,
        cliprange_value=VALUE_CLIP,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        bf16=bf16,  # TRL's default (True); float32 weights (loaded so above), bfloat16 autocast
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        num_sample_generations=0,
        dataloader_num_workers=0,
    )
    callback, timer = trl_step_timer(log_key="objective/scores")
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # TRL copies the policy
        reward_model=reward_model,
        train_dataset=data,
        value_model=value_model,
        eval_dataset=data,  # unused (num_sample_generations=0); its dataloader is built anyway
        callbacks=[callback],
    )
    trainer.train()
    return {
        "step_s": timer.step_s(),
        "score_mean": [row["objective/scores"] for row in timer.rows],
        "setup_s": timer.marks[0] - STARTED,
        "versions": {"trl": trl.__version__, "torch": torch.__version__},
    }


STARTED = time.perf_counter()


def worker(args: argparse.Namespace) -> None:
    if base_variant(args.worker) == "trl" and Path(sys.executable) != Path(args.trl_python):
        # TRL's PPO lives in another venv: the same worker, in that interpreter
        os.execv(args.trl_python, [args.trl_python, *sys.argv])
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        bf16 = is_bf16(args.worker)
        if base_variant(args.worker) == "trl":
            result = run_trl(Path(args.workdir), Path(tmp), args.total_steps, args.threads, bf16)
        else:
            from ppo_time_split import run_align

            name = base_variant(args.worker)
            variant, overrides = ALIGN_VARIANTS[name], ALIGN_OVERRIDES.get(name)
            precision = "bf16_mixed" if bf16 else "fp32"
            result = run_align(
                variant, Path(args.workdir), Path(tmp), args.total_steps, args.threads, precision, overrides
            )
            result["score_mean"] = [row["score_mean"] for row in result.pop("rollout")]
    write_worker_result(result, Path(args.out), STARTED)


# ---- the matmul bound ----------------------------------------------------------------------------
def step_gflop(workdir: Path) -> dict[str, float]:
    """The matrix-multiply GFLOP one PPO iteration of this workload cannot do without, per phase
    (2 x weights per token forward, 3x that forward + backward; attention, a few hundred MFLOP at
    ~38 tokens, and the one-row value heads are left out). The LM head counts only where a
    log-prob or a sample is read (the completion tokens); the reward model and the value model
    are the decoder without it. ``actor log-probs`` is the scoring pass align runs and TRL does
    not (TRL reuses the generation's logits)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    prompts = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    prompt_tokens = statistics.mean(len(tokenizer(p)["input_ids"]) for p in prompts)
    dims = SHAPES["bench"]
    head = dims["hidden"] * dims["vocab"]
    decoder = weight_parameters(dims) - head
    tokens = PROMPTS_PER_STEP * (prompt_tokens + NEW_TOKENS)
    completions = PROMPTS_PER_STEP * NEW_TOKENS
    policy_pass = 2 * (decoder * tokens + head * completions) / 1e9
    scorer_pass = 2 * decoder * tokens / 1e9
    return {
        "generate": policy_pass,
        "reference log-probs": policy_pass,
        "reward": scorer_pass,
        "critic values": scorer_pass,
        "policy train": 3 * EPOCHS * policy_pass,
        "critic train": 3 * EPOCHS * scorer_pass,
        "actor log-probs": policy_pass,
    }


def print_bound(workdir: Path, threads: int, trl_step_s: float | None, peak: float | None) -> None:
    """The step time of this workload at the machine's square-matmul peak (measured here unless
    given), for TRL's work and for align's (with its scoring pass), and the most align could be
    faster than TRL's measured step."""
    from dpo_vs_trl import measure_matmul_peak

    gflop = step_gflop(workdir)
    peak = peak or measure_matmul_peak(threads)["fp32"]
    trl_work = sum(v for k, v in gflop.items() if k != "actor log-probs")
    align_work = sum(gflop.values())
    print(", ".join(f"{k} {v:.1f}" for k, v in gflop.items()) + " GFLOP")
    print(
        f"fp32 matmul peak {peak:.0f} GFLOP/s ({threads} threads): TRL's work {trl_work:.0f} GFLOP = "
        f"{trl_work / peak:.2f} s, align's {align_work:.0f} GFLOP = {align_work / peak:.2f} s"
    )
    if trl_step_s:
        print(
            f"TRL's step {trl_step_s:.2f} s: at most {trl_step_s / (trl_work / peak):.2f}x faster doing "
            f"TRL's work at the peak; the 2x target needs {trl_step_s / 2:.2f} s"
        )


# ---- the driver ----------------------------------------------------------------------------------
def launch(variant: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    os.environ[TRL_PYTHON_ENV] = args.trl_python
    found, stderr = run_worker(__file__, variant, workdir, args.warmup + args.steps, args.threads)
    if found is None:
        return {"failed": stderr}
    found["step_s"] = found["step_s"][args.warmup :]
    return found


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for run in runs for s in run["step_s"]]
    return {
        "median_step_s": statistics.median(steps),
        "step_s_min": min(steps),
        "step_s_max": max(steps),
        "steps": len(steps),
        "setup_s": statistics.median(run["setup_s"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "load_average": [run["load_average"] for run in runs],
    }


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | median step s (min-max) | steps | setup s | peak RSS MiB "
        "| load (1 min) around its runs |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        loads = ", ".join(f"{r['before'][0]:.1f}->{r['after'][0]:.1f}" for r in s["load_average"])
        lines.append(
            f"| {name} | {s['median_step_s']:.2f} ({s['step_s_min']:.2f}-{s['step_s_max']:.2f}) "
            f"| {s['steps']} | {s['setup_s']:.1f} | {s['peak_rss_mb']:,.0f} | {loads} |"
        )
    return "\n".join(lines)


def ratios(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Every align variant over every TRL variant (equal precision and TRL's default bf16 both)."""
    trls = {name: s for name, s in summary.items() if base_variant(name) == "trl"}
    return [
        f"{name} / {trl_name}: step {trl['median_step_s'] / s['median_step_s']:.2f}x faster, "
        f"{s['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x peak RSS"
        for name, s in summary.items()
        if name not in trls
        for trl_name, trl in trls.items()
    ]


def save_record(path: Path, args: argparse.Namespace, runs: dict[str, Any], failures: dict[str, str]) -> None:
    record = {
        "args": vars(args),
        "runs": runs,
        "summary": {v: summarize(r) for v, r in runs.items() if r},
        "failures": failures,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, DEFAULTS)
    parser.add_argument(
        "--variants", help=f"comma-separated, of {', '.join(VARIANTS)} ({DEFAULTS['variants']})"
    )
    parser.add_argument(
        "--trl-python",
        default=os.environ.get(TRL_PYTHON_ENV, DEFAULT_TRL_PYTHON),
        help="the python of a venv with trl 1.12.0 (default %(default)s)",
    )
    parser.add_argument("--workdir", help="where the models are written (default: a temp folder)")
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument(
        "--bound",
        type=float,
        nargs="?",
        const=0.0,
        metavar="TRL_STEP_S",
        help="only print the step's matmul GFLOP, its time at this machine's fp32 matmul peak, and "
        "(given TRL's measured step seconds) the most align could be faster",
    )
    parser.add_argument(
        "--peak", type=float, help="with --bound: the fp32 matmul GFLOP/s to use instead of measuring"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.bound is not None:
        with workload_dir(args.workdir) as workdir:
            prepare(workdir)
            print_bound(workdir, args.threads, args.bound or None, args.peak)
        return
    apply_defaults(args, DEFAULTS)
    variants = parse_variants(args.variants)
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    failures: dict[str, str] = {}
    with workload_dir(args.workdir) as workdir:
        prepare(workdir)
        for repeat, variant in alternating(variants, args.repeats):
            if variant in failures:
                continue
            started, load = time.perf_counter(), os.getloadavg()
            result = launch(variant, args, workdir)
            took = time.perf_counter() - started
            if "failed" in result:
                failures[variant] = result["failed"][-3000:]
                print(f"{variant} failed after {took:.0f}s:\n{result['failed'][-2500:]}", flush=True)
                continue
            result["load_average"] = {"before": list(load), "after": list(os.getloadavg())}
            runs[variant].append(result)
            print(
                run_line(repeat, args.repeats, variant, took, result["step_s"])
                + f", peak RSS {result['peak_rss_mb']:,.0f} MiB (load {fmt_load(load)} -> "
                f"{fmt_load(os.getloadavg())})",
                flush=True,
            )
            if args.json:
                save_record(Path(args.json), args, runs, failures)
    summary = {v: summarize(r) for v, r in runs.items() if r}
    print(
        f"\n{args.steps} timed steps (+{args.warmup} warm-up) x {args.repeats} repeats, "
        f"{args.threads} threads; "
        f"load average (1/5/15 min) {fmt_load(load_before)} before, {fmt_load(os.getloadavg())} after\n"
    )
    print(table(summary) + "\n")
    print("\n".join(ratios(summary)))
    if args.json:
        save_record(Path(args.json), args, runs, failures)


if __name__ == "__main__":
    main()
