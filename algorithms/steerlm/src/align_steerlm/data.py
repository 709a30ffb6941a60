"""SteerLM's data formats.

``steerlm`` (training): each row is a prompt, an answer and the answer's attribute values,
written into the prompt by the template (see ``conditioning``); the loss is on the answer only.
A row is either

- NeMo-Aligner's SteerLM JSONL: ``system``, ``conversations`` (``from``, ``value``, ``label``,
  the user's speaker named by ``mask``, default ``User``), the last turn the assistant's answer
  with its ``label`` (``helpfulness:4,correctness:3,...``); earlier assistant turns keep their
  labels in the prompt; or
- a plain row: ``prompt`` + ``completion`` (text or chat messages) or ``messages``, and the
  values in an ``attributes`` column (a mapping or a label string) or, without one, in columns
  named after the attributes (HelpSteer's own layout).

``steerlm_prompts`` (``align generate``): prompts conditioned on the values to steer to:
``data.steer`` for every row, a row's ``attributes`` column for that row.

A row missing an attribute value is an error naming the file and row (or, with
``data.on_missing: skip``, skipped and counted as ``skipped_unlabelled``); a value that is
not an integer, or outside ``min_value..max_value``, and a label that does not parse are errors.
Attributes a row has but the config does not list are left out of the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

import align
from align_steerlm.conditioning import (
    Conditioning,
    Conversation,
    MissingAttribute,
    Prompt,
    Turn,
    attribute_values,
    check_value,
    conversation_of,
    format_label,
    parse_label,
    render,
)


@dataclass
class SteeredTokens(align.SFTTokens):
    """Attribute-conditioned prompt + answer sequences, the loss on the answer's tokens. A class
    of its own so that ``--algo steerlm`` only takes the ``steerlm`` format (an unconditioned
    ``sft`` file would train a model that ignores the attributes)."""


class SteerColumns(align.StrictConfig):
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    attributes: str = Field("attributes", description="A mapping or a 'name:value,...' label per row.")
    conversations: str = Field("conversations", description="NeMo-Aligner's SteerLM turns.")


class SteerLMData(Conditioning, align.DataConfig):
    format: Literal["steerlm"] = "steerlm"
    columns: SteerColumns = SteerColumns()
    on_missing: Literal["error", "skip"] = Field(
        "error",
        description="A row without a value for some attribute: 'error' (naming file and row) or "
        "'skip' (counted as skipped_unlabelled).",
    )


@dataclass
class Example:
    """A training row read from either layout, before rendering."""

    conversation: Conversation
    answer: str
    values: dict[str, int] | None  # None: some value is missing (on_missing: skip)


class SteerLMFormat(align.TokenizedFormat):
    cfg: SteerLMData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        try:
            example = self.example(row, source, index)
        except ValueError as exc:
            raise align.row_error(source, index, str(exc)) from None
        if example.values is None:
            return {"prompt_ids": [], "completion_ids": [], "status": "skipped_unlabelled"}
        prompt = render(example.conversation, format_label(example.values, self.cfg), self.cfg)
        prompt_ids, completion_ids = self.encoder.encode(prompt, example.answer)
        status, prompt_ids, (completion_ids,) = self.encoder.fit(prompt_ids, [completion_ids])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "status": status}

    def example(self, row: dict[str, Any], source: str, index: int) -> Example:
        c = self.cfg.columns
        if row.get(c.conversations) is not None:
            return self._nemo_example(row)
        if row.get(c.messages) is not None:
            messages = align.text_or_messages(row[c.messages], c.messages, source, index)
            if not isinstance(messages, list) or messages[-1]["role"] != "assistant":
                raise ValueError(f"'{c.messages}' must end with an assistant message")
            prompt: Prompt = messages[:-1]
            answer = str(messages[-1].get("content") or "")
        else:
            prompt = align.text_or_messages(row.get(c.prompt), c.prompt, source, index)
            completion = align.text_or_messages(row.get(c.completion), c.completion, source, index)
            answer = completion if isinstance(completion, str) else str(completion[-1].get("content") or "")
        if not answer:
            raise ValueError("the completion is empty")
        given = row.get(c.attributes)
        if given is None:  # HelpSteer's layout: one column per attribute
            given = {name: row.get(name) for name in self.cfg.attributes}
        return Example(conversation_of(prompt, self.cfg.system), answer, self._values(given))

    def _nemo_example(self, row: dict[str, Any]) -> Example:
        turns = row[self.cfg.columns.conversations]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise ValueError("'conversations' must be a non-empty list of {from, value, label} turns")
        user = str(row.get("mask") or "User")
        system = row.get("system")
        conversation = Conversation(self.cfg.system if system is None else str(system))
        for number, turn in enumerate(turns[:-1], start=1):
            role: Literal["user", "assistant"] = "user" if turn.get("from") == user else "assistant"
            label = turn.get("label")
            if role == "assistant" and label is not None:  # earlier answers keep their (checked) labels
                values = self._values(label, f"turn {number}: ")
                label = None if values is None else format_label(values, self.cfg)
            conversation.turns.append(Turn(role, _text(turn, number), label if role == "assistant" else None))
        last = turns[-1]
        if last.get("from") == user:
            raise ValueError(f"the last turn is the user's ('{user}'): it must be the assistant's answer")
        if not conversation.turns or conversation.turns[-1].role != "user":
            raise ValueError("the answer must follow a user turn")
        answer = _text(last, len(turns))
        if not answer:
            raise ValueError("the answer (last turn) is empty")
        return Example(conversation, answer, self._values(last.get("label"), "the answer's label: "))

    def _values(self, given: Any, where: str = "") -> dict[str, int] | None:
        """The checked values, or None for a row to skip (a value missing, ``on_missing: skip``)."""
        try:
            if given is None:
                raise MissingAttribute("no attribute values (a label or an attributes column is needed)")
            return attribute_values(given, self.cfg)
        except MissingAttribute as exc:
            if self.cfg.on_missing == "skip":
                return None
            raise ValueError(f"{where}{exc}") from None
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None

    def collate(self, rows: list[dict[str, Any]]) -> SteeredTokens:
        return SteeredTokens(
            tokens=align.lay_out(
                [(r["prompt_ids"], r["completion_ids"]) for r in rows], self.pad_id, self.cfg.padding_free
            ),
            example_ids=torch.tensor([r["example_id"] for r in rows]),
        )


def _text(turn: dict[str, Any], number: int) -> str:
    value = turn.get("value")
    if not isinstance(value, str):
        raise ValueError(f"turn {number}: 'value' must be a string, got {value!r:.40}")
    return value


# ---- steering at generation time ---------------------------------------------------------


class SteerPromptData(Conditioning, align.PromptData):
    """``align generate ... data.format=steerlm_prompts data.steer=verbosity:4,...``"""

    format: Literal["steerlm_prompts"] = "steerlm_prompts"  # type: ignore[assignment]
    steer: dict[str, int] = Field(
        default_factory=dict,
        description="The attribute values to ask for, as a mapping or a 'name:value,...' string; a "
        "row's own 'attributes' column (mapping or string) overrides them for that row.",
    )
    attributes_column: str = "attributes"

    @field_validator("steer", mode="before")
    @classmethod
    def _label_string(cls, value: Any) -> Any:
        return parse_label(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _steer_in_range(self) -> SteerPromptData:
        for name, value in self.steer.items():
            if name in self.attributes:
                check_value(name, value, self)
        return self


@dataclass
class SteeredPrompts(align.PromptBatch):
    """Conditioned prompts for ``align generate``; a class of its own so that online algorithms
    (whose batch is ``align.PromptBatch``) do not offer ``steerlm_prompts`` as a data format."""


class SteerPromptFormat(align.TokenizedFormat):
    cfg: SteerPromptData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        column = self.cfg.columns.prompt
        prompt = align.text_or_messages(row.get(column), column, source, index)
        own = row.get(self.cfg.attributes_column)
        try:
            if isinstance(own, str):
                own = parse_label(own)
            if own is not None and not isinstance(own, dict):
                raise ValueError(
                    f"'{self.cfg.attributes_column}' must be a mapping or a 'name:value,...' label"
                )
            values = attribute_values({**self.cfg.steer, **(own or {})}, self.cfg)
            conditioned = render(
                conversation_of(prompt, self.cfg.system), format_label(values, self.cfg), self.cfg
            )
        except MissingAttribute as exc:
            raise align.row_error(
                source, index, f"{exc}; give it with data.steer=name:value,... or an 'attributes' column"
            ) from None
        except ValueError as exc:
            raise align.row_error(source, index, str(exc)) from None
        prompt_ids = self.encoder.encode_prompt(conditioned)
        status, prompt_ids, _ = self.encoder.fit(prompt_ids, [])
        record = {**row, self.cfg.attributes_column: values}  # the output rows say what was asked
        return {"prompt_ids": prompt_ids, "row_json": json.dumps(record), "status": status}

    def collate(self, rows: list[dict[str, Any]]) -> SteeredPrompts:
        return SteeredPrompts(align.prompt_rows(rows, self.cfg.columns.prompt))
