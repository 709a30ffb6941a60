"""align-pytriton's reward server: a child server on free local ports, its scores equal to the
local `model` reward's, `align serve reward` stopping on a signal, no tritonserver left when
the run that started it is killed, and every fault (not up in time, dies mid-run, hangs,
answers the wrong shape, a transient failure) a user error naming the server.

One reward server is shared by the module (tritonserver starts in seconds, not milliseconds).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import DATA, QUIET_TRAINER, TINY_MODEL, head_jsonl, read_metrics, run_cli, write_yaml
from helpers.online import arith_config

import align
from align.loading import validate_run_config
from align_pytriton import (
    RemoteRewardConfig,
    RewardServerError,
    ServerStartError,
    ServerTimeout,
    ServerUnavailable,
)
from align_pytriton.client import ServerClient
from align_pytriton.launcher import free_ports, model_ready, wait_until_ready
from align_pytriton.reward import RemoteReward

REPO = Path(__file__).resolve().parents[1]
FAKE_SERVER = Path(__file__).resolve().parent / "pytriton_fake_server.py"
PROMPTS = ["What is 2+2?", "Say hi", [{"role": "user", "content": "Name a colour"}], "x" * 300, "7*6?"]
COMPLETIONS = ["4", "hello there", [{"role": "assistant", "content": "blue"}], "y", "It is 42."]


@pytest.fixture(scope="module")
def registry() -> align.Registry:
    return align.load_plugins().registry


def reward_cfg(registry: align.Registry, section: dict[str, Any]) -> align.RewardConfig:
    cfg = registry.get("reward", section["name"]).config.model_validate(section)
    assert isinstance(cfg, align.RewardConfig)
    return cfg


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory, registry: align.Registry) -> Path:
    """A tiny Bradley-Terry reward model after a few steps (its scores differ per text)."""
    tmp = tmp_path_factory.mktemp("rm")
    config = {
        "algo": "reward",
        "output_dir": str(tmp / "run"),
        "model": TINY_MODEL,
        "data": {
            "train": head_jsonl(DATA / "preference_train.jsonl", tmp / "train.jsonl", 32),
            "max_length": 64,
        },
        "trainer": {"max_steps": 3, "batch_size": 8, **QUIET_TRAINER},
        "optim": {"lr": 3e-3},
    }
    plugins = align.load_plugins()
    result = align.train(validate_run_config(config, plugins.registry), plugins)
    return Path(result.final_dir)


def serve_model(reward_model: Path, registry: align.Registry) -> align.RewardSource:
    """The `remote` reward serving the trained model from a child server (2 rows a request, so
    one call sends several requests at once)."""
    served = reward_cfg(registry, {"name": "model", "path": str(reward_model), "max_length": 64})
    return align.build_reward(RemoteRewardConfig(serve=served, batch_size=2, timeout_s=60), registry)


@pytest.fixture(scope="module")
def served_model(reward_model: Path, registry: align.Registry) -> Iterator[align.RewardSource]:
    """One server shared by the module's tests; none of them stops it."""
    remote = serve_model(reward_model, registry)
    yield remote
    remote.source.close()  # type: ignore[attr-defined]


@pytest.fixture
def own_served_model(reward_model: Path, registry: align.Registry) -> Iterator[align.RewardSource]:
    """A server of the test's own, for a test that kills it (test order is not guaranteed
    under xdist, so the shared one must survive every test)."""
    remote = serve_model(reward_model, registry)
    yield remote
    remote.source.close()  # type: ignore[attr-defined]


def test_remote_scores_equal_the_local_model_reward(
    served_model: align.RewardSource, reward_model: Path, registry: align.Registry
) -> None:
    local = align.build_reward(
        reward_cfg(registry, {"name": "model", "path": str(reward_model), "max_length": 64}), registry
    )
    expected = local(PROMPTS, COMPLETIONS)
    remote = served_model(PROMPTS, COMPLETIONS)
    assert remote.dtype == torch.float32 and remote.shape == (5,)
    assert expected.std() > 1e-4  # the rows score differently: equality means something
    torch.testing.assert_close(remote, expected, rtol=1e-5, atol=1e-5)
    assert served_model([], []).shape == (0,)


