"""Where an align DPO step's time goes, on the workload of ``dpo_vs_trl.py``.

    python benchmarks/profile_dpo_step.py ablate --reps 5    # each speed feature off, one at a time
    python benchmarks/profile_dpo_step.py profile            # torch.profiler table of one step
    python benchmarks/profile_dpo_step.py profile --packed   # ... of a packed step (attention per sequence)
    python benchmarks/profile_dpo_step.py ablate --threads 1 --cpu-time   # on a loaded machine
    python benchmarks/profile_dpo_step.py matmuls            # the step's matmul shapes vs the peak
    python benchmarks/profile_dpo_step.py ablate --compile   # also: packed, decoder layers compiled

A step is what the trainer does per batch: the policy's log-probs of 8 pairs (chosen and
rejected in one batch), DPO loss against given reference log-probs, backward, clip, AdamW.
``ablate`` times the full step with every feature on, then with one feature off at a time,
alternating the variants within each repeat (the first repeat is a warm-up); the same batch (8
pairs in the data's order, so unsorted lengths) throughout. It also times what live-reference
mode adds per step: the reference's forward pass on the batch.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from dpo_vs_trl import BATCH_PAIRS, BETA, LR, MAX_LENGTH, prepare

import align_hf.backend as hf
from align import SequenceLogps
from align.builtin.data import PreferenceData, PreferenceFormat
from align_hf.varlen import VARLEN


def unfused_token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """What autograd does without the fused function: a float32 copy, gather - logsumexp."""
    logits = logits.float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def per_chunk_sequence_logps(model: Any, batch: Any, chunk_tokens: int | None = None) -> SequenceLogps:
    """Row chunks as before: embedding lookup and LM head once per chunk (a vocabulary-sized
    weight gradient each per chunk, added together in the backward)."""
    pieces = [hf._logps(model, piece) for piece in hf._pieces(batch, chunk_tokens)]
    sums = torch.stack([piece.sum for piece in pieces]).sum(0)
    return SequenceLogps(sums, torch.stack([piece.count for piece in pieces]).sum(0))


@contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class Step:
    def __init__(self, workdir: Path, threads: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
        self.model = AutoModelForCausalLM.from_pretrained(
            workdir / "model", dtype=torch.float32, attn_implementation="sdpa"
        )
        data = PreferenceData(train=str(workdir / "pairs.jsonl"), max_length=MAX_LENGTH)
        loaded = PreferenceFormat(data, tokenizer).load("train")
        assert loaded is not None
        rows = [loaded[i] for i in range(BATCH_PAIRS)]
        self.pairs = PreferenceFormat(data, tokenizer).collate(rows)
        packed = data.model_copy(update={"padding_free": True})
        self.packed = PreferenceFormat(packed, tokenizer).collate(rows)
        self.optimizers = {
            fused: torch.optim.AdamW(self.model.parameters(), lr=LR, fused=fused) for fused in (True, False)
        }
        with torch.inference_mode():
            ref = hf.sequence_logps(self.model, self.pairs.tokens, 1024).sum.clone()
        self.ref = ref.split(BATCH_PAIRS)
        self.compiled: tuple[Any, torch.optim.Optimizer] | None = None

    def train(
        self,
        chunk_tokens: int | None = 1024,
        fused_adamw: bool = True,
        packed: bool = False,
        attention: str = "sdpa",
        compiled: bool = False,
    ) -> None:
        """One step; ``attention`` is the model's attention function for it (``VARLEN``: per
        sequence in a packed row, what the hf backend uses for packed rows on CPU), ``compiled``
        a copy of the model with its decoder layers compiled (``compile_layers``)."""
        tokens = (self.packed if packed else self.pairs).tokens
        model, optimizer = (
            self.compiled if compiled and self.compiled else (self.model, self.optimizers[fused_adamw])
        )
        model.config._attn_implementation = attention
        try:
            chosen, rejected = hf.sequence_logps(model, tokens, chunk_tokens).sum.split(BATCH_PAIRS)
        finally:
            model.config._attn_implementation = "sdpa"
        logits = (chosen - self.ref[0]) - (rejected - self.ref[1])
        (-F.logsigmoid(BETA * logits).mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def compile_layers(self) -> float:
        """A copy of the model whose decoder layers are ``torch.compile``d (dynamic shapes: one
        packed row of a different length every batch), with its own fused AdamW; returns the
        seconds its first (compiling) step took."""
        model = copy.deepcopy(self.model)
        for layer in model.model.layers:
            layer.compile(dynamic=True)
        self.compiled = (model, torch.optim.AdamW(model.parameters(), lr=LR, fused=True))
        started = time.perf_counter()
        self.train(packed=True, attention=VARLEN, compiled=True)
        return time.perf_counter() - started

    def reference_forward(self) -> None:
        with torch.inference_mode():
            hf.sequence_logps(self.model, self.pairs.tokens, 1024)


def ablate(
    step: Step, reps: int, clock: Callable[[], float] = time.perf_counter, compiled: bool = False
) -> None:
    variants: dict[str, Callable[[], None]] = {
        "all features (align default)": step.train,
        "no row chunks (one padded pass)": lambda: step.train(chunk_tokens=None),
        "unfused token log-probs": lambda: _with(hf, "token_logps_of", unfused_token_logps, step.train),
        "attention mask kept (no causal fast path)": lambda: _with(
            hf, "_right_padded", lambda batch: False, lambda: step.train(chunk_tokens=None)
        ),
        "AdamW per-tensor loop (not fused)": lambda: step.train(fused_adamw=False),
        "embedding and LM head per row chunk": lambda: _with(
            hf, "sequence_logps", per_chunk_sequence_logps, step.train
        ),
        "padding-free (one packed row), attention per sequence": lambda: step.train(
            packed=True, attention=VARLEN
        ),
        "padding-free, block-diagonal mask (transformers' sdpa)": lambda: step.train(packed=True),
        "reference forward (live mode, per step)": step.reference_forward,
    }
    if compiled:
        print(f"compiling the decoder layers: first step {step.compile_layers():.1f} s")
        variants["padding-free, attention per sequence, layers compiled"] = lambda: step.train(
            packed=True, attention=VARLEN, compiled=True
        )
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps + 1):
        for name, run in variants.items():
            started = clock()
            run()
            if rep:
                times[name].append(clock() - started)
    tokens = step.pairs.num_tokens
    pad = step.pairs.tokens.pad_fraction
    print(f"\n{BATCH_PAIRS} pairs, {tokens} real tokens, layout pad fraction {pad:.2f}")
    print("| variant | median s | min s | tokens/s |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {min(values):.2f} | {tokens / median:,.0f} |")
    print("\n('attention mask kept' runs without row chunks: compare it with 'no row chunks')")


def _with(module: Any, name: str, value: Any, run: Callable[[], None]) -> None:
    with patched(module, name, value):
        run()


def profile(step: Step, chunk_tokens: int | None, packed: bool = False) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def run() -> None:
        if packed:
            step.train(packed=True, attention=VARLEN)
        else:
            step.train(chunk_tokens=chunk_tokens)

    run()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def matmul_rates(threads: int, rows: int = 1024, square_size: int = 2048) -> None:
    """GFLOP/s of the step's own matmul shapes (a chunk of ``rows`` tokens through each weight of
    the benchmark model: forward, input gradient, weight gradient) against the square products
    ``dpo_vs_trl.py`` takes as the machine's peak, in fp32 and bf16."""
    torch.set_num_threads(threads)

    def rate(matmul: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> float:
        matmul(a, b)
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(10):
                matmul(a, b)
            best = min(best, (time.perf_counter() - started) / 10)
        out_rows, inner = a.shape
        return 2 * out_rows * inner * (b.shape[0] if matmul is F.linear else b.shape[1]) / best / 1e9

    print("| dtype | tokens x in -> out | forward | input grad | weight grad |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        square = torch.randn(square_size, square_size, dtype=dtype)
        print(f"| {dtype} | square {square_size} (the peak) | {rate(torch.mm, square, square):.0f} | | |")
        for d_in, d_out in ((512, 512), (512, 1536), (1536, 512), (512, 8192)):
            x, w = torch.randn(rows, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
            g = torch.randn(rows, d_out, dtype=dtype)
            rates = (rate(F.linear, x, w), rate(torch.mm, g, w), rate(torch.mm, g.t(), x))
            print(f"| {dtype} | {rows} x {d_in} -> {d_out} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["ablate", "profile", "matmuls"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="ablate: time the process's CPU time, not wall time (with --threads 1 it is robust to "
        "other processes sharing the cores)",
    )
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="profile: 0 for one padded pass")
    parser.add_argument(
        "--packed", action="store_true", help="profile: the packed row (attention per sequence) instead"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="ablate: also the packed step with torch.compile'd decoder layers",
    )
    parser.add_argument("--workdir", help="model and data of dpo_vs_trl.py (default: a temp folder)")
    args = parser.parse_args()
    if args.what == "matmuls":
        matmul_rates(args.threads)
        return
    with tempfile.TemporaryDirectory(prefix="bench-workload-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        prepare(workdir)
        step = Step(workdir, args.threads)
        if args.what == "ablate":
            ablate(step, args.reps, time.process_time if args.cpu_time else time.perf_counter, args.compile)
        else:
            profile(step, args.chunk_tokens or None, args.packed)


if __name__ == "__main__":
    main()
