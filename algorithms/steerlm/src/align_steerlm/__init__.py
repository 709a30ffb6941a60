"""align-steerlm: SteerLM (Dong et al., 2023) — attribute-conditioned SFT and steering.

- ``align annotate``: label an SFT dataset with an attribute model's predictions (the model is
  ``reward_regression``'s, one head per attribute);
- ``--algo steerlm``: SFT with the answer's attribute values written into the prompt
  (``name:value,...``, NeMo-Aligner's layout or a chat template), loss on the answer only;
- ``align generate ... data.format=steerlm_prompts data.steer=verbosity:4,...``: prompts
  conditioned the same way on the values asked for.

Data: the ``steerlm`` format reads NeMo-Aligner's SteerLM JSONL and plain rows with an
``attributes`` mapping (see ``align_steerlm.data``). docs/algorithms/steerlm.md has it all.
"""

from typing import Any

import align
from align_steerlm import annotate
from align_steerlm.algorithm import SteerLM, SteerLMConfig
from align_steerlm.conditioning import (
    HELPSTEER_ATTRIBUTES,
    Conditioning,
    Conversation,
    MissingAttribute,
    Turn,
    attribute_values,
    clip_round,
    conversation_of,
    format_label,
    parse_label,
    render,
)
from align_steerlm.data import (
    SteerColumns,
    SteeredPrompts,
    SteeredTokens,
    SteerLMData,
    SteerLMFormat,
    SteerPromptData,
    SteerPromptFormat,
)

__all__ = [
    "HELPSTEER_ATTRIBUTES",
    "Conditioning",
    "Conversation",
    "MissingAttribute",
    "SteerColumns",
    "SteerLM",
    "SteerLMConfig",
    "SteerLMData",
    "SteerLMFormat",
    "SteerPromptData",
    "SteerPromptFormat",
    "SteeredPrompts",
    "SteeredTokens",
    "Turn",
    "attribute_values",
    "clip_round",
    "conversation_of",
    "format_label",
    "parse_label",
    "render",
]


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(SteerLMConfig, batch=SteeredTokens, data_format="steerlm")(SteerLM)


@align.hookimpl
def register_data_formats(register: align.Register) -> None:
    register(SteerLMData, batch=SteeredTokens)(SteerLMFormat)
    register(SteerPromptData, batch=SteeredPrompts)(SteerPromptFormat)


@align.hookimpl
def register_commands(add_command: Any) -> None:
    add_command(
        "annotate",
        "label an SFT dataset with an attribute model's predictions (SteerLM)",
        annotate.arguments,
        annotate.run,
    )
