"""Time of a DPO step's model work at pipeline parallelism 2 (2 processes, gloo, one thread each)
with 1 pipeline micro-batch (the stages take turns) against m micro-batches (GPipe: the stages
overlap), on the same model and batch.

The work timed is what a DPO step asks of the backend: the reference's log-probs of the chosen
and rejected rows (no grad), the policy's (with grad), and the backward of a loss on both; the
optimizer step is left out (the same at any m). Every variant runs on the same two processes,
interleaved (1, 4, 2, 1, 4, 2, ...), so a change in the machine's load hits them alike; the
fastest and the median repeat are reported with the load average. The ideal GPipe speed-up on
2 stages is 2m / (m + 1) (1.6x at m = 4) when the stages cost the same and messages are free.

    python benchmarks/megatron_pipeline.py [--hidden 256 --layers 4 --rows 16 --length 256 \
        --micro-batches 1,2,4 --repeats 8 --out benchmarks/results/megatron_pipeline_2cores.json]

It starts ``torchrun --nproc_per_node 2`` itself; rank 0 prints the JSON report (and writes it
to ``--out``).
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
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from megatron_vs_hf import token_batch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="split evenly over the 2 stages")
    parser.add_argument("--rows", type=int, default=16, help="chosen + rejected rows of one call")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--micro-batches", default="1,2,4", help="micro-batch counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", default=None, help="also write the report here (JSON)")
    return parser.parse_args()


def run_config(folder: Path, args: argparse.Namespace) -> Any:
    from align.cli import load_config
    from align.plugins import default_plugins

    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    config = {
        "algo": "dpo",
        "output_dir": str(folder / "run"),
        "model": {
            "path": "tiny",
            "tiny": {
                "hidden_size": args.hidden,
                "num_layers": args.layers,
                "num_heads": max(2, args.hidden // 64),
                "intermediate_size": args.hidden * 11 // 4,
            },
        },
        "backend": {"name": "megatron", "pipeline_model_parallel_size": 2},
        "trainer": {"num_threads": 1},
        "data": {"format": "preference", "train": str(data / "preference_train.jsonl")},
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    plugins = default_plugins()
    return load_config(str(path), [], None, plugins), plugins


def dpo_model_work(backend: Any, policy: Any, reference: Any, batch: Any) -> float:
    """The reference's and the policy's log-probs and the backward; their summed log-probs."""
    with torch.no_grad():
        reference_sums = backend.sequence_logps(reference, batch).sum
    policy_sums = backend.sequence_logps(policy, batch).sum
    (policy_sums - reference_sums).sum().backward()
    policy.zero_grad(set_to_none=True)
    return float(policy_sums.detach().sum())


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from align.backends import build_backend

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    variants = [int(m) for m in args.micro_batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        cfg, plugins = run_config(Path(tmp), args)
        backend: Any = build_backend(cfg, plugins)  # a MegatronBackend (its cfg is set below)
        policy, reference = backend.build_policy(), backend.build_reference()
        batch = token_batch(args.rows, args.length, len(backend.tokenizer))
        seconds: dict[int, list[float]] = {m: [] for m in variants}
        cpu: dict[int, list[float]] = {m: [] for m in variants}  # this process's CPU seconds
        sums: dict[int, float] = {}
        load_before = os.getloadavg()
        for repeat in range(args.repeats + 1):  # the first round warms up
            for m in variants:
                backend.cfg.pipeline_micro_batches = m
                dist.barrier()
                started, cpu_started = time.perf_counter(), time.process_time()
                sums[m] = dpo_model_work(backend, policy, reference, batch)
                cpu_used = time.process_time() - cpu_started
                dist.barrier()
                if repeat:
                    seconds[m].append(time.perf_counter() - started)
                    cpu[m].append(cpu_used)
        load_after = os.getloadavg()
        cpu_by_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(cpu_by_rank, cpu)
    if dist.get_rank() != 0:
        return
    tokens = int(batch.attention_mask.sum())
    base = min(seconds[variants[0]])
    report = {
        "model": f"tiny Llama hidden {args.hidden}, {args.layers} layers ({args.layers // 2} per stage)",
        "batch": f"{args.rows} rows x {args.length} slots, {tokens} real tokens",
        "processes": "2 (PP=2, gloo), 1 thread each",
        "repeats": args.repeats,
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in load_after],
        "policy_logp_sum": sums,
        "variants": {
            f"m={m}": {
                "best_s": round(min(times), 4),
                "median_s": round(statistics.median(times), 4),
                "speedup_vs_first_best": round(base / min(times), 3),
                "speedup_vs_first_median": round(
                    statistics.median(seconds[variants[0]]) / statistics.median(times), 3
                ),
                "ideal_speedup_vs_m1": round(2 * m / (m + 1), 3),
                # Less load-dependent: the work itself (smaller pieces cost more per row, and
                # each piece is a message). Without other load, the wall time is at least the
                # larger of the two.
                "median_cpu_s_per_stage": [round(statistics.median(c[m]), 4) for c in cpu_by_rank],
            }
            for m, times in seconds.items()
        },
        "command": "python benchmarks/megatron_pipeline.py " + " ".join(sys.argv[1:]),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def main() -> None:
    args = parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*launch, __file__, *sys.argv[1:]], check=False)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
