"""Rewards of the real-model examples (``reward: {name: function, path: format_reward:...}``).

``follows_format``: 1.0 when a completion follows its prompt row's format instruction
(``format: one_word`` -> exactly one word; ``format: uppercase`` -> letters, none lower-case).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def text_of(completion: Any) -> str:
    """A completion's text: a string, or the last message of a conversation."""
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


def one_word(text: str) -> bool:
    return len(WORD.findall(text)) == 1


def uppercase(text: str) -> bool:
    return any(c.isalpha() for c in text) and not any(c.islower() for c in text)


CHECKS = {"one_word": one_word, "uppercase": uppercase}


def follows_format(
    prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]]
) -> list[float]:
    return [float(CHECKS[row["format"]](text_of(c))) for c, row in zip(completions, rows, strict=True)]
