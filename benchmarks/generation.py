"""Generation speed: align's rollout engines against transformers ``generate``, and refit time.

All variants generate with the same 28.8M-parameter Llama (6 layers, hidden 512, 8 heads, vocab
8192, built in code with a fixed seed and saved once) from the same 32 prompts of 64 random
token ids, 64 sampled tokens each (temperature 1, no top-k / top-p, EOS ignored so every
completion has exactly 64 tokens), in fp32 and bf16, on N CPU threads. Each measurement is a
fresh subprocess: start, one warm-up call, one timed call; the variants alternate, repeat after
repeat, and the table shows medians.

    python benchmarks/generation.py                 # 3 repeats, fp32 and bf16 (~10 minutes, 2 cores)
    python benchmarks/generation.py --repeats 1 --dtypes float32

Variants:
- ``transformers``: ``model.generate`` on the model, as TRL runs it on CPU (the baseline);
- ``align-hf``: the ``hf`` engine (the same ``generate``, plus the raw log-probs of every
  sampled token);
- ``align-vllm``: the ``vllm`` engine (vLLM in the process, default compile mode).
Refit: seconds for an engine to take all 28.8M weights (``engine.refit``), median of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_model import save_bench_llama

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 32, 64, 64
VOCAB = 8192
VARIANTS = ("transformers", "align-hf", "align-vllm")


def build_model(workdir: Path) -> None:
    import torch

    save_bench_llama(workdir / "model", seed=0, vocab_size=VOCAB)
    prompts = torch.randint(3, VOCAB, (PROMPTS, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    (workdir / "prompts.json").write_text(json.dumps(prompts.tolist()))


# ---- workers (one per subprocess) ----------------------------------------------------------------


def run_transformers(model_dir: Path, prompts: list[list[int]], dtype: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts)

    def generate() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
        return time.perf_counter() - started

    generate()
    return {"generate_s": generate()}


def run_engine(name: str, model_dir: Path, prompts: list[list[int]], dtype: str) -> dict[str, Any]:
    import torch

    import align

    settings = {"vllm": {"kv_cache_gib": 1.0}}.get(name, {})
    entry = align.default_plugins().registry.get("rollout_engine", name)
    spec = align.EngineSpec(model_dir=model_dir, max_model_len=256, eos_token_id=2, pad_token_id=0)
    spec.dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    started = time.perf_counter()
    engine = entry.factory(entry.config.model_validate({"name": name, **settings}), spec)
    start_s = time.perf_counter() - started
    sampling = align.SamplingConfig(temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True, seed=0)

    def generate() -> float:
        started = time.perf_counter()
        out = engine.generate(prompts, sampling)
        elapsed = time.perf_counter() - started
        assert all(len(c.token_ids) == NEW_TOKENS for group in out for c in group)
        return elapsed

    generate()
    generate_s = generate()
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).state_dict()
    refits = []
    for _ in range(3):
        started = time.perf_counter()
        engine.refit(weights.items())
        refits.append(time.perf_counter() - started)
    engine.close()
    return {"generate_s": generate_s, "start_s": start_s, "refit_s": statistics.median(refits)}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    prompts = json.loads((workdir / "prompts.json").read_text())
    if args.worker == "transformers":
        result = run_transformers(workdir / "model", prompts, args.dtype)
    else:
        result = run_engine(args.worker.removeprefix("align-"), workdir / "model", prompts, args.dtype)
    result["tokens_per_s"] = PROMPTS * NEW_TOKENS / result["generate_s"]
    Path(args.out).write_text(json.dumps(result))


# ---- driver ----------------------------------------------------------------------------------------


def measure(variant: str, dtype: str, workdir: Path, threads: int) -> dict[str, Any]:
    out = workdir / f"{variant}-{dtype}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    command = [sys.executable, __file__, "--worker", variant, "--dtype", dtype]
    command += ["--workdir", str(workdir), "--out", str(out), "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{variant} {dtype} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(out.read_text()))


def table(results: dict[tuple[str, str], list[dict[str, Any]]], dtypes: list[str]) -> str:
    def median(variant: str, dtype: str, key: str) -> float | None:
        runs = results.get((variant, dtype), [])
        values = [run[key] for run in runs if key in run]
        return statistics.median(values) if values else None

    baseline = median("transformers", "float32", "tokens_per_s")
    lines = [
        "| variant | dtype | tokens/s | vs transformers fp32 | refit s | start s |",
        "|---|---|---|---|---|---|",
    ]
    for dtype in dtypes:
        for variant in VARIANTS:
            speed = median(variant, dtype, "tokens_per_s")
            if speed is None:
                continue
            refit, start = median(variant, dtype, "refit_s"), median(variant, dtype, "start_s")
            ratio = f"{speed / baseline:.2f}x" if baseline else "-"
            lines.append(
                f"| {variant} | {dtype} | {speed:,.0f} | {ratio} | "
                f"{'-' if refit is None else f'{refit:.3f}'} | {'-' if start is None else f'{start:.1f}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="Also write every run's numbers here.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    dtypes, variants = args.dtypes.split(","), args.variants.split(",")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_model(workdir)
        for repeat in range(args.repeats):
            for dtype in dtypes:
                for variant in variants:  # alternating, repeat after repeat
                    run = measure(variant, dtype, workdir, args.threads)
                    results.setdefault((variant, dtype), []).append(run)
                    print(
                        f"repeat {repeat + 1}: {variant} {dtype}: {run['tokens_per_s']:,.0f} tok/s",
                        flush=True,
                    )
    print(
        f"\n{PROMPTS} prompts x {PROMPT_TOKENS} tokens -> {NEW_TOKENS} sampled tokens, "
        f"{args.threads} threads, medians of {args.repeats}\n"
    )
    print(table(results, dtypes))
    if args.json:
        rows = [{"variant": v, "dtype": d, **run} for (v, d), runs in results.items() for run in runs]
        args.json.write_text(json.dumps({"threads": args.threads, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
