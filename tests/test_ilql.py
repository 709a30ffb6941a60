"""ILQL: each loss term against a hand computation on fixed tiny tensors, the Polyak update of
the target heads, the logits hook of the hf engine against the argmax computed by hand, engines
that cannot steer refusing to, the ``rewarded`` data format's errors, and, on the shipped task,
ILQL's held-out reward above the base model's and above SFT's on the same rows."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    ALIGN,
    QUIET_TRAINER,
    TINY_MODEL,
    assert_same_weights,
    assert_user_error,
    load_weights,
    read_metrics,
    run_cli,
    subprocess_env,
    write_jsonl,
    write_yaml,
)
from safetensors.torch import load_file

import align
from align.plugins import load_plugins
from align_ilql import ILQLHeads, SteeringHook, objectives
from align_ilql.data import RewardedData, RewardedFormat

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "examples" / "ilql"


@pytest.fixture(scope="module")
def plugins() -> align.Plugins:
    return load_plugins()


# ---- the loss terms by hand --------------------------------------------------------------

MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_td_targets_put_the_reward_on_the_last_token_and_discount_the_next_value() -> None:
    values = torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.4, 7.0]], requires_grad=True)  # 7.0: padding
    targets = objectives.td_targets(values, torch.tensor([1.0, -1.0]), MASK, gamma=0.9)
    expected = torch.tensor([[0.9 * 0.2, 0.9 * 0.9, 1.0 + 0.0], [0.9 * 0.4, -1.0 + 0.0, 0.0]])
    assert torch.allclose(targets, expected)
    assert not targets.requires_grad  # y is a fixed target: V is not trained through the Q loss


def test_q_loss_sums_the_heads_mean_squared_errors() -> None:
    targets = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    q1 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 3.0, 9.0]])  # errors 1,0,4 | 0,4 (9 is padding)
    q2 = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])  # errors 0,0,0 | 1,0
    loss = objectives.q_loss([q1, q2], targets, MASK)
    assert float(loss) == pytest.approx((1 + 0 + 4 + 0 + 4) / 5 + 1 / 5)


def test_expectile_loss_weighs_under_and_over_estimates_by_tau() -> None:
    diff = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 100.0]])  # u = Q̄ - V; 100 is padding
    loss = objectives.expectile_loss(diff, MASK, tau=0.7)
    expected = (0.7 * 1 + 0.3 * 4 + 0.7 * 0.25 + 0.3 * 1 + 0.7 * 9) / 5
    assert float(loss) == pytest.approx(expected)
    # tau = 0.5: half the mean squared error
    assert float(objectives.expectile_loss(diff, MASK, tau=0.5)) == pytest.approx(
        (1 + 4 + 0.25 + 1 + 9) / 5 / 2
    )


def test_cql_loss_is_the_cross_entropy_of_q_over_the_vocabulary() -> None:
    q = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]]])  # [2 sequences, 1 token, vocab 3]
    actions = torch.tensor([[0], [2]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    one_head = ((lse - 1.0) + math.log(3.0)) / 2
    assert float(objectives.cql_loss([q], actions, mask)) == pytest.approx(one_head, rel=1e-6)
    assert float(objectives.cql_loss([q, q], actions, mask)) == pytest.approx(2 * one_head, rel=1e-6)


def test_awac_weights_are_clipped_exponentials_without_gradient() -> None:
    advantages = torch.tensor([0.5, -1.0, 10.0], requires_grad=True)
    weights = objectives.awac_weights(advantages, beta=2.0, max_weight=20.0)
    assert torch.allclose(weights, torch.tensor([math.e, math.exp(-2.0), 20.0]))
    assert not weights.requires_grad
    assert torch.equal(objectives.awac_weights(advantages, beta=0.0, max_weight=20.0), torch.ones(3))
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    loss = objectives.policy_loss(logps, weights[None], torch.ones(1, 3, dtype=torch.bool))
    assert float(loss) == pytest.approx((math.e * 1 + math.exp(-2) * 2 + 20 * 3) / 3)


def constant_heads(target_q: list[list[float]], value: float, vocab: int = 3, hidden: int = 4) -> ILQLHeads:
    """Heads whose outputs are their last layers' biases: the same for every hidden state."""
    heads = ILQLHeads(hidden_size=hidden, vocab_size=vocab)
    with torch.no_grad():
        for param in heads.parameters():
            param.zero_()
        for head, bias in zip(heads.target_q, target_q, strict=True):
            head[2].bias.copy_(torch.tensor(bias))
        heads.v[2].bias.fill_(value)
    return heads


