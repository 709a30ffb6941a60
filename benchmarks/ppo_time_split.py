"""Where a PPO step's time goes, with the critic in a PyTriton server answering futures
(asynchronous: its work overlaps the actor's) against the same server awaited at once
(synchronous) and against the in-process ``local`` critic.

The workload (shared with ppo_vs_trl.py): the 28.8M Llama of ``bench_model.py`` with a
character-level tokenizer (one character per token, also for the ids the untrained model samples,
so that the reward model scores the sampled tokens themselves), the arithmetic prompts
(examples/data/arith_prompts_train.jsonl), a reward model of the same size (a one-head
sequence classifier, random head, built in code with a fixed seed) that the critic is
initialised from (``critic.init: reward``), and per step (one PPO iteration): 32 prompts x 1
completion of exactly 32 sampled tokens (temperature 1, EOS ignored), a KL penalty to the
initial policy (coef 0.05, so a reference model), GAE (gamma 1, lambda 0.95), 2 PPO epochs of 2
minibatches of 16 (4 policy steps and 4 critic steps), AdamW lr 1e-6, fp32, N threads (the
critic server takes the run's ``trainer.num_threads`` too).

Variants, each run in a fresh process, alternating, repeat after repeat; the first step of each
run (engine and server start) is not timed:

- ``remote-async``: ``critic: {name: remote}`` as shipped: value requests go out before the
  actor's log-probs, training requests are not awaited (the actor waits only for the next
  values, and for the last training step at the end of the iteration).
- ``remote-sync``: the same server, every request awaited as soon as it is sent (a wrapper
  calls ``future.result()``): the same processes and wire, no overlap. This is the honest
  baseline for what the futures hide.
- ``local``: ``critic: {name: local}``: the critic computes and trains in the actor's thread
  (no server, no wire, no overlap).
- ``remote-async-reward-server``: ``remote-async`` with the reward model in a reward server too
  (``reward: {name: remote, serve: {name: model, ...}}``): its requests go out right after
  generation (``align.submit_reward``) and are awaited after the log-probs, so its time is
  hidden as well. The other variants score with the in-process ``model`` reward, which scores
  at once (nothing of it hidden).

Phases per step come from PPO's own ``split: rollout`` metrics (``generate_s``, ``score_s``,
``policy_logps_s``, ``reference_logps_s``, ``actor_train_s``, ``refit_s``, and the time the
actor spends on the critic: ``critic_values_send_s + critic_wait_s``,
``critic_train_send_s + critic_train_wait_s``; the reward's ``score_s`` is its own time,
request to answer, of which ``reward_hidden_s`` was hidden behind the log-probs); the critic's
own busy time (values, training) is measured at the client: a wrapper around ``align.Critic``
records when each request was made and when its future completed; requests are served one at a
time in order, so the busy time of a request is ``done - max(made, previous done)``. The critic
time hidden behind the actor's work is ``critic busy - actor's time on the critic``; ``sum of
phases - wall`` is reported as well (it also subtracts what no phase covers: GAE, collation,
logging).

    python benchmarks/ppo_time_split.py                  # 4 variants x (1 + 3 steps) x 2 repeats
    python benchmarks/ppo_time_split.py --variants remote-async,remote-sync --steps 1 --repeats 1
    python benchmarks/ppo_time_split.py --json benchmarks/results/ppo_time_split.json \\
        --plot docs/img/ppo_time_split.png
    python benchmarks/ppo_time_split.py --report benchmarks/results/ppo_time_split.json  # print it again
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bench_model import (
    VOCAB,
    add_run_arguments,
    align_step_timer,
    alternating,
    apply_defaults,
    fmt_load,
    online_trainer_settings,
    parse_variants,
    run_line,
    run_worker,
    save_bench_llama,
    save_character_tokenizer,
    workload_dir,
    write_worker_result,
)
from grpo_vs_trl import PROMPTS_FILE, SEED

PROMPTS_PER_STEP = 32
NEW_TOKENS = 32
MINIBATCH = 16  # samples per policy step and per critic step: 2 per epoch
EPOCHS = 2
LR = 1e-6
KL_COEF = 0.05
CLIP = 0.2
VALUE_CLIP = 0.2
VARIANTS = ("remote-async", "remote-sync", "local", "remote-async-reward-server")
DEFAULTS = {"variants": ",".join(VARIANTS), "steps": 3, "warmup": 1, "repeats": 2}
FILLER_BASE = 0x4E00  # the filler tokens' characters: CJK ideographs, one character each
PHASES = (
    "generate",
    "reward",
    "actor_logps",
    "reference_logps",
    "critic_values",
    "actor_train",
    "critic_train",
    "refit",
)


# ---- the shared workload -------------------------------------------------------------------------
def prepare(workdir: Path) -> None:
    """A character-level tokenizer whose every token is one character, the policy
    (``workdir/model``) and a reward model of the same size and tokenizer (``workdir/reward``).

    Unlike grpo_vs_trl's tokenizer (filler tokens written ``<t123>``), decoding and encoding
    again gives the same ids: align's reward model scores the decoded text, TRL's the token ids,
    and both must see the same sequences."""
    model_dir = workdir / "model"
    if not (model_dir / "config.json").is_file():
        save_character_tokenizer(model_dir, filler=lambda i: chr(FILLER_BASE + i), vocab_size=VOCAB)
        save_bench_llama(model_dir, seed=SEED, vocab_size=VOCAB)
    reward_dir = workdir / "reward"
    if (reward_dir / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(workdir / "model")
    config.num_labels = 1
    torch.manual_seed(SEED + 1)
    LlamaForSequenceClassification(config).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(workdir / "model").save_pretrained(reward_dir)


def ppo_config(
    critic: str, workdir: Path, out: Path, steps: int, threads: int, reward_server: bool = False
) -> dict[str, Any]:
    """align's PPO run config with the ``local`` or ``remote`` critic (and with
    ``reward_server`` the reward model in a child reward server)."""
    reward_dir = str(workdir / "reward")
    critic_cfg: dict[str, Any] = {
        "name": critic,
        "init": "reward",
        "path": reward_dir,
        "value_clip": VALUE_CLIP,
    }
    if critic == "remote":  # a loaded machine: generous limits, the point is the timing
        critic_cfg.update(timeout_s=600, startup_timeout_s=600)
    reward: dict[str, Any] = {"name": "model", "path": reward_dir, "batch_size": PROMPTS_PER_STEP}
    if reward_server:
        reward = {
            "name": "remote",
            "serve": reward,
            "batch_size": PROMPTS_PER_STEP,
            "timeout_s": 600,
            "startup_timeout_s": 600,
        }
    return {
        "algo": "ppo",
        "output_dir": str(out),
        "seed": SEED,
        "model": {"path": str(workdir / "model")},
        "backend": {"name": "hf", "attn_implementation": "sdpa"},
        "data": {"format": "prompts", "train": str(PROMPTS_FILE), "max_length": 64},
        "rollout": {"name": "hf"},
        "reward": reward,
        "critic": critic_cfg,
        "sampling": {"n": 1, "temperature": 1.0, "max_tokens": NEW_TOKENS, "ignore_eos": True},
        "iterations": steps,
        "prompts_per_iteration": PROMPTS_PER_STEP,
        "epochs": EPOCHS,
        "gamma": 1.0,
        "lambda": 0.95,
        "clip_low": CLIP,
        "clip_high": CLIP,
        "kl": {"coef": KL_COEF, "estimator": "k1"},
        "whiten_advantages": True,
        "trainer": {
            "batch_size": MINIBATCH,
            "precision": "fp32",
            **online_trainer_settings(threads),
        },
        "optim": {"name": "adamw", "lr": LR},
    }


# ---- the critic's busy time, seen from the client ------------------------------------------------
class TimedCritic:
    """An ``align.Critic`` around another that records each request's (kind, made, done) times;
    with ``wait`` every request is awaited before the call returns (no overlap)."""

    def __init__(self, inner: Any, wait: bool) -> None:
        self.inner, self.wait = inner, wait
        self.requests: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def values(self, tokens: Any) -> Future[Any]:
        return self._timed("values", lambda: self.inner.values(tokens))

    def train(self, batch: Any) -> Future[Any]:
        return self._timed("train", lambda: self.inner.train(batch))

    def save(self, folder: Path) -> None:
        self.inner.save(folder)

    def load(self, folder: Path) -> None:
        self.inner.load(folder)

    def close(self) -> None:
        self.inner.close()

    def take_busy(self) -> dict[str, float]:
        """The busy seconds per kind since the last call: requests are served one at a time in
        the order they were made, so a request's own time starts when it was made or when the
        one before it finished, whichever is later."""
        with self._lock:
            done, self.requests = sorted(self.requests, key=lambda r: r[2]), []
        busy = {"values": 0.0, "train": 0.0}
        previous = 0.0
        for kind, made, finished in done:
            busy[kind] += finished - max(made, previous)
            previous = finished
        return busy

    def _timed(self, kind: str, call: Callable[[], Future[Any]]) -> Future[Any]:
        made = time.perf_counter()
        outer: Future[Any] = Future()

        def record(inner: Future[Any]) -> None:
            # recorded before ``outer`` completes: whoever waited for it finds the record there
            with self._lock:
                self.requests.append((kind, made, time.perf_counter()))
            failure = inner.exception()
            if failure is not None:
                outer.set_exception(failure)
            else:
                outer.set_result(inner.result())

        call().add_done_callback(record)
        if self.wait:
            outer.exception()  # wait; a failure is raised by whoever reads the result
        return outer


# ---- worker (one per subprocess) -----------------------------------------------------------------
def run_align(
    variant: str,
    workdir: Path,
    out: Path,
    steps: int,
    threads: int,
    precision: str = "fp32",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import align
    from align.loading import validate_run_config
    from align_ppo.algorithm import PPO

    critic_name = "local" if variant == "local" else "remote"
    config = ppo_config(
        critic_name, workdir, out, steps, threads, reward_server=variant.endswith("reward-server")
    )
    config["trainer"]["precision"] = precision
    config.update(overrides or {})
    timed: list[TimedCritic] = []
    build = PPO.setup

    def setup(self: PPO, learner: Any) -> None:
        build(self, learner)
        timed.append(TimedCritic(self.critic, wait=variant == "remote-sync"))
        self.critic = timed[-1]

    PPO.setup = setup  # type: ignore[method-assign]

    def add_critic_busy(row: dict[str, float]) -> None:
        busy = timed[-1].take_busy()
        row.update(critic_values_busy_s=busy["values"], critic_train_busy_s=busy["train"])

    timer = align_step_timer("rollout", add_to_row=add_critic_busy)
    plugins = align.default_plugins()
    cfg = validate_run_config(config, plugins.registry, "ppo")
    plugins.manager.register(timer)
    align.train(cfg, plugins)
    return {
        "step_s": timer.step_s(),
        "rollout": timer.rows,
        "setup_s": timer.marks[0] - STARTED,
    }


STARTED = time.perf_counter()


def worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        result = run_align(args.worker, Path(args.workdir), Path(tmp), args.total_steps, args.threads)
    write_worker_result(result, Path(args.out), STARTED)


# ---- the split of a step -------------------------------------------------------------------------
def split_of(row: dict[str, float], wall: float) -> dict[str, float]:
    """One step's phases (the critic's as its own busy time), what the actor spent on the critic,
    and the overlap."""
    phases = {
        "generate": row["generate_s"],
        "reward": row.get("score_s", 0.0),
        "actor_logps": row["policy_logps_s"],
        "reference_logps": row.get("reference_logps_s", 0.0),
        "critic_values": row["critic_values_busy_s"],
        "actor_train": row["actor_train_s"],
        "critic_train": row["critic_train_busy_s"],
        "refit": row["refit_s"],
    }
    on_critic = (
        row["critic_values_send_s"]
        + row["critic_wait_s"]
        + row["critic_train_send_s"]
        + row["critic_train_wait_s"]
    )
    critic_busy = phases["critic_values"] + phases["critic_train"]
    total = sum(phases.values())
    return phases | {
        "sum": total,
        "wall": wall,
        "actor_on_critic": on_critic,
        "critic_hidden": critic_busy - on_critic,
        "reward_hidden": row.get("reward_hidden_s", 0.0),
        "sum_minus_wall": total - wall,
    }


def launch(variant: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    found, stderr = run_worker(__file__, variant, workdir, args.warmup + args.steps, args.threads)
    if found is None:
        return {"failed": stderr}
    result: dict[str, Any] = found
    timed = slice(args.warmup, None)
    result["step_s"], result["rollout"] = result["step_s"][timed], result["rollout"][timed]
    result["split"] = [split_of(r, w) for r, w in zip(result["rollout"], result["step_s"], strict=True)]
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    splits = [s for run in runs for s in run["split"]]
    keys = splits[0].keys()
    return {
        "median": {k: statistics.median(s[k] for s in splits) for k in keys},
        "step_s_min": min(s["wall"] for s in splits),
        "step_s_max": max(s["wall"] for s in splits),
        "steps": len(splits),
        "setup_s": statistics.median(run["setup_s"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "load_average": [run["load_average"] for run in runs],
    }


def table(summary: dict[str, dict[str, Any]]) -> str:
    names = [p.replace("_", " ") for p in PHASES]
    lines = [
        "| variant | " + " | ".join(names) + " | sum | **wall** (min-max) | actor on critic | critic hidden "
        "| reward hidden | sum - wall |",
        "|---" * (len(PHASES) + 7) + "|",
    ]
    for variant, s in summary.items():
        m = s["median"]
        cells = [f"{m[p]:.2f}" for p in PHASES]
        lines.append(
            f"| {variant} | "
            + " | ".join(cells)
            + f" | {m['sum']:.2f} | **{m['wall']:.2f}** ({s['step_s_min']:.2f}-{s['step_s_max']:.2f}) "
            f"| {m['actor_on_critic']:.2f} | {m['critic_hidden']:.2f} | {m.get('reward_hidden', 0.0):.2f} "
            f"| {m['sum_minus_wall']:.2f} |"
        )
    return "\n".join(lines)


def overlap_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for variant, s in summary.items():
        m = s["median"]
        busy = m["critic_values"] + m["critic_train"]
        share = m["critic_hidden"] / busy if busy > 0 else 0.0
        hidden = m.get("reward_hidden", 0.0)  # records from before the reward futures: none
        lines.append(
            f"{variant}: critic busy {busy:.2f} s/step, {m['critic_hidden']:.2f} s of it hidden behind the "
            f"actor's work ({share:.0%}); reward {m['reward']:.2f} s/step, {hidden:.2f} s of it hidden "
            f"behind the log-probs ({hidden / m['reward'] if m['reward'] > 0 else 0.0:.0%}); "
            f"sum of phases - wall = {m['sum_minus_wall']:.2f} s"
        )
    if "remote-sync" in summary and "remote-async" in summary:
        sync, asyn = summary["remote-sync"]["median"]["wall"], summary["remote-async"]["median"]["wall"]
        lines.append(f"remote-async step / remote-sync step: {asyn / sync:.2f} ({sync - asyn:+.2f} s)")
    return lines


def plot(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """A stacked bar of each variant's phases (the critic's as its busy time), and a black
    bar at the step's wall time: what stands above it ran at the same time as something else."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    figure, axes = plt.subplots(figsize=(8, 4.2))
    bottom = [0.0] * len(names)
    hatches = {"critic_values": "//", "critic_train": "//"}
    for phase in PHASES:
        heights = [summary[n]["median"][phase] for n in names]
        axes.bar(
            names,
            heights,
            bottom=bottom,
            width=0.55,
            label=phase.replace("_", " "),
            hatch=hatches.get(phase, ""),
        )
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    walls = [summary[n]["median"]["wall"] for n in names]
    for x, wall in enumerate(walls):
        axes.hlines(
            wall,
            x - 0.38,
            x + 0.38,
            colors="black",
            linewidth=2.5,
            label="step wall time" if x == 0 else "_nolegend_",
        )
        axes.annotate(
            f"wall {wall:.2f} s", (x + 0.3, wall), textcoords="offset points", xytext=(0, 4), fontsize=8
        )
    axes.set_ylabel("seconds per PPO step (median)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# ---- the driver ----------------------------------------------------------------------------------
def save_record(
    path: Path, args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], complete: bool
) -> None:
    record = {
        "args": vars(args),
        "complete": complete,
        "runs": runs,
        "summary": {v: summarize(r) for v, r in runs.items() if r},
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, DEFAULTS)
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--workdir", help="where the models are written (default: a temp folder)")
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument("--plot", help="also draw the split as a stacked bar here (PNG)")
    parser.add_argument("--report", help="only print (and --plot) the runs of a saved --json record")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.report:
        record = json.loads(Path(args.report).read_text())
        report(record["runs"], record["args"]["threads"], args.plot)
        return
    apply_defaults(args, DEFAULTS)
    variants = parse_variants(args.variants)
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with workload_dir(args.workdir) as workdir:
        prepare(workdir)
        for repeat, variant in alternating(variants, args.repeats):
            started, load = time.perf_counter(), os.getloadavg()
            result = launch(variant, args, workdir)
            if "failed" in result:  # e.g. tritonserver not up within PyTriton's 120 s under load
                print(f"{variant} failed, once more:\n{result['failed'][-800:]}", flush=True)
                result = launch(variant, args, workdir)
            took = time.perf_counter() - started
            if "failed" in result:
                print(f"{variant} failed after {took:.0f}s:\n{result['failed'][-2500:]}", flush=True)
                continue
            result["load_average"] = {"before": list(load), "after": list(os.getloadavg())}
            runs[variant].append(result)
            print(
                run_line(repeat, args.repeats, variant, took, result["step_s"])
                + f" (load {fmt_load(load)} -> {fmt_load(os.getloadavg())})",
                flush=True,
            )
            if args.json:
                save_record(Path(args.json), args, runs, complete=False)
    if args.json:
        save_record(Path(args.json), args, runs, complete=True)
    report(runs, args.threads, args.plot)


