"""What the side-by-side benchmarks share: the model they all use, a 28.8M-parameter Llama
(6 layers, hidden 512, 8 heads, vocab 8192, untied) built in code with a fixed seed, so align,
TRL and the engines are measured on exactly the same weights; and the fresh worker process each
measurement runs in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VOCAB = 8192
# Llama shapes by name: layers, hidden, MLP width, heads. "bench" is the 28.8M CPU model (vocab
# 8192); the larger ones mean something on a GPU (vocab 32000: ~134M and ~372M parameters).
SHAPES: dict[str, dict[str, int]] = {
    "bench": {"layers": 6, "hidden": 512, "ffn": 1536, "heads": 8, "vocab": VOCAB},
    "llama-134m": {"layers": 12, "hidden": 768, "ffn": 2048, "heads": 12, "vocab": 32000},
    "llama-372m": {"layers": 24, "hidden": 1024, "ffn": 2816, "heads": 16, "vocab": 32000},
}


def save_bench_llama(model_dir: Path, seed: int = 0, vocab_size: int = VOCAB, shape: str = "bench") -> None:
    """Write the benchmark model (config + safetensors) to ``model_dir``: the 28.8M model, or
    another of ``SHAPES`` (``vocab_size`` applies to "bench"; the others carry their own)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab_size if shape == "bench" else dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir)


def run_worker(
    script: str, variant: str, workdir: Path, total_steps: int, threads: int, extra: Sequence[str] = ()
) -> tuple[dict[str, Any] | None, str]:
    """Run ``script --worker variant`` (plus ``extra`` arguments) in a fresh process pinned to
    ``threads`` threads with cold caches; returns (its result JSON, or None when it failed, and
    its stderr's tail)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            HF_DATASETS_CACHE=str(Path(tmp) / "datasets-cache"),  # TRL's precompute cache: cold
            TOKENIZERS_PARALLELISM="false",
            TQDM_DISABLE="1",
            PYTHONWARNINGS="ignore",
            VLLM_ENABLE_V1_MULTIPROCESSING="0",  # in-process vLLM, like align's engine
        )
        command = [sys.executable, script, "--worker", variant, "--workdir", str(workdir), "--out", str(out)]
        command += ["--total-steps", str(total_steps), "--threads", str(threads), *extra]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return None, done.stderr[-4000:]
        result: dict[str, Any] = json.loads(out.read_text())
        return result, done.stderr[-4000:]
