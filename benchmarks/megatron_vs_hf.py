"""Tokens/s of a DPO step's model work (log-probs of chosen + rejected, forward and backward) on
the megatron backend (TP=1, one process) against the hf backend, on the same model and batch.

Both backends build the same embedded tiny Llama (``--hidden``, ``--layers``); the timings are
interleaved (hf, megatron, hf, ...) so a change in the machine's load hits both alike, and the
fastest and the median repeat are reported. The machine is shared: read the minimum.

    python benchmarks/megatron_vs_hf.py [--hidden 256 --layers 4 --rows 16 --length 256 --repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml


def run_config(folder: Path, backend: str, hidden: int, layers: int) -> Any:
    from align.cli import load_config
    from align.plugins import default_plugins

    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    config = {
        "algo": "dpo",
        "output_dir": str(folder / backend),
        "model": {
            "path": "tiny",
            "tiny": {
                "hidden_size": hidden,
                "num_layers": layers,
                "num_heads": max(2, hidden // 64),
                "intermediate_size": hidden * 11 // 4,
            },
        },
        "backend": {"name": backend},
        "data": {"format": "preference", "train": str(data / "preference_train.jsonl")},
    }
    path = folder / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(config))
    plugins = default_plugins()
    return load_config(str(path), [], None, plugins), plugins


def token_batch(rows: int, length: int, vocab: int) -> Any:
    """Right-padded sequences of random lengths in [length/2, length]; the second half of each
    is scored (a completion)."""
    from align import TokenBatch

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    positions = torch.arange(length)[None, :]
    attention = positions < lengths[:, None]
    ids = torch.randint(3, vocab, (rows, length), generator=generator) * attention
    scored = attention & (positions >= lengths[:, None] // 2)
    sequence_ids = torch.where(attention, torch.arange(rows)[:, None], torch.full_like(ids, -1))
    return TokenBatch(ids, attention.long(), scored, sequence_ids, rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from align.backends import build_backend

    with tempfile.TemporaryDirectory() as tmp:
        backends, models = {}, {}
        for name in ("hf", "megatron"):
            cfg, plugins = run_config(Path(tmp), name, args.hidden, args.layers)
            backends[name] = build_backend(cfg, plugins)
            models[name] = backends[name].build_policy()
        batch = token_batch(args.rows, args.length, len(backends["hf"].tokenizer))
        seconds: dict[str, list[float]] = {"hf": [], "megatron": []}
        sums: dict[str, float] = {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name in seconds:
                started = time.perf_counter()
                logps = backends[name].sequence_logps(models[name], batch)
                logps.sum.sum().backward()
                seconds[name].append(time.perf_counter() - started)
                sums[name] = float(logps.sum.sum())
                models[name].zero_grad(set_to_none=True)
    tokens = int(batch.attention_mask.sum())
    report = {
        "model": f"tiny Llama hidden {args.hidden}, {args.layers} layers",
        "batch": f"{args.rows} rows x {args.length} slots, {tokens} real tokens",
        "threads": args.threads,
        "logp_sum": sums,
        **{
            name: {
                "best_tokens_per_s": round(tokens / min(times[1:])),
                "median_tokens_per_s": round(tokens / statistics.median(times[1:])),
            }
            for name, times in seconds.items()
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
