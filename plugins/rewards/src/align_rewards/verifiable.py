"""Verifiable rewards: checkable properties of a completion, no model involved.

Each is a batch function usable through the ``function`` reward
(``path: align_rewards:exact_match``, options in ``kwargs``) and a named reward with a typed
config (``{name: exact_match, answer_key: answer}``): the same code either way.

- ``exact_match``: the completion's final answer equals the row's reference answer.
- ``regex``: the completion matches one or several patterns.
- ``length``: how close the completion's length is to a target, or whether it is in a band.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, Literal

import align

Graded = Literal["none", "numeric", "chars"]
RegexScore = Literal["all", "any", "fraction"]
LengthUnit = Literal["chars", "words", "bytes", "tokens"]

GRADED: tuple[str, ...] = ("none", "numeric", "chars")
REGEX_SCORES: tuple[str, ...] = ("all", "any", "fraction")
LENGTH_UNITS: tuple[str, ...] = ("chars", "words", "bytes", "tokens")

# A number as people write one: -3, 2.5, 1,000 (thousands commas), +7.
NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?|[-+]?\.\d+")


# ---- exact_match ------------------------------------------------------------------------


def exact_match(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    rows: Sequence[dict[str, Any]],
    *,
    answer_key: str = "answer",
    marker: str | None = None,
    graded: Graded = "none",
    case_sensitive: bool = False,
) -> list[float]:
    """1.0 where the completion's final answer equals ``row[answer_key]`` after normalisation,
    else 0.0 (or partial credit with ``graded``). The final answer is the text after the last
    ``marker`` (e.g. "####" or "answer:"), or, without a marker, the last number."""
    _choose("graded", graded, GRADED)
    return [
        answer_score(
            final_answer(align.message_text(completion), marker),
            reference_answer(row, answer_key),
            graded,
            case_sensitive,
        )
        for completion, row in zip(completions, rows, strict=True)
    ]


def final_answer(text: str, marker: str | None = None) -> str | None:
    """The text after the last ``marker`` (case-insensitive; up to the end of that line), or the
    last number in ``text`` when there is no marker. None when there is nothing to read."""
    if marker is None:
        numbers = NUMBER.findall(text)
        return numbers[-1] if numbers else None
    at = text.lower().rfind(marker.lower())
    if at < 0:
        return None
    rest = text[at + len(marker) :].strip()
    answer = rest.splitlines()[0].strip() if rest else ""
    return answer or None


def reference_answer(row: dict[str, Any], answer_key: str) -> list[str]:
    """The accepted answers of a row: one value, or a list of them."""
    if answer_key not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise align.DataError(
            f"the row has no '{answer_key}' field (its fields: {keys}); set answer_key to the field "
            "holding the reference answer"
        )
    value = row[answer_key]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def normalize(text: str, case_sensitive: bool = False) -> str:
    """Whitespace collapsed, a trailing full stop dropped, lower case unless case-sensitive."""
    text = " ".join(text.split()).rstrip(".").strip()
    return text if case_sensitive else text.lower()


def as_number(text: str) -> float | None:
    """``text`` as a number when it is exactly one (thousands commas allowed), else None."""
    return float(text.replace(",", "")) if NUMBER.fullmatch(text.strip()) else None


def answer_score(answer: str | None, references: list[str], graded: str, case_sensitive: bool) -> float:
    """The best score of ``answer`` against any accepted reference."""
    if answer is None:
        return 0.0
    return max(_score_one(answer, ref, graded, case_sensitive) for ref in references)


def _score_one(answer: str, reference: str, graded: str, case_sensitive: bool) -> float:
    got, want = normalize(answer, case_sensitive), normalize(reference, case_sensitive)
    got_number, want_number = as_number(got), as_number(want)
    numeric = got_number is not None and want_number is not None
    if got == want or (numeric and got_number == want_number):
        return 1.0
    if graded == "numeric" and got_number is not None and want_number is not None:
        return 1.0 / (1.0 + abs(got_number - want_number))
    if graded == "chars":
        return char_overlap(got, want)
    return 0.0


def char_overlap(got: str, want: str) -> float:
    """The fraction of positions where two strings hold the same character, over the longer one's
    length: "25" vs "26" -> 0.5, "abc" vs "ab" -> 2/3."""
    longest = max(len(got), len(want))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(got, want, strict=False)) / longest


# ---- regex ------------------------------------------------------------------------------


def regex(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    rows: Sequence[dict[str, Any]],
    *,
    pattern: str | list[str],
    score: RegexScore = "all",
    fullmatch: bool = False,
    ignore_case: bool = False,
) -> list[float]:
    """Per completion: ``all`` -> 1.0 when every pattern matches, ``any`` -> when one does,
    ``fraction`` -> the fraction of patterns that match. ``fullmatch`` requires a pattern to
    match the whole (stripped) completion instead of somewhere in it."""
    _choose("score", score, REGEX_SCORES)
    compiled = compile_patterns(pattern, ignore_case)
    results = []
    for completion in completions:
        text = align.message_text(completion)
        target = text.strip() if fullmatch else text
        hits = [bool(p.fullmatch(target) if fullmatch else p.search(target)) for p in compiled]
        if score == "fraction":
            results.append(sum(hits) / len(hits))
        else:
            results.append(float(all(hits) if score == "all" else any(hits)))
    return results


def compile_patterns(pattern: str | list[str], ignore_case: bool = False) -> list[re.Pattern[str]]:
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise ValueError("pattern: give at least one regular expression")
    return [_compile(p, re.IGNORECASE if ignore_case else 0) for p in patterns]


@functools.lru_cache(maxsize=256)
def _compile(pattern: str, flags: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None


# ---- length -----------------------------------------------------------------------------


def length(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    rows: Sequence[dict[str, Any]],
    *,
    target: int | None = None,
    band: Sequence[int] | None = None,
    unit: LengthUnit = "chars",
    tokenizer: str | None = None,
) -> list[float]:
    """With ``target``: ``-|len - target| / target`` (0 at the target, -1 at empty or twice it).
    With ``band: [low, high]``: 1.0 when ``low <= len <= high``, else 0.0. ``unit``: characters,
    whitespace-separated words, UTF-8 bytes (the tokens of the embedded tiny model's byte
    tokenizer) or ``tokens`` of the HF tokenizer at ``tokenizer``."""
    check_length_options(target, band, unit, tokenizer)
    counter = length_counter(unit, tokenizer)
    sizes = [counter(align.message_text(c)) for c in completions]
    if band is not None:
        low, high = band
        return [float(low <= size <= high) for size in sizes]
    assert target is not None
    return [-abs(size - target) / target for size in sizes]


def check_length_options(
    target: int | None, band: Sequence[int] | None, unit: str, tokenizer: str | None
) -> None:
    _choose("unit", unit, LENGTH_UNITS)
    if (target is None) == (band is None):
        raise ValueError("give exactly one of target (a length) or band ([low, high])")
    if target is not None and target <= 0:
        raise ValueError(f"target must be a positive length, got {target}")
    if band is not None and (len(band) != 2 or not 0 <= band[0] <= band[1]):
        raise ValueError(f"band must be [low, high] with 0 <= low <= high, got {list(band)}")
    if unit == "tokens" and not tokenizer:
        raise ValueError("unit 'tokens' needs tokenizer: the path or name of an HF tokenizer")


def length_counter(unit: str, tokenizer: str | None = None) -> Any:
    """A function from text to its length in ``unit``."""
    if unit == "words":
        return lambda text: len(text.split())
    if unit == "bytes":
        return lambda text: len(text.encode("utf-8"))
    if unit == "tokens":
        assert tokenizer is not None
        loaded = load_tokenizer(tokenizer)
        return lambda text: len(loaded(text, add_special_tokens=False)["input_ids"])
    return len


@functools.cache
def load_tokenizer(source: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise align.ConfigError(
            "length in tokens needs transformers: pip install 'align-rewards[tokens]'"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise align.ConfigError(f"reward.tokenizer: cannot load a tokenizer from '{source}': {exc}") from None


def _choose(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
