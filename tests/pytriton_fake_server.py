"""A misbehaving reward server for the fault tests of align-pytriton (not a test module).

    python tests/pytriton_fake_server.py HTTP_PORT GRPC_PORT METRICS_PORT WORKSPACE

Serves a ``reward`` model with the reward server's inputs whose answer depends on the prompt:
"hang" sleeps for a minute, "shape" answers two values per row, anything else answers the
completion's length.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from pytriton.decorators import batch

from align_pytriton.config import ServerSettings
from align_pytriton.server import Endpoint, serve

HANG_S = 60.0


@batch
def infer(prompt: np.ndarray, completion: np.ndarray, row: np.ndarray) -> dict[str, np.ndarray]:
    prompts = [json.loads(p[0]) for p in prompt]
    if "hang" in prompts:
        time.sleep(HANG_S)
    lengths = np.array([[len(json.loads(c[0]))] for c in completion], dtype=np.float32)
    if "shape" in prompts:
        return {"reward": np.concatenate([lengths, lengths], axis=1)}
    return {"reward": lengths}


def main(http: int, grpc: int, metrics: int, workspace: Path) -> None:
    settings = ServerSettings(http_port=http, grpc_port=grpc, metrics_port=metrics, max_queue_delay_us=0)
    endpoint = Endpoint(
        name="reward",
        infer=infer,
        inputs=[(name, np.bytes_, (1,)) for name in ("prompt", "completion", "row")],
        outputs=[("reward", np.float32, (-1,))],
    )
    serve(settings, [endpoint], "fake reward server", workspace)  # the test removes it


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
