"""How SteerLM writes attribute values into a prompt, and how it reads them from data.

The attribute string is ``name:value,name:value`` in the order of ``attributes`` (NeMo-Aligner's
label format). Two templates put it into the prompt:

- ``nemo`` (plain text, any tokenizer; NeMo-Aligner's chat layout)::

      <extra_id_0>System\\n{system}\\n
      <extra_id_1>User\\n{user turn}\\n
      <extra_id_1>Assistant\\n<extra_id_2>{earlier label}\\n{earlier answer}\\n   (earlier turns, if any)
      <extra_id_1>User\\n{user turn}\\n
      <extra_id_1>Assistant\\n<extra_id_2>{attribute string}\\n

  and the completion (the answer, the only tokens with a loss) follows, ended by EOS;
- ``chat`` (a tokenizer's own chat template): a system message ``{system}\\n\\nattributes:
  {attribute string}`` (just ``attributes: ...`` when ``system`` is empty), then the
  conversation; the template adds its generation prompt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

import align

HELPSTEER_ATTRIBUTES = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]

SYSTEM_HEADER = "<extra_id_0>System\n"
USER_HEADER = "<extra_id_1>User\n"
ASSISTANT_HEADER = "<extra_id_1>Assistant\n"
LABEL_PREFIX = "<extra_id_2>"
CHAT_LABEL_PREFIX = "attributes: "

Prompt = str | list[dict[str, Any]]


class Conditioning(align.StrictConfig):
    """The attributes a model is conditioned on and the template that writes them. Training
    (``data`` of ``--algo steerlm``) and steering (``align generate data.format=steerlm_prompts``)
    must use the same settings: the defaults are the same on both sides."""

    attributes: list[str] = Field(
        default_factory=lambda: list(HELPSTEER_ATTRIBUTES),
        min_length=1,
        description="Attribute names, in the order they are written into the prompt (HelpSteer's five "
        "by default).",
    )
    min_value: int = Field(0, description="Smallest attribute value (HelpSteer: 0).")
    max_value: int = Field(4, description="Largest attribute value (HelpSteer: 4).")
    template: Literal["nemo", "chat"] = Field(
        "nemo",
        description="'nemo': NeMo-Aligner's plain-text chat layout with the attribute string after "
        "'<extra_id_2>'; 'chat': the tokenizer's chat template, the attribute string in the system "
        "message.",
    )
    system: str = Field(
        "", description="System prompt for rows that bring none (NeMo rows carry their own 'system')."
    )

    @field_validator("attributes")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"attributes are listed more than once: {', '.join(repeated)}")
        bad = [name for name in value if not name or any(ch in name for ch in ",:\n")]
        if bad:
            raise ValueError(f"attribute names must be non-empty, without ',', ':' or newlines: {bad}")
        return value

    @model_validator(mode="after")
    def _range(self) -> Conditioning:
        if self.min_value >= self.max_value:
            raise ValueError(f"min_value ({self.min_value}) must be less than max_value ({self.max_value})")
        return self


class MissingAttribute(ValueError):
    """A row lacks a value for a configured attribute (``on_missing: skip`` skips such rows)."""


def parse_label(text: str) -> dict[str, int]:
    """``"helpfulness:4,verbosity:2"`` -> ``{"helpfulness": 4, "verbosity": 2}``; raises
    ``ValueError`` saying which part is malformed."""
    values: dict[str, int] = {}
    for part in text.split(","):
        name, colon, raw = part.partition(":")
        name, raw = name.strip(), raw.strip()
        if not colon or not name or not raw:
            raise ValueError(f"label {text!r:.80}: {part!r} is not name:value")
        try:
            values[name] = int(raw)
        except ValueError:
            try:
                number = float(raw)
            except ValueError:
                raise ValueError(f"label {text!r:.80}: the value of '{name}' is not a number") from None
            values[name] = number  # type: ignore[assignment]  # checked (integral, in range) later
    return values


def attribute_values(given: Any, cfg: Conditioning) -> dict[str, int]:
    """The value of every configured attribute, from a mapping or a label string; raises
    ``ValueError`` for a missing, non-integral or out-of-range value. Attributes that are not
    configured are ignored (NeMo labels may carry more than a model is conditioned on)."""
    if isinstance(given, str):
        given = parse_label(given)
    if not isinstance(given, Mapping):
        raise ValueError(f"attributes must be a mapping or a 'name:value,...' string, got {given!r:.60}")
    missing = [name for name in cfg.attributes if given.get(name) is None]
    if missing:
        has = ", ".join(str(k) for k in given) or "none"
        raise MissingAttribute(
            f"no value for attribute {', '.join(repr(m) for m in missing)} (it has: {has})"
        )
    return {name: check_value(name, given[name], cfg) for name in cfg.attributes}


def check_value(name: str, value: Any, cfg: Conditioning) -> int:
    """One value as an integer in range, else ``ValueError`` naming the attribute."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"attribute '{name}' must be an integer, got {value!r:.40}")
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"attribute '{name}' must be an integer, got {value}")
    if not cfg.min_value <= value <= cfg.max_value:
        raise ValueError(f"attribute '{name}' is {value:g}, outside {cfg.min_value}..{cfg.max_value}")
    return int(value)


