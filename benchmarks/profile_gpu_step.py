"""Where a DPO policy step's time goes on a GPU, fp32 against bf16 autocast: the workload of
``dpo_vs_trl.py`` (8 pairs, the ~134M Llama by default), align's hf backend on the GPU.

    python benchmarks/profile_gpu_step.py --shape llama-134m

For each precision: the median wall time of a step (log-probs of the batch, a DPO-like loss
against zero reference sums, backward, AdamW; synchronized), then a torch.profiler table of one
step: the ops with the most GPU time, and the total GPU kernel time against the step's wall
time (far below it: the step waits on the CPU launching kernels, not on the GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from dpo_vs_trl import BATCH_PAIRS, MAX_LENGTH, model_dir_of, prepare

import align
from align.builtin.data import PreferenceData, PreferenceFormat
from align_hf.backend import HFBackend


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama-134m")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--workdir")
    parser.add_argument(
        "--vary", action="store_true", help="a different batch (the next 8 pairs) every step, as in training"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        prepare(workdir, args.shape)
        model_dir = model_dir_of(workdir, args.shape)
        run = align.validate_run_config(
            {
                "algo": "dpo",
                "model": {"path": str(model_dir)},
                "backend": {"name": "hf", "device": "cuda"},
                "data": {"format": "preference", "train": str(workdir / "pairs.jsonl")},
            },
            align.default_plugins().registry,
        )
        backend = HFBackend(run)
        data = PreferenceFormat(
            PreferenceData(train=str(workdir / "pairs.jsonl"), max_length=MAX_LENGTH), backend.tokenizer
        )
        rows = data.load("train")
        count = len(rows) // BATCH_PAIRS if args.vary else 1
        batches = [
            data.collate([rows[i] for i in range(k * BATCH_PAIRS, (k + 1) * BATCH_PAIRS)])
            for k in range(count)
        ]
        for precision in ("fp32", "bf16_mixed"):
            profile(backend, batches, precision, args.reps)


def profile(backend: HFBackend, batches: list[align.PairedTokens], precision: str, reps: int) -> None:
    model = backend.build_policy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    done = [0]

    def step() -> None:
        batch = batches[done[0] % len(batches)]
        done[0] += 1
        with align.precision_scope(precision, model):
            chosen, rejected = backend.sequence_logps(model, batch.tokens).split(batch.num_pairs)
            loss = -F.logsigmoid(0.1 * (chosen.sum - rejected.sum)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    times = []
    for rep in range(reps + 2):
        started = time.perf_counter()
        step()
        if rep >= 2:
            times.append(time.perf_counter() - started)
    wall = statistics.median(times)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        step()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e6
    print(
        f"\n== {precision}: step {wall * 1e3:.1f} ms wall (median of {reps}), "
        f"{len(batches)} batch(es) in turn, the first {batches[0].num_tokens} real tokens; "
        f"GPU kernels {gpu_total * 1e3:.1f} ms in the profiled step; {len(prof.events())} profiler events"
    )
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))
    optimizer.state.clear()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
