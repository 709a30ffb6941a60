"""Shared fixtures and helpers: tiny model knobs, small data, in-process CLI calls.

Everything runs on CPU with the embedded tiny Llama and the byte tokenizer; nothing needs a
network. Helpers that several test files use live in ``tests/helpers`` (importable as
``helpers``: pytest puts ``tests/`` on ``sys.path`` for this rootdir conftest).
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pip: installs a package with pip (skipped when it cannot build)")
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
