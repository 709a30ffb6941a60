"""Run under ``torchrun --nproc_per_node 2`` by tests/test_dp_actors.py: the pieces of
``align.distributed`` on two gloo ranks, without a model. Rank 0 writes a JSON report to the
path given as the first argument.

- The work queue, twice: items whose work on rank 1 is slowed down (it sleeps), so rank 0
  claims more; each rank records the items it did.
- ``share_of`` of 7 and of 1 items, ``reduce_metrics`` (plain, and with uneven shares: rank 0
  holds 2 tokens, rank 1 holds 6), ``average_gradients``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from align import distributed

ITEMS = 24
SLOW_RANK = 1
SLOW_S = 0.1


def main(report: str) -> None:
    dist.init_process_group("gloo")
    me = distributed.rank()
    queue = distributed.WorkQueue()
    calls: list[dict[str, Any]] = []
    for call in range(2):
        done: list[int] = []

        def work(item: int, call: int = call, done: list[int] = done) -> int:
            done.append(item)
            time.sleep(SLOW_S if me == SLOW_RANK else 0.002)
            return 1000 * call + item * item

        results = queue.run(ITEMS, work)
        calls.append(
            {
                "results": results,
                "assignment": queue.last.ranks,
                "done_by_rank": distributed.gather(done),
            }
        )
    share = {
        "seven": distributed.gather(distributed.share_of(list(range(7)))),
        "one": distributed.gather(distributed.share_of([42])),
    }
    metrics = distributed.reduce_metrics({"loss": float(me + 1), "tokens": 10.0 * (me + 1), f"only{me}": 5.0})
    uneven = distributed.reduce_metrics(
        {
            "loss": [0.4, 0.2][me],
            "clip_fraction": [0.5, 0.0][me],
            "ratio_max": [1.5, 1.2][me],
            "tokens": [2, 6][me],
        },
        weights={"clip_fraction": [2.0, 6.0][me]},
    )
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([1.0, 2.0, 3.0]) * (me + 1)
    distributed.average_gradients([param])
    if me == 0:
        out = {
            "calls": calls,
            "share": share,
            "metrics": metrics,
            "uneven": uneven,
            "grad": param.grad.tolist(),
        }
        with open(report, "w") as file:
            json.dump(out, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