def test_the_v_target_is_the_minimum_of_the_target_heads() -> None:
    heads = constant_heads([[1.0, 5.0, 2.0], [3.0, 4.0, 0.0]], value=0.5)
    qs, target, values = heads(torch.randn(1, 2, 4))
    assert torch.equal(target[0, 0], torch.tensor([1.0, 4.0, 0.0]))
    assert torch.equal(values, torch.full((1, 2), 0.5))
    assert all(torch.equal(q, torch.zeros(1, 2, 3)) for q in qs)  # the online heads: all zero
    assert torch.allclose(heads.advantage(torch.randn(2, 4)), torch.tensor([0.5, 3.5, -0.5]).expand(2, 3))


def test_polyak_moves_the_targets_toward_the_online_heads() -> None:
    heads = ILQLHeads(hidden_size=4, vocab_size=3)
    with torch.no_grad():
        for p in heads.q.parameters():
            p.fill_(1.0)
        for p in heads.target_q.parameters():
            p.fill_(3.0)
    heads.polyak(0.25)
    assert all(
        torch.allclose(p, torch.full_like(p, 0.75 * 3 + 0.25 * 1)) for p in heads.target_q.parameters()
    )
    assert not any(p.requires_grad for p in heads.target_q.parameters())


def test_steered_logits_add_beta_times_the_advantage() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -5.0]])  # one logit more than the heads' vocabulary
    out = objectives.steered_logits(logits, torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5]]), beta=2.0)
    assert torch.equal(out, torch.tensor([[1.0, 2.0, -1.0, -5.0]]))


# ---- the hf engine's logits hook ---------------------------------------------------------

PROMPT = [5, 6, 7, 8]
SMALL = align.TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A small model with a peaked output (no near-ties), saved for an engine to load."""
    from align_hf import byte_tokenizer, tiny_llama

    model = tiny_llama(SMALL, len(byte_tokenizer()), "eager")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    folder = tmp_path_factory.mktemp("policy")
    model.save_pretrained(folder)
    return model.eval(), folder


def hf_engine(folder: Path, hook: align.LogitsHook | None) -> Any:
    from align_hf import HFEngine, HFEngineConfig

    spec = align.EngineSpec(
        model_dir=folder, eos_token_id=2, pad_token_id=0, max_model_len=32, logits_hook=hook
    )
    return HFEngine(HFEngineConfig(device="cpu"), spec)


def greedy_tokens(engine: Any, max_tokens: int) -> list[int]:
    sampling = align.SamplingConfig(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens: list[int] = engine.generate([PROMPT], sampling)[0][0].token_ids
    return tokens


def test_the_hook_turns_the_argmax_to_the_token_it_favours(engine_model: tuple[Any, Path]) -> None:
    model, folder = engine_model
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0, -1]
    best, second = logits.topk(2).indices.tolist()
    gap = float(logits[best] - logits[second])
    beta = 2.0
    favour = [0.0] * logits.shape[-1]
    favour[second] = (gap + 1.0) / beta  # β (Q̄ - V) lifts `second` 1.0 above `best`
    hook = SteeringHook(
        constant_heads([favour, favour], 0.0, vocab=logits.shape[-1], hidden=SMALL.hidden_size), beta
    )
    assert greedy_tokens(hf_engine(folder, None), 1) == [best]
    assert greedy_tokens(hf_engine(folder, hook), 1) == [second]


def test_the_hook_reads_the_hidden_state_of_each_step(engine_model: tuple[Any, Path]) -> None:
    """Greedy decoding with β (Q̄ - V) of heads that depend on the hidden state, step by step by
    hand (a full forward pass each step, no cache), equals the engine's."""
    model, folder = engine_model
    torch.manual_seed(3)
    heads = ILQLHeads(hidden_size=SMALL.hidden_size, vocab_size=model.config.vocab_size)
    beta = 50.0
    tokens = list(PROMPT)
    with torch.no_grad():
        for _ in range(4):
            out = model(torch.tensor([tokens]), output_hidden_states=True)
            steered = out.logits[0, -1] + beta * heads.advantage(out.hidden_states[-1][0, -1])
            tokens.append(int(steered.argmax()))
    by_hand = tokens[len(PROMPT) :]
    assert greedy_tokens(hf_engine(folder, SteeringHook(heads, beta)), 4) == by_hand
    assert greedy_tokens(hf_engine(folder, None), 4) != by_hand  # the heads did change something


