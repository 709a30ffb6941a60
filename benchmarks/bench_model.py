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
from pathlib import Path
from typing import Any

VOCAB = 8192


def save_bench_llama(model_dir: Path, seed: int = 0, vocab_size: int = VOCAB) -> None:
    """Write the benchmark model (config + safetensors) to ``model_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir)


def run_worker(
    script: str, variant: str, workdir: Path, total_steps: int, threads: int
) -> tuple[dict[str, Any] | None, str]:
    """Run ``script --worker variant`` in a fresh process pinned to ``threads`` threads with cold
    caches; returns (its result JSON, or None when it failed, and its stderr's tail)."""
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
        command += ["--total-steps", str(total_steps), "--threads", str(threads)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return None, done.stderr[-4000:]
        result: dict[str, Any] = json.loads(out.read_text())
        return result, done.stderr[-4000:]
