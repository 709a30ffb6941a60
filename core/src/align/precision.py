"""How forward passes compute under ``trainer.precision``.

``fp32`` and ``bf16`` need nothing at run time: the weights' own dtype (``model.dtype``, which
follows from the precision) decides. ``bf16_mixed`` keeps float32 weights and optimizer state and
runs forward passes under bfloat16 autocast: matmuls in bfloat16, reductions and the backends'
log-softmax in float32. The backward pass runs outside autocast, as torch recommends: autograd
replays each op in the dtype its forward used.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


def precision_scope(precision: str, module: nn.Module) -> AbstractContextManager[object]:
    """The context to run ``module``'s forward passes in: bfloat16 autocast on the module's
    device under ``bf16_mixed``, nothing otherwise. Everything that scores with the policy's
    weights (training, evaluation, the reference's log-probs) uses it, so that the reference
    and an untrained policy give the same log-probs exactly."""
    if precision != "bf16_mixed":
        return nullcontext()
    device = next(module.parameters(), torch.empty(0)).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
