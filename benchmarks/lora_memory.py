"""DPO with and without LoRA: peak memory (RSS) and training speed, align and TRL.

The workload of ``dpo_vs_trl.py`` (the 28.8M Llama of ``bench_model.py``, its synthetic pairs of
~260 tokens per sequence, 8 pairs per step, sigmoid DPO, beta 0.1, fp32, N CPU threads), trained
in full or with LoRA adapters (r 16, alpha 32, dropout 0.05, every linear layer but the LM head:
TRL's and PEFT's usual settings) on both sides. Each run is a fresh subprocess; the variants
alternate, repeat after repeat, so a change in the machine's load hits them alike. The training
file holds only the pairs the steps take (the first ``8 x (warmup + steps)`` of the 256), so
align's precompute scores those alone and a run stays short on a loaded machine.

    python benchmarks/lora_memory.py                 # 6 variants x 1 repeat, 1 warm-up + 4 timed steps
    python benchmarks/lora_memory.py --repeats 3     # medians of 3
    python benchmarks/lora_memory.py --pairs-per-step 1   # small activations: the state memory shows

Variants: ``align-full`` (the reference precomputed and freed: one model), ``align-full-live``
(a frozen reference copy kept: two models), ``align-lora`` and ``align-lora-live`` (the reference
is the policy with adapters off in both: one model either way), ``trl-full`` (TRL's default: a
reference copy kept) and ``trl-lora`` (``DPOTrainer(peft_config=...)``: TRL also scores the
reference with adapters disabled); ``-nodrop`` variants of the LoRA ones use adapter dropout 0
(with dropout, each adapted layer keeps a dropped-out copy of its input for the backward pass).
Peak RSS is the worker's ``ru_maxrss``: the Python process
with torch loaded, the model, gradients, optimizer state, activations, and the data.
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

from bench_model import align_step_timer, align_trained_tokens, count_trl_tokens, run_worker, trl_step_timer
from dpo_vs_trl import BATCH_PAIRS, BETA, MAX_LENGTH, SEED, _result, expected_ids, prepare

LR = 1e-5
PAIRS_ENV = "ALIGN_LORA_BENCH_PAIRS"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
NO_DROPOUT = LORA | {"dropout": 0.0}
# name -> (side, LoRA settings or None, live reference)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None, bool]] = {
    "align-full": ("align", None, False),
    "align-full-live": ("align", None, True),
    "align-lora": ("align", LORA, False),
    "align-lora-live": ("align", LORA, True),
    "trl-full": ("trl", None, True),
    "trl-lora": ("trl", LORA, True),
    # Adapter dropout makes a dropped-out copy of each adapted layer's input, kept for backward.
    "align-lora-nodrop": ("align", NO_DROPOUT, False),
    "trl-lora-nodrop": ("trl", NO_DROPOUT, True),
}
DEFAULT_VARIANTS = "align-full,align-full-live,align-lora,align-lora-live,trl-full,trl-lora"


def run_align(variant: str, workdir: Path, out: Path, steps: int, threads: int) -> dict[str, Any]:
    import align

    _, lora, live = VARIANTS[variant]
    model: dict[str, Any] = {"path": str(workdir / "model")}
    if lora:
        model["lora"] = lora
    config = {
        "algo": "dpo",
        "output_dir": str(out),
        "seed": SEED,
        "model": model,
        "backend": {"name": "hf", "attn_implementation": "sdpa"},
        "data": {"format": "preference", "train": str(pairs_file(workdir, steps)), "max_length": MAX_LENGTH},
        "loss": {"name": "dpo", "beta": BETA},
        "reference": {"mode": "live" if live else "precompute"},
        "trainer": {
            "max_steps": steps,
            "batch_size": pairs_per_step(),
            "max_grad_norm": 1.0,
            "lr_scheduler": "constant",
            "num_threads": threads,
            "tensorboard": False,
            "progress": False,
        },
        "optim": {"name": "adamw", "lr": LR},
    }
    timer = align_step_timer("train")
    plugins = align.default_plugins()
    cfg = align.validate_run_config(config, plugins.registry, "dpo")
    plugins.manager.register(timer)
    align.train(cfg, plugins)
    return _result(timer.marks, align_trained_tokens(timer.rows))


def run_trl(variant: str, workdir: Path, out: Path, steps: int, threads: int) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    _, lora, _ = VARIANTS[variant]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(
        workdir / "model", dtype=torch.float32, attn_implementation="sdpa"
    )
    data = datasets.load_dataset("json", data_files=str(pairs_file(workdir, steps)), split="train")
    peft_config = None
    if lora:
        peft_config = peft.LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        )
    args = trl.DPOConfig(
        output_dir=str(out),
        seed=SEED,
        per_device_train_batch_size=pairs_per_step(),
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )
    check_ids(trainer.train_dataset, workdir, steps)
    counted = count_trl_tokens(trainer)
    callback, timer = trl_step_timer(on_step=counted.end_step)
    trainer.add_callback(callback)
    trainer.train()
    result = _result(timer.marks, counted)
    result["reference_copy"] = trainer.ref_model is not None
    return result


def pairs_per_step() -> int:
    """8 (dpo_vs_trl's workload), or ``--pairs-per-step`` (passed to the workers through the
    environment): 1 pair makes activations small, so what the weights, gradients and optimizer
    state take shows in the peak."""
    return int(os.environ.get(PAIRS_ENV, BATCH_PAIRS))


def pairs_file(workdir: Path, steps: int) -> Path:
    """The first ``pairs_per_step() x steps`` pairs of the shared workload, as their own file."""
    path = workdir / f"pairs-{pairs_per_step() * steps}.jsonl"
    if not path.is_file():
        lines = (workdir / "pairs.jsonl").read_text().splitlines()[: pairs_per_step() * steps]
        path.write_text("".join(line + "\n" for line in lines))
    return path


def check_ids(rows: Any, workdir: Path, steps: int) -> None:
    """TRL tokenized the pairs to the generated ids (align's are checked by dpo_vs_trl.py)."""
    got = [[list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])] for r in rows]
    if got != expected_ids(workdir)[: pairs_per_step() * steps]:
        raise SystemExit("trl: the tokenized pairs differ from the generated ids")