@pytest.mark.parametrize("name", ["vllm", "trtllm"])
def test_engines_that_cannot_steer_refuse_a_logits_hook(
    name: str, plugins: align.Plugins, tmp_path: Path
) -> None:
    entry = plugins.registry.get("rollout_engine", name)
    spec = align.EngineSpec(model_dir=tmp_path, logits_hook=lambda hidden, logits: logits)
    with pytest.raises(
        align.EngineError, match=f"rollout engine '{name}'.*cannot steer.*engines that can: hf"
    ):
        align.build_engine(entry.config(), plugins.registry, spec)


def test_generate_finds_the_heads_of_a_final_folder_or_a_checkpoint(tmp_path: Path) -> None:
    from align_ilql import steering_for

    heads = ILQLHeads(hidden_size=4, vocab_size=3)
    heads.save(tmp_path / "step_2", beta=2.5)  # a checkpoint: heads beside model/
    (tmp_path / "step_2" / "model").mkdir()
    for folder in (tmp_path / "step_2", tmp_path / "step_2" / "model"):
        hook = steering_for(folder)
        assert hook is not None and hook.beta == 2.5
        assert all(
            torch.equal(a, b) for a, b in zip(hook.heads.parameters(), heads.parameters(), strict=True)
        )
    assert steering_for(tmp_path) is None


