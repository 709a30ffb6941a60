"""Where an align GRPO step's time goes, on the workload of ``grpo_vs_trl.py``.

    python benchmarks/profile_grpo_step.py                    # cProfile of the timed steps
    python benchmarks/profile_grpo_step.py --torch            # torch.profiler's operator table
    python benchmarks/profile_grpo_step.py --variant align-vllm-bf16 --steps 2

Runs ``grpo_vs_trl.align_config`` in this process: one untimed warm-up iteration (the engine
starts, the allocator warms up), then the profiler records ``--steps`` whole iterations
(generate, score, log-probs, train, refit, logging) and prints the functions (or operators)
that took the most time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from grpo_vs_trl import align_config, prepare


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="align-hf")
    parser.add_argument("--steps", type=int, default=2, help="profiled iterations after the warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch", action="store_true", help="torch.profiler instead of cProfile")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()

    import torch

    import align
    from align.loading import validate_run_config

    profiler: Any = (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        if args.torch
        else cProfile.Profile()
    )
    start, stop = (profiler.start, profiler.stop) if args.torch else (profiler.enable, profiler.disable)

    class Window:
        """Profiles from the end of the warm-up iteration to the end of the last one."""

        @align.hookimpl
        def on_step_end(self, run: Any, step: int, metrics: dict[str, Any]) -> None:
            if metrics.get("split") != "rollout":
                return
            if metrics["iteration"] == 1:
                start()
            elif metrics["iteration"] == 1 + args.steps:
                stop()

    with tempfile.TemporaryDirectory(prefix="profile-grpo-") as tmp:
        workdir = Path(tmp)
        prepare(workdir)
        config = align_config(args.variant, workdir, workdir / "run", 1 + args.steps, args.threads)
        plugins = align.default_plugins()
        cfg = validate_run_config(config, plugins.registry, "grpo")
        plugins.manager.register(Window())
        align.train(cfg, plugins)
    if args.torch:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    else:
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
