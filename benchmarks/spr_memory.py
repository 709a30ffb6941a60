"""Peak memory (RSS) of one SPR iteration against SFT, DPO with a live reference, and PPO, on the
same 28.8M Llama (``bench_model.py``) with a reward model of the same size.

Every variant does 2 optimizer steps of 8 sequences of the same shape (the prompt's last 64
tokens at most, then a completion of up to 64 tokens: the data's for SFT/DPO, 64 sampled ones for
the online methods), fp32, in a fresh process whose ``ru_maxrss`` is the figure (Python with
torch loaded, the models, gradients, optimizer state, activations, the engine, the data). Peak
memory is reached at the first optimizer step (AdamW allocates its state there), so 2 steps
measure what 200 would:

- ``sft``: 2 steps of 8 sequences (one model + AdamW state).
- ``dpo-live``: 2 steps of 4 pairs, the frozen reference kept in memory (``reference.mode: live``).
- ``spr``: one iteration: 4 prompts x 4 samples by the hf engine (freed after generating), scored
  by the reward model (built for scoring, then freed), 2 weighted-SFT steps (``offload: true``).
- ``spr-keep``: the same with ``offload: false`` (engine and reward model kept all along).
- ``ppo``: one iteration: 16 prompts x 1 sample, the reward model, a local critic (a second
  trainable model with its own AdamW state), a reference for the KL penalty (coef 0.05), 2 steps.
- ``python+torch``: the process with align, torch and transformers imported, nothing built.

    python benchmarks/spr_memory.py                      # every variant, 2 threads
    python benchmarks/spr_memory.py --variants sft,spr --repeats 2

Prints a markdown table and writes benchmarks/results/spr_memory_<threads>cores.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from bench_model import peak_rss_mb, run_worker
from dpo_vs_trl import SEED, prepare

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("python+torch", "sft", "dpo-live", "spr", "spr-keep", "ppo")
MAX_LENGTH = 128  # prompt (its last 64 tokens at most) + completion
MAX_PROMPT = 64
QUIET = {"tensorboard": False, "progress": False, "log_every": 1, "lr_scheduler": "constant"}


def prepare_all(workdir: Path) -> None:
    """The model, tokenizer and pairs of dpo_vs_trl; SFT rows and prompts from the same pairs;
    a one-head reward model of the policy's size (random head: its scores are noise, its memory
    is what is measured)."""
    prepare(workdir)
    if (workdir / "reward" / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    pairs = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    with open(workdir / "sft.jsonl", "w") as sft, open(workdir / "prompts.jsonl", "w") as prompts:
        for pair in pairs:
            sft.write(json.dumps({"prompt": pair["prompt"], "completion": pair["chosen"]}) + "\n")
            prompts.write(json.dumps({"prompt": pair["prompt"]}) + "\n")
    config = AutoConfig.from_pretrained(workdir / "model")
    config.num_labels = 1
    torch.manual_seed(SEED)
    LlamaForSequenceClassification(config).save_pretrained(workdir / "reward")
    AutoTokenizer.from_pretrained(workdir / "model").save_pretrained(workdir / "reward")


def run_config(variant: str, workdir: Path, out: Path, threads: int) -> dict[str, Any]:
    trainer = {**QUIET, "num_threads": threads, "batch_size": 8, "max_steps": 2}
    base: dict[str, Any] = {
        "output_dir": str(out),
        "seed": SEED,
        "model": {"path": str(workdir / "model")},
        "optim": {"lr": 1e-5},
        "trainer": trainer,
    }
    online = {
        "data": {
            "format": "prompts",
            "train": str(workdir / "prompts.jsonl"),
            "max_length": MAX_LENGTH,
            "max_prompt_length": MAX_PROMPT,
        },
        "rollout": {"name": "hf"},
        "reward": {"name": "model", "path": str(workdir / "reward"), "batch_size": 8},
        "iterations": 1,
    }
    sampling = {"temperature": 1.0, "max_tokens": MAX_LENGTH - MAX_PROMPT, "ignore_eos": True}
    if variant == "sft":
        return base | {
            "algo": "sft",
            "data": {
                "format": "sft",
                "train": str(workdir / "sft.jsonl"),
                "max_length": MAX_LENGTH,
                "max_prompt_length": MAX_PROMPT,
            },
        }
    if variant == "dpo-live":
        return base | {
            "algo": "dpo",
            "data": {
                "format": "preference",
                "train": str(workdir / "pairs.jsonl"),
                "max_length": MAX_LENGTH,
                "max_prompt_length": MAX_PROMPT,
            },
            "loss": {"name": "dpo", "beta": 0.1},
            "reference": {"mode": "live"},
            "trainer": trainer | {"batch_size": 4},
        }
    if variant in ("spr", "spr-keep"):
        return (
            base
            | online
            | {
                "algo": "spr",
                "prompts_per_iteration": 4,
                "sampling": sampling | {"n": 4},
                "offload": variant == "spr",
            }
        )
    if variant == "ppo":
        return (
            base
            | online
            | {
                "algo": "ppo",
                "prompts_per_iteration": 16,
                "sampling": sampling | {"n": 1},
                "kl": {"coef": 0.05},
            }
        )
    raise SystemExit(f"unknown variant {variant}")


def worker(variant: str, workdir: Path, out: Path, threads: int) -> None:
    import align.cli

    result: dict[str, Any] = {"variant": variant}
    if variant != "python+torch":
        with tempfile.TemporaryDirectory(prefix="spr-mem-") as tmp:
            config = run_config(variant, workdir, Path(tmp) / "run", threads)
            path = Path(tmp) / "run.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            code = align.cli.main(["run", str(path)])
            if code != 0:
                raise SystemExit(f"{variant}: align run exited with {code}")
            rows = [
                json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
            ]
            result["steps"] = max((row["step"] for row in rows if row.get("split") == "train"), default=0)
    result["peak_rss_mb"] = peak_rss_mb(include_children=False)
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--total-steps", type=int, default=4)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.workdir, args.out, args.threads)
        return
    workdir = Path(tempfile.gettempdir()) / "align-spr-memory"
    workdir.mkdir(exist_ok=True)
    prepare_all(workdir)
    peaks: dict[str, list[float]] = {}
    steps: dict[str, int] = {}
    for _ in range(args.repeats):
        for variant in args.variants.split(","):
            result, err = run_worker(__file__, variant, workdir, 4, args.threads)
            if result is None:
                print(f"{variant} failed:\n{err}", file=sys.stderr)
                continue
            peaks.setdefault(variant, []).append(result["peak_rss_mb"])
            steps[variant] = int(result.get("steps", 0))
            print(f"{variant}: {result['peak_rss_mb']:,.0f} MiB", file=sys.stderr, flush=True)
    sft = max(peaks["sft"]) if "sft" in peaks else None
    lines = ["| variant | optimizer steps | peak RSS MiB | / SFT |", "|---|---|---|---|"]
    for variant, values in peaks.items():
        ratio = f"{max(values) / sft:.2f}x" if sft else "-"
        lines.append(f"| {variant} | {steps[variant]} | {max(values):,.0f} | {ratio} |")
    print("\n".join(lines))
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / f"spr_memory_{args.threads}cores.json").write_text(
        json.dumps({"peak_rss_mb": peaks, "steps": steps, "threads": args.threads}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