def test_the_child_server_listens_on_localhost_only(served_model: align.RewardSource) -> None:
    assert served_model(["p"], ["abcd"]).shape == (1,)  # the child server starts on first use
    client: ServerClient = served_model.source.client  # type: ignore[attr-defined]
    assert client.url.startswith("http://127.0.0.1:")
    assert model_ready(client.url, "reward", timeout_s=30)  # a loaded machine answers slowly
    port = int(client.url.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # the port is taken on 127.0.0.1 ...
        bind(("127.0.0.1", port))
    other = outside_address()
    if other is not None:  # ... and nobody listens on the machine's other address
        with pytest.raises(OSError):
            connect((other, port))


def bind(address: tuple[str, int]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(address)


def connect(address: tuple[str, int]) -> None:
    import socket

    with socket.create_connection(address, timeout=2):
        pass


def outside_address() -> str | None:
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outward interface
            address: str = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_an_online_run_scores_through_the_reward_server(
    served_model: align.RewardSource, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rejection sampling with `reward: {name: remote, url: ...}` on the shared server."""
    url = served_model.source.client.url  # type: ignore[attr-defined]
    out = tmp_path / "rs"
    config = arith_config(
        "rs",
        out,
        Path("tiny"),
        iterations=1,
        prompts_per_iteration=4,
        sampling={"n": 2},
        min_reward=-100.0,
        trainer={"batch_size": 8},
    )
    config["model"] = TINY_MODEL
    config["reward"] = {"name": "remote", "url": url}
    result = run_cli(capsys, "run", write_yaml(tmp_path / "rs.yaml", config))
    assert result.code == 0, result.err
    rollout = read_metrics(out, "rollout")[0]
    assert rollout["reward_mean"] != 0.0  # the reward model's scores, not a default
    assert read_metrics(out, "eval")[-1]["reward"] != 0.0


def test_a_server_that_dies_mid_run_is_named(own_served_model: align.RewardSource) -> None:
    served_model = own_served_model
    client: ServerClient = served_model.source.client  # type: ignore[attr-defined]
    assert served_model(["p"], ["abcd"]).shape == (1,)
    assert client.child is not None
    os.kill(client.child.process.pid, signal.SIGKILL)
    client.child.process.wait(10)
    with pytest.raises(
        RewardServerError, match=r"reward server \(child process \d+, .*\) died \(exit code -9\)"
    ) as info:
        served_model(["p"], ["abcd"])
    assert isinstance(info.value.__cause__, ServerUnavailable)


def test_remote_reward_config_needs_url_or_serve(registry: align.Registry) -> None:
    with pytest.raises(ValueError, match="exactly one of url"):
        RemoteRewardConfig()
    with pytest.raises(ValueError, match="must start with http://"):
        RemoteRewardConfig(url="grpc://127.0.0.1:8001")
    run = {
        "algo": "rs",
        "output_dir": "unused",
        "data": {"train": "p.jsonl"},
        "reward": {"name": "remote", "serve": {"name": "length", "target": 5}},
    }
    cfg = validate_run_config(run, registry)
    assert cfg.reward.serve.name == "length"  # type: ignore[attr-defined]  # widened to any installed reward


def test_a_server_gives_tritonserver_its_model_load_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTriton loads each model with a client whose requests time out after 60 s; a loaded
    machine exceeded that and the server exited. ``serve`` raises it to the settings' value."""
    import pytriton.client.client as pytriton_client
    from pytriton.client import ModelClient

    from align_pytriton.config import ServerSettings
    from align_pytriton.server import allow_slow_model_loads

    monkeypatch.setattr(pytriton_client, "_DEFAULT_NETWORK_TIMEOUT_S", 60.0)  # restored after the test
    allow_slow_model_loads(ServerSettings().model_load_timeout_s)
    loader = ModelClient("http://127.0.0.1:1", "m", lazy_init=True)  # as PyTriton's _load_model builds it
    assert loader._network_timeout_s == 300.0
    allow_slow_model_loads(10.0)  # never lowers PyTriton's own limit
    assert pytriton_client._DEFAULT_NETWORK_TIMEOUT_S == 300.0


# ---- processes ----------------------------------------------------------------------------
def run_and_wait(conn: Any) -> None:
    """A run (forked from pytest: nothing to import) that starts a reward server, scores once,
    sends its result and the server's pid, and waits to be killed."""
    try:
        registry = align.load_plugins().registry
        reward = RemoteReward(RemoteRewardConfig(serve=reward_cfg(registry, {"name": "length", "target": 4})))
        conn.send((reward(["p"], ["abcd"]).tolist(), reward.child.process.pid))  # type: ignore[union-attr]
    except Exception as exc:
        conn.send((f"{type(exc).__name__}: {exc}", None))
    time.sleep(300)


def descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return left
        time.sleep(0.2)
    return {p for p in pids if alive(p)}


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_run_leaves_no_server_and_no_tritonserver(signum: int) -> None:
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    run = fork.Process(target=run_and_wait, args=(send,), daemon=True)
    run.start()
    try:
        assert receive.poll(300), "the run did not start its reward server within 300 s"
        scores, child_pid = receive.recv()
        assert scores == [0.0]  # length 4 at target 4
        family = {child_pid, *descendants(child_pid)}
        assert any("tritonserver" in command_of(p) for p in family)
        os.kill(run.pid, signum)  # type: ignore[arg-type]
        run.join(30)
        left = wait_gone(family, 60)
        assert not left, [command_of(p) for p in left]
    finally:
        if run.is_alive():
            run.kill()


def test_a_finished_run_stops_the_reward_server_it_started_and_exits(tmp_path: Path) -> None:
    """`align run` with `reward: {name: remote, serve: ...}` ends: the run stops its server and
    closes its client (whose worker thread would otherwise keep the process alive at exit)."""
    out = tmp_path / "rs"
    config = arith_config(
        "rs", out, Path("tiny"), iterations=1, prompts_per_iteration=2, sampling={"n": 2}, min_reward=-100.0
    )
    config["model"] = TINY_MODEL
    config["reward"] = {"name": "remote", "serve": {"name": "length", "target": 4}, "startup_timeout_s": 240}
    command = [sys.executable, "-m", "align.cli", "run", str(write_yaml(tmp_path / "rs.yaml", config))]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}  # the server, tritonserver: orphans once the run exits
    deadline = time.monotonic() + 400
    while run.poll() is None and time.monotonic() < deadline:
        seen |= {pid: command_of(pid) for pid in descendants(run.pid) if pid not in seen}
        time.sleep(0.2)
    family = set(seen)
    try:
        assert run.poll() is not None, "the run did not exit within 400 s"
        assert run.returncode == 0, run.stderr.read() if run.stderr else ""
        assert any("tritonserver" in command for command in seen.values()), seen
        assert read_metrics(out, "rollout")[0]["reward_mean"] <= 0.0  # -|len - 4| / 4
        assert not wait_gone(family, 30), [command_of(p) for p in family if alive(p)]
    finally:
        if run.poll() is None:
            run.kill()
        for pid in family:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_align_serve_reward_serves_on_the_configured_ports_and_stops_on_sigint(tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    config = write_yaml(tmp_path / "serve.yaml", {"reward": {"name": "length", "target": 2}})
    align_cli = str(Path(sys.executable).with_name("align"))
    ports = [f"server.http_port={http}", f"server.grpc_port={grpc}", f"server.metrics_port={metrics}"]
    server = subprocess.Popen(
        [align_cli, "serve", "reward", config, *ports], stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{http}"
        wait_until_ready(url, "reward", "align serve", 300)
        family = descendants(server.pid)
        reward = RemoteReward(RemoteRewardConfig(url=url))
        assert reward(["a", "b"], ["ab", "abcd"]).tolist() == [0.0, -1.0]  # -|len - 2| / 2
        reward.close()
        server.send_signal(signal.SIGINT)
        assert server.wait(60) == 0
        assert not wait_gone(family, 30)
    finally:
        if server.poll() is None:
            server.kill()


def test_serve_config_errors_are_user_errors(tmp_path: Path) -> None:
    from align_pytriton.serve import serve_kind

    plugins = align.load_plugins()
    bad = write_yaml(tmp_path / "bad.yaml", {"reward": {"name": "length"}, "server": {"http_prot": 1}})
    with pytest.raises(align.ConfigError, match=r"server.*http_prot"):
        serve_kind("reward", bad, [], plugins)
    nested = write_yaml(tmp_path / "nested.yaml", {"reward": {"name": "remote", "url": "http://127.0.0.1:1"}})
    with pytest.raises(align.ConfigError, match="cannot serve the 'remote' reward"):
        serve_kind("reward", nested, [], plugins)
    with pytest.raises(align.ConfigError, match="not found"):
        serve_kind("reward", str(tmp_path / "missing.yaml"), [], plugins)


# ---- faults -------------------------------------------------------------------------------
def test_a_server_not_ready_in_time_is_named_and_stopped(registry: align.Registry) -> None:
    served = reward_cfg(registry, {"name": "length", "target": 4})
    reward = RemoteReward(RemoteRewardConfig(serve=served, startup_timeout_s=0.5))
    child = reward.child
    assert child is not None
    with pytest.raises(
        RewardServerError,
        match=r"reward server \(child process \d+, http://127.0.0.1:\d+\) was not ready within 0.5 s",
    ) as info:
        reward(["p"], ["c"])
    assert isinstance(info.value.__cause__, ServerStartError)
    assert child.returncode is not None  # stopped, not left behind
    assert (child.folder / "server.log").exists()  # kept for the message's reader ...
    shutil.rmtree(child.folder)  # ... who is this test


def test_a_url_where_nothing_listens_is_named(registry: align.Registry) -> None:
    (port,) = free_ports(1)
    reward = align.build_reward(
        RemoteRewardConfig(url=f"http://127.0.0.1:{port}", startup_timeout_s=0.5), registry
    )
    with pytest.raises(
        RewardServerError, match=f"reward server at http://127.0.0.1:{port} was not ready within 0.5 s"
    ):
        reward(["p"], ["c"])


class FlakyClient:
    """Stands in for FuturesModelClient: fails the first ``failures`` requests with a refused
    connection, then answers ``[n, 1]`` zeros."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionRefusedError(111, "Connection refused")
        self.calls = 0

    def infer_batch(self, **inputs: np.ndarray) -> Future[dict[str, np.ndarray]]:
        self.calls += 1
        done: Future[dict[str, np.ndarray]] = Future()
        if self.calls <= self.failures:
            done.set_exception(self.error)
        else:
            done.set_result({"reward": np.zeros((len(inputs["prompt"]), 1), dtype=np.float32)})
        return done

    def close(self, wait: bool = True) -> None:
        pass


@pytest.mark.parametrize(("failures", "retries", "succeeds"), [(2, 2, True), (3, 2, False)])
def test_transient_failures_are_retried_a_bounded_number_of_times(
    failures: int, retries: int, succeeds: bool
) -> None:
    reward = RemoteReward(RemoteRewardConfig(url="http://127.0.0.1:9", retries=retries, retry_delay_s=0.01))
    flaky = FlakyClient(failures)
    reward.client._client = flaky  # connected: requests go to the stand-in
    if succeeds:
        assert reward(["p"], ["c"]).tolist() == [0.0]
    else:
        with pytest.raises(
            RewardServerError, match=r"reward server at http://127.0.0.1:9 is not answering after 3 tries"
        ) as info:
            reward(["p"], ["c"])
        assert isinstance(info.value.__cause__, ServerUnavailable)
    assert flaky.calls == min(failures, retries) + 1


@pytest.mark.parametrize(
    ("error", "tries"),
    [(ConnectionRefusedError(111, "Connection refused"), 2), (ConnectionResetError(104, "reset"), 1)],
)
def test_a_request_that_changes_state_is_retried_only_when_refused(error: Exception, tries: int) -> None:
    """A dropped connection may have delivered a train step: it is not sent twice."""
    cfg = RemoteRewardConfig(url="http://127.0.0.1:9", retries=2, retry_delay_s=0.01)
    client = ServerClient("train server", "http://127.0.0.1:9", "train", cfg, idempotent=False)
    flaky = FlakyClient(1, error)
    client._client = flaky
    future = client.submit({"prompt": np.zeros((1, 1))}, {"reward": (1, 1)})
    if tries == 2:
        assert future.result()["reward"].shape == (1, 1)
    else:
        with pytest.raises(ServerUnavailable, match="train server is not answering"):
            future.result()
    assert flaky.calls == tries


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    http, grpc, metrics = free_ports(3)
    workspace = tmp_path_factory.mktemp("fake") / "workspace"  # killed with SIGKILL: not left in ~/.cache
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_SERVER), str(http), str(grpc), str(metrics), str(workspace)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{http}"
    try:
        wait_until_ready(url, "reward", "fake server", 300)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # tritonserver follows (parent-death signal)
        proc.wait(10)


def test_an_answer_of_the_wrong_shape_is_named(fake_server: str, registry: align.Registry) -> None:
    reward = align.build_reward(RemoteRewardConfig(url=fake_server), registry)
    assert reward(["p", "q"], ["abc", "de"]).tolist() == [3.0, 2.0]
    with pytest.raises(
        RewardServerError, match=rf"reward server at {fake_server} answered 'reward' with shape \(2, 2\)"
    ):
        reward(["shape", "q"], ["abc", "de"])


def test_a_server_that_hangs_is_named_within_its_timeout(fake_server: str, registry: align.Registry) -> None:
    reward = align.build_reward(RemoteRewardConfig(url=fake_server, timeout_s=1.5), registry)
    with pytest.raises(
        RewardServerError, match=rf"reward server at {fake_server} did not answer within 1.5 s"
    ) as info:
        reward(["hang"], ["abc"])
    assert isinstance(info.value.__cause__, ServerTimeout)
