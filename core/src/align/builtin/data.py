"""Built-in data formats: ``sft`` (prompt/completion or chat messages) and ``preference``
(prompt/chosen/rejected, plain or conversational).

Row rules, applied while loading and counted in the log:
- a prompt longer than ``max_prompt_length`` keeps its last tokens;
- a row whose prompt leaves no room for a completion within ``max_length`` is dropped;
- a longer row has its completion truncated (``overlong: truncate``) or is dropped (``drop``);
- a preference pair whose chosen equals its rejected is skipped (it carries no signal);
- a missing or mistyped field, or an empty completion, is an error naming the file and row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import datasets
import torch
from pydantic import Field

from align.batches import PairedTokens, SFTTokens
from align.config import DataConfig, StrictConfig
from align.datafiles import load_table, row_error, text_or_messages, undecodable_row
from align.errors import DataError
from align.hookspecs import hookimpl
from align.layout import lay_out
from align.registry import Register

Text = str | list[dict[str, Any]]


class PreferenceColumns(StrictConfig):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    chosen_reward: str | None = Field(None, description="Reward-model score of chosen (RPO losses).")
    rejected_reward: str | None = None


class PreferenceData(DataConfig):
    format: Literal["preference"] = "preference"
    columns: PreferenceColumns = PreferenceColumns()


class SFTColumns(StrictConfig):
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


class SFTData(DataConfig):
    format: Literal["sft"] = "sft"
    columns: SFTColumns = SFTColumns()


class Encoder:
    """Prompt and completion -> token ids, through the chat template for conversations."""

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg

    def _chat(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        text: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text

    def encode_prompt(self, prompt: Text) -> list[int]:
        """A prompt alone, ready for generation: a conversation ends with the generation prompt."""
        if isinstance(prompt, str):
            ids: list[int] = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            return ids
        return list(
            self.tokenizer(self._chat(prompt, generation_prompt=True), add_special_tokens=False)["input_ids"]
        )

    def encode(self, prompt: Text, completion: Text) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
            completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            return prompt_ids, completion_ids
        prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion_msgs = (
            completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        )
        prompt_text = self._chat(prompt_msgs, generation_prompt=True)
        full_text = self._chat(prompt_msgs + completion_msgs, generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently inside the conversation")
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tok(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        return prompt_ids, self._end_at_eos(completion_ids)

    def _end_at_eos(self, completion_ids: list[int]) -> list[int]:
        """End a templated completion at its EOS. Templates such as ChatML put a newline after
        the end-of-turn token (``<|im_end|>\\n``); appending another EOS after it would teach the
        model to write ``<|im_end|>\\n<|im_end|>``, so whitespace after the last EOS is dropped."""
        eos = self.tokenizer.eos_token_id
        if eos in completion_ids:
            last = len(completion_ids) - 1 - completion_ids[::-1].index(eos)
            if not self.tokenizer.decode(completion_ids[last + 1 :]).strip():
                return completion_ids[: last + 1]
        return [*completion_ids, eos]

    def fit(self, prompt: list[int], completions: list[list[int]]) -> tuple[str, list[int], list[list[int]]]:
        """Apply the length rules; returns (status, prompt, completions)."""
        cfg = self.cfg
        status = "ok"
        if cfg.max_prompt_length and len(prompt) > cfg.max_prompt_length:
            prompt, status = prompt[-cfg.max_prompt_length :], "truncated"
        room = cfg.max_length - len(prompt)
        if room <= 0:
            return "dropped_long_prompt", prompt, completions
        if any(len(c) > room for c in completions):
            if cfg.overlong == "drop":
                return "dropped_overlong", prompt, completions
            completions, status = [c[:room] for c in completions], "truncated"
        return status, prompt, completions


def prompt_and_completion(
    row: Mapping[str, Any], prompt: str, completion: str, source: str, index: int
) -> tuple[Text, Text]:
    """The row's prompt and completion, read from the columns named ``prompt`` and
    ``completion``: each a string or chat messages (``text_or_messages``), and the completion not
    empty (an empty string or a last message without content leaves nothing to train on). Any
    other value is the ``DataError`` naming the file, the row and the column."""
    prompt_value = text_or_messages(row.get(prompt), prompt, source, index)
    completion_value = text_or_messages(row.get(completion), completion, source, index)
    if not completion_value:
        raise row_error(source, index, f"'{completion}' is empty")
    if isinstance(completion_value, list) and not completion_value[-1]["content"]:
        raise row_error(source, index, f"'{completion}' is empty (its last message has no content)")
    return prompt_value, completion_value


class TokenizedFormat:
    """Shared loading: files -> validated, tokenized rows with a ``status`` per row.

    A subclass writes ``tokenize_row`` and ``collate``. ``load`` adds ``example_id`` (the row's
    position in its split, across the split's files in order), counts every status but ``ok``
    per split (``stats``: ``train_truncated``...) and leaves out rows whose status starts with
    ``dropped`` or ``skipped``. The contract in full: docs/writing-a-plugin.md, "A data format".
    """

    columns_out: tuple[str, ...] = ()

    def __init__(self, cfg: DataConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.encoder = Encoder(tokenizer, cfg)
        self.counts: dict[str, int] = {}
        self.columns_of: dict[str, list[str]] = {}  # each file's columns, for error messages
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        """One row of ``source`` (keyed by the file's own columns; ``index`` is 0-based) -> its
        tokenized columns, the same keys for every row, plus a ``status``; raise
        ``row_error(source, index, message)`` for a malformed row."""
        raise NotImplementedError

    def load(self, split: str) -> datasets.Dataset | None:
        spec = self.cfg.train if split == "train" else self.cfg.eval
        if spec is None:
            return None
        parts = []
        offset = 0
        sources = [spec] if isinstance(spec, str) else spec
        for source in sources:
            table = load_table(source)
            parts.append(self._tokenize(table, source, offset))
            offset += len(table)
        merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        self.check_loaded(split, merged, sources)
        statuses = merged["status"]
        for status in set(statuses) - {"ok"}:
            self.counts[f"{split}_{status}"] = statuses.count(status)
        kept = merged.filter(
            lambda row: not row["status"].startswith(("dropped", "skipped")), keep_in_memory=True
        )
        if len(kept) == 0:
            raise self._nothing_left(split, sources, statuses)
        return kept.remove_columns("status").with_format(None)

    def _tokenize(self, table: datasets.Dataset, source: str, offset: int) -> datasets.Dataset:
        self.columns_of[source] = list(table.column_names)
        try:
            return table.map(
                lambda row, i: {**self.tokenize_row(row, source, i), "example_id": offset + i},
                with_indices=True,
                remove_columns=table.column_names,
                load_from_cache_file=False,
                keep_in_memory=True,
            )
        except UnicodeDecodeError:  # a Parquet/Arrow file may hold bytes that are not UTF-8
            raise DataError(undecodable_row(table, source)) from None

    def check_loaded(self, split: str, rows: datasets.Dataset, sources: list[str]) -> None:
        """For formats to check a whole split once it is tokenized, before the rows that are
        dropped or skipped are filtered out (``status`` column); raise ``align.DataError``."""

    def _nothing_left(self, split: str, sources: list[str], statuses: list[str]) -> DataError:
        """No row survived the length rules: say why, with the counts, naming the key to change."""
        limit = self.cfg.max_length
        reasons = {
            "dropped_long_prompt": f"dropped: the prompt leaves no room within data.max_length={limit}",
            "dropped_overlong": f"dropped: longer than data.max_length={limit} (data.overlong: drop)",
            "skipped_identical_pair": "skipped: chosen equals rejected",
            "skipped_unlabelled": "skipped: no label",
        }
        counts = ", ".join(
            f"{statuses.count(status)} {reasons.get(status, status)}" for status in sorted(set(statuses))
        )
        advice = " Raise data.max_length." if any(s.startswith("dropped") for s in statuses) else ""
        return DataError(
            f"data.{split}: no usable rows: none of the {len(statuses)} rows of {', '.join(sources)} "
            f"is left (0 kept; {counts}).{advice}"
        )

    def stats(self) -> dict[str, int]:
        return dict(self.counts)


class PreferenceFormat(TokenizedFormat):
    cfg: PreferenceData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        c = self.cfg.columns
        prompt, chosen = prompt_and_completion(row, c.prompt, c.chosen, source, index)
        _, rejected = prompt_and_completion(row, c.prompt, c.rejected, source, index)
        gap = self._reward_gap(row, source, index)
        if chosen == rejected:
            nothing: list[int] = []
            return {
                "prompt_ids": nothing,
                "chosen_ids": nothing,
                "rejected_ids": nothing,
                "reward_gap": gap,
                "status": "skipped_identical_pair",
            }
        prompt_ids, chosen_ids = self.encoder.encode(prompt, chosen)
        _, rejected_ids = self.encoder.encode(prompt, rejected)
        status, prompt_ids, (chosen_ids, rejected_ids) = self.encoder.fit(
            prompt_ids, [chosen_ids, rejected_ids]
        )
        return {
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids,
            "reward_gap": gap,
            "status": status,
        }

    def _reward_gap(self, row: dict[str, Any], source: str, index: int) -> float | None:
        c = self.cfg.columns
        if c.chosen_reward is None or c.rejected_reward is None:
            return None
        values = [row.get(c.chosen_reward), row.get(c.rejected_reward)]
        if not all(isinstance(v, (int, float)) for v in values):
            raise row_error(
                source, index, f"'{c.chosen_reward}'/'{c.rejected_reward}' must be numbers, got {values}"
            )
        return float(values[0]) - float(values[1])  # type: ignore[arg-type]

    def collate(self, rows: list[dict[str, Any]]) -> PairedTokens:
        sequences = [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
        sequences += [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
        gaps = [r.get("reward_gap") for r in rows]
        return PairedTokens(
            tokens=lay_out(sequences, self.pad_id, self.cfg.padding_free),
            num_pairs=len(rows),
            example_ids=torch.tensor([r["example_id"] for r in rows]),
            reward_gap=None if None in gaps else torch.tensor(gaps, dtype=torch.float32),
        )


class SFTFormat(TokenizedFormat):
    cfg: SFTData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        c = self.cfg.columns
        messages = row.get(c.messages)
        if messages is not None:
            conversation = text_or_messages(messages, c.messages, source, index)
            if not isinstance(conversation, list) or conversation[-1]["role"] != "assistant":
                raise row_error(source, index, f"'{c.messages}' must end with an assistant message")
            if not conversation[-1]["content"]:
                raise row_error(source, index, f"'{c.messages}' ends with an empty assistant message")
            prompt: Text = conversation[:-1]
            completion: Text = conversation[-1:]
        else:
            prompt, completion = prompt_and_completion(row, c.prompt, c.completion, source, index)
        prompt_ids, completion_ids = self.encoder.encode(prompt, completion)
        status, prompt_ids, (completion_ids,) = self.encoder.fit(prompt_ids, [completion_ids])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "status": status}

    def collate(self, rows: list[dict[str, Any]]) -> SFTTokens:
        sequences = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
        return SFTTokens(
            tokens=lay_out(sequences, self.pad_id, self.cfg.padding_free),
            example_ids=torch.tensor([r["example_id"] for r in rows]),
        )


@hookimpl
def register_data_formats(register: Register) -> None:
    register(PreferenceData, batch=PairedTokens)(PreferenceFormat)
    register(SFTData, batch=SFTTokens)(SFTFormat)
