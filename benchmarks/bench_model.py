"""The model every side-by-side benchmark uses: a 28.8M-parameter Llama (6 layers, hidden 512,
8 heads, vocab 8192, untied), built in code with a fixed seed, so align, TRL and the engines are
measured on exactly the same weights."""

from __future__ import annotations

from pathlib import Path

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