def report(runs: dict[str, list[dict[str, Any]]], threads: int, plot_path: str | None) -> None:
    """The table, the overlap and (with ``plot_path``) the PNG of the runs so far, with the load
    average around each run."""
    summary = {v: summarize(r) for v, r in runs.items() if r}
    loads = [run["load_average"] for rs in runs.values() for run in rs]
    first, last = loads[0]["before"], loads[-1]["after"]
    print(
        f"\nload average (1/5/15 min) {fmt_load(first)} at the start, {fmt_load(last)} at the end; per run:"
    )
    for variant, s in summary.items():
        around = ", ".join(f"{r['before'][0]:.1f}->{r['after'][0]:.1f}" for r in s["load_average"])
        print(f"  {variant}: {s['steps']} timed steps, 1-min load {around}")
    print(
        f"{PROMPTS_PER_STEP} prompts x {NEW_TOKENS} tokens, {EPOCHS} epochs x "
        f"{PROMPTS_PER_STEP // MINIBATCH} minibatches, {threads} threads\n\nmedian seconds per step:\n"
        + table(summary)
        + "\n"
    )
    print("\n".join(overlap_lines(summary)))
    if plot_path and summary:
        title = (
            f"PPO step, 28.8M Llama, {PROMPTS_PER_STEP} x {NEW_TOKENS} tokens, {threads} threads; "
            f"1-min load {first[0]:.0f} -> {last[0]:.0f}"
        )
        plot(summary, Path(plot_path), title)


if __name__ == "__main__":
    main()
