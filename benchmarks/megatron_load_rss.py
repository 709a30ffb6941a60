"""Peak RSS per rank of building the megatron policy from an HF safetensors folder: each rank
reading only its shards (``get_slice``, what ``build_model`` does) against every rank loading the
whole HF model and converting it (what it did before, and still does for ``model.path: tiny``).

    python benchmarks/megatron_load_rss.py prepare DIR     # a ~167M-parameter Llama (fp32, GQA)
    torchrun --nproc_per_node 2 benchmarks/megatron_load_rss.py measure DIR sliced OUT.json
    torchrun --nproc_per_node 2 benchmarks/megatron_load_rss.py measure DIR full OUT.json

Each rank reports its peak RSS (``ru_maxrss``) after start-up (imports, process groups) and after
building the policy, the largest resident set sampled every 2 ms while it builds, split into
anonymous memory (``RssAnon``: the process's own allocations) and file-backed pages
(``RssFile``: the safetensors file mapped by ``safe_open``, shared page cache the kernel can drop),
and a checksum of its shards (the two ways must give the same, bit for bit). Run the two ways in
separate launches: a process's peak RSS never goes down.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

REPO = Path(__file__).resolve().parents[1]
SIZE = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> dict[str, float]:
    """The process's resident memory now, in MB: VmRSS, RssAnon and RssFile."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


class PeakSampler:
    """The largest VmRSS, RssAnon and RssFile seen while it runs (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.peak = resident_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            for key, value in resident_mb().items():
                self.peak[key] = max(self.peak[key], value)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def prepare(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import align

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZE))
    model.save_pretrained(folder, safe_serialization=True)
    align.byte_tokenizer().save_pretrained(folder)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {folder}")


def measure(folder: Path, way: str, out: Path) -> None:
    from align import build_hf_model
    from align.cli import load_config
    from align.plugins import default_plugins
    from align_megatron import MegatronBackend

    config = {
        "algo": "sft",
        "output_dir": tempfile.mkdtemp(),
        "model": {"path": str(folder)},
        "backend": {"name": "megatron", "tensor_model_parallel_size": int(os.environ.get("WORLD_SIZE", "1"))},
        "data": {"format": "sft", "train": str(REPO / "examples/data/sft_train.jsonl")},
    }
    spec = Path(config["output_dir"]) / "run.yaml"
    spec.write_text(yaml.safe_dump(config))
    run = load_config(str(spec), [], None, default_plugins())
    backend = MegatronBackend(run)
    started, before = peak_rss_mb(), resident_mb()
    with PeakSampler() as sampler:
        if way == "sliced":
            policy: Any = backend.build_model("policy")
        else:
            hf_model = build_hf_model("policy", run.model, backend.tokenizer, "eager")
            policy = backend._converted(hf_model, torch.float32)
            del hf_model
    built = peak_rss_mb()
    digest = hashlib.sha256()
    for name, param in sorted(policy.gpt.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().contiguous().numpy().tobytes())
    row = {
        "rank": dist.get_rank(),
        "way": way,
        "start_maxrss_mb": round(started),
        "maxrss_mb": round(built),
        "before_build_mb": {k: round(v) for k, v in before.items()},
        "peak_while_building_mb": {k: round(v) for k, v in sampler.peak.items()},
        "sha256": digest.hexdigest(),
    }
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "prepare":
        prepare(folder)
    else:
        measure(folder, sys.argv[3], Path(sys.argv[4]))