def test_generate_with_an_engine_that_cannot_steer_is_a_user_error(
    engine_model: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from align_hf import byte_tokenizer

    model, folder = engine_model
    final = tmp_path / "final"  # what an ILQL run writes: the policy, its tokenizer, the heads
    shutil.copytree(folder, final)
    byte_tokenizer().save_pretrained(final)
    ILQLHeads(SMALL.hidden_size, model.config.vocab_size).save(final, beta=1.0)
    prompts = str(TASK / "prompts_eval.jsonl")
    result = run_cli(
        capsys,
        "generate",
        "--model",
        str(final),
        "--prompts",
        prompts,
        "--out",
        str(tmp_path / "o.jsonl"),
        "--engine",
        "vllm",
    )
    assert_user_error(result, "rollout engine 'vllm'", "cannot steer", "engines that can: hf")
    assert not (tmp_path / "o.jsonl").exists()


# ---- the rewarded data format ------------------------------------------------------------


@pytest.mark.parametrize(
    ("reward", "fragment"),
    [
        (None, "'reward' is missing"),
        ("high", "must be a number"),
        (True, "must be a number"),
        (math.inf, "finite"),
    ],
)
def test_a_bad_reward_names_the_file_and_row(tmp_path: Path, reward: Any, fragment: str) -> None:
    from align_hf import byte_tokenizer

    rows: list[dict[str, Any]] = [
        {"prompt": "a", "completion": "b", "reward": 1.0},
        {"prompt": "a", "completion": "b"},
    ]
    if reward is not None:
        rows[1]["reward"] = reward
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = RewardedFormat(RewardedData(train=str(path), max_length=16), byte_tokenizer())
    with pytest.raises(align.DataError, match=rf"rows\.jsonl, row 2: .*{fragment}"):
        data.load("train")


def test_a_batch_lines_up_actions_with_the_backends_scored_tokens(tmp_path: Path) -> None:
    from align_hf import byte_tokenizer

    rows = [
        {"prompt": "ab", "completion": "xyz", "reward": 1.0},
        {"prompt": "c", "completion": "w", "reward": -0.5},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = RewardedFormat(RewardedData(train=path, max_length=16), byte_tokenizer())
    loaded = data.load("train")
    batch = data.collate([loaded[0], loaded[1]])
    assert batch.rewards.tolist() == [1.0, -0.5]
    assert batch.action_mask.sum(1).tolist() == [4, 2]  # the completion and its EOS
    scored = batch.tokens.input_ids[:, 1:][batch.tokens.loss_mask[:, 1:]]
    assert scored.tolist() == batch.actions[batch.action_mask].tolist()


# ---- learning from the rewards on the shipped task ---------------------------------------

STEPS = 150


def task_config(algo: str, output_dir: Path, **extra: Any) -> dict[str, Any]:
    """The shipped examples' run, small: the tiny model of the other tests, no evaluation."""
    config: dict[str, Any] = {
        "algo": algo,
        "output_dir": str(output_dir),
        "seed": 0,
        "model": TINY_MODEL,
        "data": {
            "format": "rewarded" if algo == "ilql" else "sft",
            "train": str(TASK / "train.jsonl"),
            "max_length": 16,
        },
        "trainer": {"max_steps": STEPS, "batch_size": 32, **QUIET_TRAINER},
        "optim": {"lr": 3e-3},
        **extra,
    }
    return config


def held_out_reward(capsys: pytest.CaptureFixture[str], model: str, out: Path, *extra: str) -> float:
    result = run_cli(
        capsys,
        "generate",
        "--model",
        model,
        "--prompts",
        str(TASK / "prompts_eval.jsonl"),
        "--reward",
        "exact_match",
        "--out",
        str(out),
        "temperature=0",
        "max_tokens=4",
        *extra,
    )
    assert result.code == 0, result.err
    rewards = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    assert len(rewards) == 64
    return sum(rewards) / len(rewards)


def test_ilql_beats_the_base_model_and_sft_on_the_same_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """70% of the rows answer "4xx" (reward 0), 30% "444" (reward 1): SFT imitates the majority,
    ILQL's heads steer its greedy answers to the rewarded one."""
    ilql = run_cli(
        capsys,
        "run",
        write_yaml(tmp_path / "ilql.yaml", task_config("ilql", tmp_path / "ilql", target_update_rate=0.05)),
    )
    assert ilql.code == 0, ilql.err
    sft = run_cli(capsys, "run", write_yaml(tmp_path / "sft.yaml", task_config("sft", tmp_path / "sft")))
    assert sft.code == 0, sft.err
    final = tmp_path / "ilql" / "final"
    assert (final / "ilql_heads.safetensors").is_file() and json.loads((final / "ilql.json").read_text())[
        "beta"
    ] == 4.0

    tiny = [f"model.tiny.{key}={value}" for key, value in TINY_MODEL["tiny"].items()]
    base = held_out_reward(capsys, "tiny", tmp_path / "base.jsonl", *tiny)
    imitated = held_out_reward(capsys, str(tmp_path / "sft" / "final"), tmp_path / "sft.jsonl")
    steered = held_out_reward(capsys, str(final), tmp_path / "ilql.jsonl")
    unsteered = held_out_reward(capsys, str(final), tmp_path / "plain.jsonl", "logits_hook=false")
    assert base == 0.0
    assert imitated < 0.4 and unsteered < 0.4  # greedy answers follow the data's majority
    assert steered > 0.6, (steered, imitated)


# ---- resume after SIGKILL ----------------------------------------------------------------

# Steps 1-2 take a moment each; step 3 then "hangs" in its hook (logged, after the checkpoint of
# step 2) until the test kills the process.
SLOW_HOOK = """
import time

import align


@align.hookimpl
def on_step_end(run, step, metrics):
    if metrics.get("split") == "train":
        time.sleep(0.2 if step < 3 else 120)
"""


def resume_config(tmp_path: Path, out: Path) -> str:
    config = task_config("ilql", out, target_update_rate=0.3, awac_beta=1.0)
    config["data"]["eval"] = str(TASK / "eval.jsonl")
    config["trainer"] |= {
        "max_steps": 6,
        "batch_size": 8,
        "save_every": 2,
        "eval_every": 3,
        "lr_scheduler": "linear",
    }
    return write_yaml(tmp_path / f"{out.name}.yaml", config)


def test_a_killed_run_resumes_to_the_same_policy_and_heads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "slow_ilql_steps.py").write_text(textwrap.dedent(SLOW_HOOK))
    killed = tmp_path / "killed"
    config = resume_config(tmp_path, killed)
    env = subprocess_env([plugin_dir], ALIGN_PLUGIN_MODULES="slow_ilql_steps")
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen([*ALIGN, "run", config], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                rows = read_metrics(killed, "train") if (killed / "metrics.jsonl").exists() else []
                if (killed / "checkpoints" / "step_2").is_dir() and any(r["step"] == 3 for r in rows):
                    break
                time.sleep(0.1)
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert not (killed / "final").exists()
    initial = load_file(str(killed / "checkpoints" / "step_2" / "ilql_heads.safetensors"))

    assert run_cli(capsys, "run", config, "--resume").code == 0
    straight = tmp_path / "straight"
    result = run_cli(capsys, "run", resume_config(tmp_path, straight))
    assert result.code == 0, result.err

    assert_same_weights(load_weights(killed / "final"), load_weights(straight / "final"))
    heads = load_file(str(killed / "final" / "ilql_heads.safetensors"))
    assert_same_weights(heads, load_file(str(straight / "final" / "ilql_heads.safetensors")))
    assert not torch.equal(heads["target_q.0.0.weight"], initial["target_q.0.0.weight"])  # the targets moved
    for split in ("train", "eval"):
        resumed_rows, straight_rows = read_metrics(killed, split)[-3:], read_metrics(straight, split)[-3:]
        for a, b in zip(resumed_rows, straight_rows, strict=True):
            assert a["step"] == b["step"] and a["loss"] == b["loss"] and a["loss_v"] == b["loss_v"]
