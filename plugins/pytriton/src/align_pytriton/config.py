"""The configs of the servers (``align serve ... CONFIG``) and of the plugins that use them.

Kept free of heavy imports (no PyTriton, no numpy): ``align`` imports this module whenever the
plugins load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

import align

LOCALHOST = "127.0.0.1"


class ServerSettings(align.StrictConfig):
    """Where a server listens and how it batches. Ports 0 mean "pick free ones" (a child
    server started by a run always gets free local ports)."""

    host: str = Field(
        LOCALHOST, description="Address to bind: 127.0.0.1 (this machine only) unless told otherwise."
    )
    http_port: int = Field(
        8000, ge=0, le=65535, description="HTTP endpoint; clients use http://HOST:HTTP_PORT."
    )
    grpc_port: int = Field(8001, ge=0, le=65535)
    metrics_port: int = Field(8002, ge=0, le=65535)
    max_batch_size: int = Field(64, gt=0, description="Rows the dynamic batcher may merge into one call.")
    max_queue_delay_us: int = Field(
        1000, ge=0, description="How long a request may wait for others to fill a batch (microseconds)."
    )
    exit_timeout_s: int = Field(5, ge=0, description="On stop, how long in-flight requests may finish.")
    model_load_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest wait for tritonserver to load each model at start-up (PyTriton's own "
        "limit is 60 s, which a heavily loaded machine can exceed).",
    )


class ClientSettings(align.StrictConfig):
    """How a run talks to a server: where, and how long it waits before naming it at fault."""

    url: str | None = Field(
        None,
        description="http://HOST:PORT of a server started elsewhere (`align serve ...`); without it, "
        "the run starts its own server as a child process on free local ports.",
    )
    timeout_s: float = Field(60.0, gt=0, description="Longest wait for one request's answer.")
    startup_timeout_s: float = Field(
        180.0, gt=0, description="Longest wait for the server to be ready (start-up, or first connection)."
    )
    retries: int = Field(2, ge=0, description="Extra tries of a request after a transient failure.")
    retry_delay_s: float = Field(1.0, ge=0, description="Pause before the first retry (doubled each time).")
    workers: int = Field(4, gt=0, description="Requests in flight at once.")

    @model_validator(mode="after")
    def _http_url(self) -> ClientSettings:
        if self.url is not None and not self.url.startswith("http://"):
            raise ValueError(
                f"url {self.url!r} must start with http:// (the server's HTTP port; PyTriton's "
                "futures client does not work over grpc://)"
            )
        return self


class RemoteRewardConfig(ClientSettings, align.RewardConfig):
    """``reward: {name: remote, url: http://HOST:PORT}`` scores through a running reward server;
    ``reward: {name: remote, serve: {name: model, path: runs/reward/final}}`` starts one."""

    name: Literal["remote"] = "remote"
    batch_size: int = Field(32, gt=0, description="Rows per request; requests are sent concurrently.")
    serve: align.RewardConfig | None = Field(
        None,
        description="The reward the child server serves when no url is given, e.g. "
        "{name: model, path: runs/reward/final}.",
    )
    server: ServerSettings = Field(
        default_factory=ServerSettings,
        description="The child server's batching (its ports are always free local ones).",
    )

    @model_validator(mode="after")
    def _url_or_serve(self) -> RemoteRewardConfig:
        if (self.url is None) == (self.serve is None):
            raise ValueError(
                "give exactly one of url (a running `align serve reward` server) and serve (the "
                "reward a child server should serve, e.g. {name: model, path: runs/reward/final})"
            )
        if self.serve is not None and self.serve.name == "remote":
            raise ValueError("serve: a reward server cannot serve the 'remote' reward itself")
        return self


class RemoteCriticConfig(ClientSettings, align.CriticConfig):
    """``critic: {name: remote}``: the value model runs in a critic server (``align serve
    critic RUN_CONFIG``, or a child server this run starts when no url is given)."""

    name: Literal["remote"] = "remote"
    init: Literal["policy", "reward"] = Field(
        "policy",
        description="Initial weights: the run's model (a fresh value head) or a reward model (its head "
        "becomes the value head).",
    )
    path: str | None = Field(
        None, description="The reward model folder when init is reward; default reward.path."
    )
    optim: align.OptimConfig | None = Field(
        None, description="The critic's optimizer; default the run's optim."
    )
    server: ServerSettings = Field(
        default_factory=ServerSettings,
        description="Where `align serve critic` listens, and the batching of any critic server.",
    )