STARTED = time.perf_counter()


def worker(args: argparse.Namespace) -> None:
    workdir, out = Path(args.workdir), Path(args.out)
    side = VARIANTS[args.worker][0]
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        run = run_trl if side == "trl" else run_align
        result = run(args.worker, workdir, Path(tmp), args.total_steps, args.threads)
    result["wall_s"] = time.perf_counter() - STARTED
    out.write_text(json.dumps(result))


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--total-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "align-dpo-bench"))
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs-per-step", type=int, default=BATCH_PAIRS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir)
    os.environ[PAIRS_ENV] = str(args.pairs_per_step)  # the workers inherit it
    names = args.variants.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    loads: list[str] = []
    for repeat in range(args.repeats):
        for name in names:
            loads.append(load_average())
            found, stderr = run_worker(__file__, name, workdir, args.warmup + args.steps, args.threads)
            if found is None:
                print(f"{name} failed:\n{stderr}", file=sys.stderr)
                continue
            timed = slice(args.warmup, None)
            found["step_s"], found["tokens"] = found["step_s"][timed], found["tokens"][timed]
            runs[name].append(found)
            tps = sum(found["tokens"]) / sum(found["step_s"])
            rss = found["peak_rss_mb"]
            print(f"[{repeat + 1}/{args.repeats}] {name}: {tps:,.0f} tok/s, peak RSS {rss:,.0f} MiB")
    print(f"\nload average (1/5/15 min) before each run: {', '.join(loads)}")
    print("| variant | tokens/s (median) | peak RSS MiB (max) | reference |")
    print("|---|---|---|---|")
    summary = {}
    for name, done in runs.items():
        if not done:
            print(f"| {name} | failed | - | - |")
            continue
        tps = statistics.median(sum(r["tokens"]) / sum(r["step_s"]) for r in done)
        rss = max(r["peak_rss_mb"] for r in done)
        _, lora, live = VARIANTS[name]
        reference = "adapters off" if lora else ("copy kept" if live else "precomputed, freed")
        summary[name] = {"tokens_per_s": tps, "peak_rss_mb": rss, "runs": done}
        print(f"| {name} | {tps:,.0f} | {rss:,.0f} | {reference} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"summary": summary, "loads": loads, "args": vars(args)}, indent=1)
        )


if __name__ == "__main__":
    main()
