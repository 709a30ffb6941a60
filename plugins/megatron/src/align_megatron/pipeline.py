"""Pipeline parallelism driven by autograd: one forward through the stages, the last stage's
result shared with every stage, and the backward carried back stage by stage.

megatron-core's schedules (``forward_backward_func``) own the backward pass: they call a
``loss_func`` on the last stage and run ``backward`` themselves. The learner owns it here (an
algorithm's ``loss_fn`` asks the backend for log-probs of several sequences, policy and
reference, and returns a loss the learner backpropagates), and in megatron-core 0.16 the
schedule does not run on a CPU anyway (``forward_backward_pipelining_without_interleaving``
allocates ``torch.zeros([], device="cuda")``). So the stages are joined by three autograd
functions around megatron-core's own point-to-point ``P2PCommunicator`` (unbatched
``isend``/``irecv``, which gloo runs):

- a stage after the first receives its input hidden states from the previous stage
  (``recv_forward``) and, in the backward, sends their gradient back (``send_backward``);
- a stage before the last sends its output hidden states on (``send_forward``), receives the
  last stage's result (a broadcast over the pipeline group), and in the backward receives its
  output's gradient from the next stage (``recv_backward``);
- the last stage computes the result (log-probs from its vocabulary-parallel logits) and
  broadcasts it: every stage then computes the same loss, as every TP and DP rank does, and the
  backward of the broadcast is the identity (the last stage's loss is the loss).

Each scoring call is one micro-batch run through all stages (no 1F1B overlap: with the learner's
micro-batches the stages take turns, which is correct and simple, not fast). The backward
messages pair up because every stage runs the same driver: the same calls in the same order,
and autograd runs the mirrored graphs' stage links in the same (reverse) order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def communicator(dtype: torch.dtype) -> Any:
    """megatron-core's point-to-point communicator over this process's pipeline group,
    unbatched (``batch_isend_irecv`` is followed by ``torch.cuda.synchronize()`` there)."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    config = ModelParallelConfig(
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=dtype,
        batch_p2p_comm=False,
    )
    return P2PCommunicator(ps.get_pipeline_model_parallel_group(), config)


def run_stages(
    gpt: Any,
    inputs: tuple[Tensor, Tensor, Tensor],
    hidden_shape: tuple[int, int, int],
    last_stage: Callable[[Tensor], Tensor],
    result_numel: int,
) -> Tensor:
    """This stage's part of one pipelined forward: ``gpt`` (this stage's GPTModel) on
    ``inputs`` (input ids, positions, attention mask: every stage has them), joined to its
    neighbours; the last stage applies ``last_stage`` to its logits. Returns the last stage's
    flat float32 result (``result_numel`` values) on every stage, differentiable."""
    from megatron.core import parallel_state as ps

    dtype = next(gpt.parameters()).dtype
    comm = communicator(dtype)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if not first:
        # A leaf that needs a gradient, so autograd calls _FromPreviousStage.backward.
        anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
        received: Tensor = _FromPreviousStage.apply(anchor, comm, hidden_shape, dtype)
        gpt.set_input_tensor(received)
    output: Tensor = gpt(*inputs)
    if last:
        result: Tensor = _ShareFromLastStage.apply(last_stage(output).float().reshape(-1))
        return result
    shared: Tensor = _ToNextStage.apply(output, comm, result_numel)
    return shared


def _last_stage_rank() -> int:
    from megatron.core import parallel_state as ps

    return int(ps.get_pipeline_model_parallel_last_rank())


class _FromPreviousStage(torch.autograd.Function):
    """Forward: the previous stage's output hidden states. Backward: their gradient, sent back."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, comm: Any, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        ctx.comm = comm
        received: Tensor = comm.recv_forward(shape, is_first_stage=False)
        return received.detach().to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        ctx.comm.send_backward(grad.contiguous(), is_first_stage=False)
        return torch.empty(0), None, None, None


class _ToNextStage(torch.autograd.Function):
    """Forward: send this stage's output on, receive the last stage's result. Backward: receive
    the output's gradient from the next stage (the result's gradient here is the same as on the
    last stage, which carries it)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, comm: Any, result_numel: int) -> Tensor:
        from megatron.core import parallel_state as ps

        ctx.comm, ctx.shape = comm, tuple(output.shape)
        comm.send_forward(output.detach().contiguous(), is_last_stage=False)
        result = torch.empty(result_numel, dtype=torch.float32, device=output.device)
        dist.broadcast(result, src=_last_stage_rank(), group=ps.get_pipeline_model_parallel_group())
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        output_grad: Tensor = ctx.comm.recv_backward(ctx.shape, is_last_stage=False)
        return output_grad, None, None


class _ShareFromLastStage(torch.autograd.Function):
    """Forward: broadcast the last stage's result to the other stages. Backward: the identity."""

    @staticmethod
    def forward(ctx: Any, result: Tensor) -> Tensor:
        from megatron.core import parallel_state as ps

        shared = result.detach().contiguous().clone()
        dist.broadcast(shared, src=_last_stage_rank(), group=ps.get_pipeline_model_parallel_group())
        return shared

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad
