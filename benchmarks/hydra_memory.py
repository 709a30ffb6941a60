"""Hydra heads against a full second model and against LoRA: peak memory (RSS) and step time.

DPO with a live reference (``reference.mode: live``: a reference in memory all through
training) on the 28.8M Llama of ``bench_model.py`` (6 layers), the synthetic pairs of
``dpo_vs_trl.py`` (~260 tokens per sequence), sigmoid DPO, beta 0.1, AdamW, fp32:

- ``dpo-full``: every weight trains; the reference is a frozen copy of the whole model.
- ``dpo-lora``: LoRA r 16, alpha 32, dropout 0, every linear layer but the head (align-lora);
  the reference is the policy with its adapters off (no copy).
- ``dpo-hydra2``: ``backend.num_layers_unfrozen: 2``: the top 2 blocks, final norm and LM head
  train; the reference is the policy's own trunk plus a frozen copy of those.

PPO, one iteration (``spr_memory.py``'s, smaller: 8 prompts x 1 sample of 64 tokens by the hf
engine, a reward model of the same size, a KL reference, the local critic, one epoch: 2 steps of
4 samples):

- ``ppo-full``: a reference copy and a critic that is a second full model (with AdamW state).
- ``ppo-hydra2``: the hydra reference and a critic branching from the shared trunk (its own 2
  blocks, norm and value head).

Each run is a fresh process (``ru_maxrss`` is the peak: Python with torch, the models, gradients,
optimizer state, activations, the data); variants alternate, repeat after repeat, and the load
average before each run is recorded with it.

    python benchmarks/hydra_memory.py                          # every variant once
    python benchmarks/hydra_memory.py --repeats 3 --variants dpo-full,dpo-lora,dpo-hydra2

Prints a markdown table and writes benchmarks/results/hydra_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_model import align_step_timer, peak_rss_mb, run_worker
from dpo_vs_trl import BETA, MAX_LENGTH, SEED
from lora_memory import LORA, PAIRS_ENV, pairs_file
from spr_memory import prepare_all
from spr_memory import run_config as spr_run_config

REPO = Path(__file__).resolve().parents[1]
HYDRA_K = 2
VARIANTS = ("dpo-full", "dpo-lora", "dpo-hydra2", "ppo-full", "ppo-hydra2")
LORA_NO_DROPOUT = LORA | {"dropout": 0.0}  # the adapters' dropped-out input copies would blur the comparison


def dpo_config(variant: str, workdir: Path, out: Path, steps: int, threads: int) -> dict[str, Any]:
    model: dict[str, Any] = {"path": str(workdir / "model")}
    backend: dict[str, Any] = {"name": "hf", "attn_implementation": "sdpa"}
    if variant == "dpo-lora":
        model["lora"] = LORA_NO_DROPOUT
    if variant == "dpo-hydra2":
        backend["num_layers_unfrozen"] = HYDRA_K
    return {
        "algo": "dpo",
        "output_dir": str(out),
        "seed": SEED,
        "model": model,
        "backend": backend,
        "data": {"format": "preference", "train": str(pairs_file(workdir, steps)), "max_length": MAX_LENGTH},
        "loss": {"name": "dpo", "beta": BETA},
        "reference": {"mode": "live"},
        "trainer": {
            "max_steps": steps,
            "batch_size": int(os.environ[PAIRS_ENV]),
            "lr_scheduler": "constant",
            "num_threads": threads,
            "tensorboard": False,
            "progress": False,
        },
        "optim": {"name": "adamw", "lr": 1e-5},
    }


def ppo_config(variant: str, workdir: Path, out: Path, threads: int) -> dict[str, Any]:
    config = spr_run_config("ppo", workdir, out, threads)
    # Fewer samples and one epoch than spr_memory's (2 steps of 4 either way): on a loaded machine
    # generation took minutes; the peak is reached at the first optimizer step.
    config |= {"prompts_per_iteration": 8, "epochs": 1}
    config["trainer"] = config["trainer"] | {"batch_size": 4}
    if variant == "ppo-hydra2":
        config["backend"] = {"name": "hf", "num_layers_unfrozen": HYDRA_K}
    return config


def worker(variant: str, workdir: Path, out: Path, steps: int, threads: int) -> None:
    import align

    timer = align_step_timer("train")
    with tempfile.TemporaryDirectory(prefix="hydra-mem-") as tmp:
        run = Path(tmp) / "run"
        if variant.startswith("dpo"):
            config = dpo_config(variant, workdir, run, steps, threads)
        else:
            config = ppo_config(variant, workdir, run, threads)
        plugins = align.default_plugins()
        cfg = align.validate_run_config(config, plugins.registry, config["algo"])
        plugins.manager.register(timer)
        align.train(cfg, plugins)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result: dict[str, Any] = {
        "variant": variant,
        "step_s": timer.step_s(),
        "peak_rss_mb": peak_rss_mb(include_children=False),
    }
    rollout = [row for row in rows if row.get("split") == "rollout"]
    if rollout:  # PPO: the iteration's phases
        keep = ("generate_s", "reference_logps_s", "policy_logps_s", "train_s")
        result["phases"] = {key: rollout[0][key] for key in keep if key in rollout[0]}
    out.write_text(json.dumps(result))


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f}"


def summary_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown: each variant's peak RSS and step time over its runs (PPO: a training step after
    the rollout, and the iteration's reference scoring and training phases)."""
    lines = [
        "| variant | peak RSS MiB (median, min-max) | step s (median) | PPO reference / train s "
        "| load before |",
        "|---|---|---|---|---|",
    ]
    for variant, done in runs.items():
        peaks = [r["peak_rss_mb"] for r in done]
        steps = [statistics.median(r["step_s"]) for r in done if r["step_s"]]
        phases = [r["phases"] for r in done if r.get("phases")]
        ppo = "-"
        if phases:
            reference = statistics.median(p.get("reference_logps_s", 0.0) for p in phases)
            ppo = f"{reference:.1f} / {statistics.median(p.get('train_s', 0.0) for p in phases):.1f}"
        step = f"{statistics.median(steps):.2f}" if steps else "-"
        lines.append(
            f"| {variant} | {statistics.median(peaks):,.0f} ({min(peaks):,.0f}-{max(peaks):,.0f}) | "
            f"{step} | {ppo} | {', '.join(r['load_before'] for r in done)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="DPO: timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="DPO: untimed first steps")
    parser.add_argument("--pairs-per-step", type=int, default=2)
    parser.add_argument("--worker")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--total-steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "hydra_memory.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.workdir, args.out, args.total_steps, args.threads)
        return
    workdir = Path(tempfile.gettempdir()) / "align-hydra-memory"  # spr_memory's model, pairs, reward model
    workdir.mkdir(exist_ok=True)
    prepare_all(workdir)
    os.environ[PAIRS_ENV] = str(args.pairs_per_step)  # the workers inherit it
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for variant in args.variants.split(","):
            load = load_average()
            result, err = run_worker(__file__, variant, workdir, args.warmup + args.steps, args.threads)
            if result is None:
                print(f"{variant} failed:\n{err}", file=sys.stderr)
                continue
            result["load_before"] = load
            # DPO: the warm-up steps; PPO: the first interval, which holds the rollout phases.
            result["step_s"] = result["step_s"][args.warmup if variant.startswith("dpo") else 1 :]
            runs.setdefault(variant, []).append(result)
            print(
                f"[{repeat + 1}/{args.repeats}] {variant}: {result['peak_rss_mb']:,.0f} MiB, "
                f"steps {[round(s, 2) for s in result['step_s']]} s, load {load}",
                file=sys.stderr,
                flush=True,
            )
    print("\n".join(summary_table(runs)))
    args.json.parent.mkdir(exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "workdir", "out", "json")}
    args.json.write_text(json.dumps({"runs": runs, "args": settings}, indent=1) + "\n")


if __name__ == "__main__":
    main()