def format_label(values: Mapping[str, int], cfg: Conditioning) -> str:
    """The attribute string, in the configured order: ``helpfulness:4,verbosity:2``."""
    return ",".join(f"{name}:{values[name]}" for name in cfg.attributes)


def clip_round(score: float, cfg: Conditioning) -> int:
    """A predicted score as an attribute value: clipped to the range, rounded half up."""
    return math.floor(min(max(score, cfg.min_value), cfg.max_value) + 0.5)


@dataclass
class Turn:
    role: Literal["user", "assistant"]
    content: str
    label: str | None = None  # an earlier assistant turn's attribute string, if it has one


@dataclass
class Conversation:
    """A prompt to condition: the system prompt and the turns before the answer (ending with a
    user turn)."""

    system: str
    turns: list[Turn] = field(default_factory=list)


def render(conversation: Conversation, label: str, cfg: Conditioning) -> Prompt:
    """The conditioned prompt: a string (``nemo``) or chat messages (``chat``)."""
    if cfg.template == "chat":
        system = f"{conversation.system}\n\n" if conversation.system else ""
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": f"{system}{CHAT_LABEL_PREFIX}{label}"}
        ]
        return messages + [{"role": t.role, "content": t.content} for t in conversation.turns]
    text = f"{SYSTEM_HEADER}{conversation.system}\n"
    for turn in conversation.turns:
        if turn.role == "user":
            text += f"{USER_HEADER}{turn.content}\n"
        else:
            earlier = f"{LABEL_PREFIX}{turn.label}\n" if turn.label else ""
            text += f"{ASSISTANT_HEADER}{earlier}{turn.content}\n"
    return f"{text}{ASSISTANT_HEADER}{LABEL_PREFIX}{label}\n"


def conversation_of(prompt: Prompt, default_system: str) -> Conversation:
    """A prompt as written in a row (a string, or chat messages ending with a user turn) -> its
    conversation; a leading system message replaces ``default_system``."""
    if isinstance(prompt, str):
        return Conversation(default_system, [Turn("user", prompt)])
    system = default_system
    turns = []
    for message in prompt:
        role, content = message["role"], str(message.get("content") or "")
        if role in ("system", "developer"):
            system = content
        elif role in ("user", "assistant"):
            turns.append(Turn(role, content))
        else:
            raise ValueError(f"a SteerLM prompt has user and assistant turns only, not '{role}'")
    if not turns or turns[-1].role != "user":
        raise ValueError("the prompt's messages must end with a user turn")
    return Conversation(system, turns)
