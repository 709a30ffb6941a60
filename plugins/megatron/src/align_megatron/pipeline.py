"""Pipeline parallelism with overlapping micro-batches (GPipe), driven by the learner's autograd.

megatron-core's schedules (``forward_backward_func``) own the backward pass: they call a
``loss_func`` on the last stage and run ``backward`` themselves. The learner owns it here (an
algorithm's ``loss_fn`` asks the backend for log-probs of several sequences, policy and
reference, and returns a loss the learner backpropagates), and in megatron-core 0.16 the
schedule does not run on a CPU anyway (``forward_backward_pipelining_without_interleaving``
allocates ``torch.zeros([], device="cuda")``). So each scoring call runs its own schedule:

- forward: the call's rows are split into ``micro_batches`` pipeline micro-batches; each stage
  runs them one after the other, receiving each one's input hidden states from the previous
  stage and sending its output on with a non-blocking ``isend``, so stage ``s`` works on
  micro-batch ``k + 1`` while stage ``s + 1`` works on ``k``. The last stage joins its outputs
  (logits, or a scorer's hidden states) along the rows, applies the backend's ``last_stage``
  (log-probs from vocabulary-parallel logits, or a score head) and broadcasts the flat result
  over the pipeline group: every stage then computes the same loss, as every TP and DP rank does.
- backward: the whole schedule is one autograd function on every stage, so the learner's
  ``loss.backward()`` reaches it at the same point of the (identical) outer graph on every stage.
  Its backward runs the micro-batches in reverse: the last stage backpropagates the loss's
  gradient of the result into each micro-batch's output, then runs micro-batch ``k``'s stage
  backward and sends its input gradient back (non-blocking) while the previous stage starts on
  it; a stage before the last receives each output gradient from the next stage instead (its own
  copy of the result's gradient is the same number, unused).

This is GPipe, not 1F1B: an algorithm's loss needs the whole call's result before any backward
can start, and the learner runs the backward after the loss (docs/megatron.md says what 1F1B
would need). The forward keeps every micro-batch's activations until the backward, as one
unsplit call did. The point-to-point messages are torch.distributed ``isend``/``recv`` between
megatron's previous and next pipeline ranks (megatron-core's ``P2PCommunicator`` waits on its
sends in every public method). They pair up because every stage runs the same calls in the same
order: the same micro-batch split, forwards in order, backwards in reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ModelInputs = tuple[Tensor, Tensor, Tensor]


def split_rows(inputs: ModelInputs, micro_batches: int) -> list[ModelInputs]:
    """``inputs`` (ids, positions, attention mask: rows first) split into ``micro_batches``
    consecutive runs of rows (fewer when there are fewer rows); sizes differ by at most one."""
    count = max(1, min(micro_batches, inputs[0].shape[0]))
    pieces = [tensor.tensor_split(count) for tensor in inputs]
    return [(ids, positions, mask) for ids, positions, mask in zip(*pieces, strict=True)]


def run_stages(
    gpt: Any,
    inputs: ModelInputs,
    hidden_shape: tuple[int, int, int],
    last_stage: Callable[[Tensor], Tensor],
    result_numel: int,
    micro_batches: int = 1,
) -> Tensor:
    """This stage's part of one pipelined call: ``gpt`` (this stage's GPTModel) on ``inputs``
    (input ids, positions, attention mask: every stage has them), in ``micro_batches`` pipeline
    micro-batches, joined to its neighbours; the last stage applies ``last_stage`` to its outputs
    (``[rows, width, ...]``, all micro-batches). ``hidden_shape`` is the hidden states' shape
    between stages for all rows (``[sequence, rows, hidden]``). Returns the last stage's flat
    float32 result (``result_numel`` values) on every stage, differentiable when grad is on."""
    schedule = GPipeSchedule(gpt, split_rows(inputs, micro_batches), hidden_shape, last_stage, result_numel)
    if not torch.is_grad_enabled():
        return schedule.forward(keep_graph=False)
    # A leaf that needs a gradient, so autograd calls the schedule's backward on every stage,
    # whichever of this stage's parameters train.
    anchor = torch.empty(0, requires_grad=True)
    result: Tensor = _Pipelined.apply(anchor, schedule)
    return result


class GPipeSchedule:
    """One stage's forward and backward of a pipelined call (see the module's docstring)."""

    def __init__(
        self,
        gpt: Any,
        chunks: Sequence[ModelInputs],
        hidden_shape: tuple[int, int, int],
        last_stage: Callable[[Tensor], Tensor],
        result_numel: int,
    ) -> None:
        from megatron.core import parallel_state as ps

        self.gpt = gpt
        self.chunks = list(chunks)
        length, _, hidden = hidden_shape
        self.shapes = [(length, chunk[0].shape[0], hidden) for chunk in self.chunks]
        self.last_stage = last_stage
        self.result_numel = result_numel
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.group = ps.get_pipeline_model_parallel_group()
        self.last_rank = int(ps.get_pipeline_model_parallel_last_rank())
        self.prev_rank = int(ps.get_pipeline_model_parallel_prev_rank())
        self.next_rank = int(ps.get_pipeline_model_parallel_next_rank())
        param = next(gpt.parameters())
        self.dtype, self.device = param.dtype, param.device
        # Kept from the forward for the backward (with keep_graph).
        self.received: list[Tensor] = []  # each micro-batch's input hidden states (leaves)
        self.outputs: list[Tensor] = []  # each micro-batch's output, with its graph
        self.heads: list[Tensor] = []  # last stage: the outputs as leaves that last_stage read
        self.result: Tensor | None = None  # last stage: last_stage's result, with its graph

    def forward(self, keep_graph: bool) -> Tensor:
        """Every micro-batch through this stage (sends not awaited until the last one is sent),
        then the last stage's result, broadcast to every stage."""
        sends: list[Any] = []
        with torch.set_grad_enabled(keep_graph):
            for chunk, shape in zip(self.chunks, self.shapes, strict=True):
                if not self.first:
                    received = self._receive(shape, self.prev_rank).requires_grad_(keep_graph)
                    self.received.append(received)
                    self.gpt.set_input_tensor(received)
                output: Tensor = self.gpt(*chunk)
                if not self.last:
                    sends.append(dist.isend(output.detach().contiguous(), self.next_rank, group=self.group))
                self.outputs.append(output)
            if self.last:
                result = self._last_stage_result()
        for send in sends:
            send.wait()
        if not self.last:
            result = torch.empty(self.result_numel, dtype=torch.float32, device=self.device)
        if not keep_graph:
            self._forget()
        dist.broadcast(result, src=self.last_rank, group=self.group)
        return result

    def _last_stage_result(self) -> Tensor:
        """``last_stage`` of all micro-batches' outputs joined along the rows; with grad on, the
        outputs enter as leaves so the backward can hand each micro-batch its own gradient."""
        self.heads = [
            output.detach().requires_grad_(output.requires_grad and torch.is_grad_enabled())
            for output in self.outputs
        ]
        joined = self.heads[0] if len(self.heads) == 1 else torch.cat(self.heads)
        self.result = self.last_stage(joined).float().reshape(-1)
        return self.result.detach().clone()

    def backward(self, result_grad: Tensor) -> None:
        """The micro-batches' backward in reverse order: each output's gradient (from
        ``result_grad`` on the last stage, from the next stage otherwise), this stage's
        backward, and the input's gradient sent to the previous stage without waiting."""
        if self.last and self.result is not None and self.result.requires_grad:
            torch.autograd.backward(self.result, result_grad)
        sends: list[Any] = []
        for k in reversed(range(len(self.chunks))):
            output = self.outputs[k]
            if self.last:
                grad = self.heads[k].grad
                grad = torch.zeros_like(output) if grad is None else grad
            else:
                grad = self._receive(tuple(output.shape), self.next_rank)
            if output.requires_grad:
                torch.autograd.backward(output, grad.to(output.dtype))
            if not self.first:
                received = self.received[k]
                back = received.grad if received.grad is not None else torch.zeros_like(received)
                sends.append(dist.isend(back.contiguous(), self.prev_rank, group=self.group))
        for send in sends:
            send.wait()
        self._forget()

    def _forget(self) -> None:
        """Drop the activations and graphs (after the backward, or a forward without grad)."""
        self.outputs, self.heads, self.received, self.result = [], [], [], None

    def _receive(self, shape: tuple[int, ...], source: int) -> Tensor:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(buffer, src=source, group=self.group)
        return buffer


class _Pipelined(torch.autograd.Function):
    """Forward: the schedule's forward, its graphs kept inside the schedule. Backward: the
    schedule's backward (it accumulates this stage's parameter gradients itself)."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, schedule: GPipeSchedule) -> Tensor:
        ctx.schedule = schedule
        return schedule.forward(keep_graph=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        ctx.schedule.backward(grad)
        return None, None
