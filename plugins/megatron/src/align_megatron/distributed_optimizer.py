"""Megatron-core's distributed optimizer (``backend.distributed_optimizer``): each data-parallel
rank keeps the optimizer state of its own slice of the parameters (ZeRO-1), see docs/megatron.md.

megatron-core's ``DistributedDataParallel`` wraps a ``MegatronModel``: the gradients accumulate
into one contiguous buffer, are reduce-scattered over the DP group (each rank gets the sum of its
slice), and ``get_megatron_optimizer(OptimizerConfig(use_distributed_optimizer=True))`` updates
each rank's slice, then all-gathers the parameters. ``MegatronDistributedOptimizer`` puts that
behind the learner's ``torch.optim.Optimizer`` calls:

- ``param_groups`` are megatron's own (its inner Adam's, the same dicts), so the learner's LR
  schedule writes ``lr`` where megatron's step reads it;
- ``finish(max_norm)`` (the backend's ``finish_gradients``) runs the reduce-scatter, copies the
  gradients to the optimizer's slices and returns megatron's global gradient norm, clipped by
  megatron's own clip;
- ``step()`` is megatron's step on those ready gradients, then the parameter all-gather;
- ``zero_grad()`` zeroes DDP's gradient buffer;
- checkpoints go through megatron's ``sharded_state_dict`` (``save``/``load``).

Gradient sums, not means: every rank's gradient is its rows' share of the global batch's loss
(``align_megatron.backend``), so DDP must sum over DP; megatron does that when the model's
config has ``calculate_per_token_loss`` (the loss is already normalised, here by the algorithm),
which is set on DDP's copy of the config only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from align import ConfigError, OptimConfig
from align_megatron.cpu_shims import megatron_optimizer_on_cpu
from align_megatron.parallel import all_reduce_together

# What a distributed optimizer checkpoint records besides megatron's state, to refuse reading it
# into anything else.
KIND = "megatron_distributed_optimizer"
# megatron's format for the state: each DP rank writes its slice of the optimizer's contiguous
# buffers as it holds them (no communication); it reads back at the same TP and PP. The formats
# that reshard further do not run with torch's AdamW on CPU (docs/megatron.md, Checkpoints).
SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def optimizer_config(optim: OptimConfig, dtype: torch.dtype, max_grad_norm: float | None) -> Any:
    """megatron-core's ``OptimizerConfig`` for the run's ``optim`` section: the same update as the
    learner's torch.optim (AdamW, decoupled weight decay; the only one taken here) on weights
    of ``dtype`` (fp32 main parameters for bfloat16 weights), clipped at ``max_grad_norm``
    (0: no clipping, megatron's convention)."""
    from megatron.core.optimizer import OptimizerConfig

    if optim.name != "adamw":
        raise ConfigError(
            f"backend.distributed_optimizer: runs optim.name adamw only, not {optim.name} (megatron's "
            f"optimizer state dict expects Adam's step count)"
        )
    return OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=0.0,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        decoupled_weight_decay=True,  # AdamW, as torch.optim.AdamW
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=True,
        clip_grad=float(max_grad_norm or 0.0),
    )


class MegatronDistributedOptimizer(torch.optim.Optimizer):
    """megatron-core's distributed optimizer behind ``torch.optim.Optimizer``'s interface (see
    the module docstring) for ``model`` (built with ``model_config``, its TransformerConfig) and
    megatron's ``OptimizerConfig`` ``config``. ``sequence_parallel_params``: the norms' weights,
    whose gradients are summed over ``tp_group`` before the DP reduction (with sequence
    parallelism; empty without)."""

    def __init__(
        self,
        model: nn.Module,
        config: Any,
        model_config: Any,
        sequence_parallel_params: list[nn.Parameter],
        tp_group: Any,
    ) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import get_megatron_optimizer

        ddp_model_config = copy.copy(model_config)
        ddp_model_config.calculate_per_token_loss = True  # sum over DP (the module docstring)
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False
        )
        with megatron_optimizer_on_cpu():
            self.ddp = DistributedDataParallel(ddp_model_config, ddp_config, model)
            # {}: weight decay on every parameter, as the learner's torch.optim (megatron's
            # default leaves out biases and 1-D weights).
            self.megatron = get_megatron_optimizer(config, [self.ddp], config_overrides={})
        self.config = config
        self.sequence_parallel_params = sequence_parallel_params
        self.tp_group = tp_group
        self._grads_ready = False
        super().__init__([p for p in model.parameters() if p.requires_grad], {})
        # megatron's own group dicts (its inner optimizer's, over its slices: views, which
        # torch.optim would not take as groups of its own): the learner's LR schedule writes "lr"
        # where megatron's step reads it.
        self.param_groups = self.megatron.param_groups

    # ---- the learner's optimizer calls --------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.ddp.zero_grad_buffer()
        self.megatron.zero_grad(set_to_none)
        self._grads_ready = False

    def finish(self, max_norm: float | None) -> float:
        """After the backward passes: the gradients summed over DP (each rank its slice), their
        global norm (over every TP shard and pipeline stage, replicas once), clipped to
        ``max_norm`` when set."""
        if self.sequence_parallel_params:
            # Each TP rank ran the norms on its part of the sequence: the gradient is the sum.
            # (DDP's buffer holds them as each parameter's main_grad; param.grad stays None.)
            grads: list[Tensor] = [p.main_grad for p in self.sequence_parallel_params]  # type: ignore[attr-defined]
            all_reduce_together(grads, self.tp_group)
        with megatron_optimizer_on_cpu():
            self.ddp.finish_grad_sync()
            self.megatron.prepare_grads()
            norm = self.megatron.clip_grad_norm(max_norm) if max_norm else self.megatron.get_grad_norm()
        self._grads_ready = True
        return float(norm)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """megatron's update of this rank's slice, then the parameters' all-gather."""
        if closure is not None:
            raise ValueError("the distributed optimizer takes no closure")
        if not self._grads_ready:  # a caller that skipped finish_gradients: no clipping
            self.finish(None)
        with megatron_optimizer_on_cpu():
            self.megatron.step_with_ready_grads()
        self._grads_ready = False

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError(
            "the distributed optimizer's state is saved through the backend (save_checkpoint_optimizer)"
        )

    def save(self, model_state: dict[str, Any], layout: dict[str, int], path: Path) -> None:
        """Its state as a distributed checkpoint in ``path`` (collective), with the layout it was
        written at."""
        from megatron.core import dist_checkpointing

        from align_megatron.cpu_shims import cpu_checkpoint_writer

        with megatron_optimizer_on_cpu():
            state = self.megatron.sharded_state_dict(model_state, is_loading=False, metadata=SHARDING)
        path.mkdir(parents=True, exist_ok=True)
        with cpu_checkpoint_writer():
            dist_checkpointing.save({"optimizer": state, "kind": KIND, "layout": layout}, str(path))

    def load(self, model_state: dict[str, Any], layout: dict[str, int], path: Path) -> None:
        """Read what ``save`` wrote, at the same parallel layout (collective)."""
        from megatron.core import dist_checkpointing

        common = dist_checkpointing.load_common_state_dict(str(path))
        if common.get("kind") != KIND:
            raise ConfigError(
                f"resume: {path} holds torch.optim's state, not the distributed optimizer's: resume "
                f"with the backend.distributed_optimizer the run was written with"
            )
        if common["layout"] != layout:
            raise ConfigError(
                f"resume: {path} was written at {_describe(common['layout'])}, this run is at "
                f"{_describe(layout)}: the distributed optimizer's state resumes at its own layout "
                f"only (not tried at another). Run that layout, or start a new run from the "
                f"checkpoint's weights (model.path=<checkpoint>/model)."
            )
        self._placeholder_state()
        # no_grad: the load writes the fp32 parameters' slices, views of the parameters.
        with megatron_optimizer_on_cpu(), torch.no_grad():
            template = self.megatron.sharded_state_dict(model_state, is_loading=True, metadata=SHARDING)
            loaded = dist_checkpointing.load({"optimizer": template}, str(path))
            self.megatron.load_state_dict(loaded["optimizer"])
        self._own_step_counts()
        # megatron's load made new group dicts (torch's load_state_dict does): the schedule's now.
        self.param_groups = self.megatron.param_groups

    def _placeholder_state(self) -> None:
        """Before a load into an optimizer that never stepped: the state torch's AdamW makes at
        its first step (zero moments, step 0), to be overwritten by the load. megatron's
        ``state_dict`` (which its ``sharded_state_dict`` calls, loading too) reads each
        parameter's ``step`` from a torch optimizer's state, and asserts when there is none; on a
        GPU with TransformerEngine or Apex (FusedAdam) it keeps the step elsewhere."""
        for torch_optimizer in self._torch_optimizers():
            if not isinstance(torch_optimizer, torch.optim.AdamW) or len(torch_optimizer.state):
                continue
            for group in torch_optimizer.param_groups:
                for param in group["params"]:
                    torch_optimizer.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }

    def _own_step_counts(self) -> None:
        """After a load: each parameter's step count, its own tensor, from the step megatron saved
        in the group. megatron's ``load_state_dict`` gives every parameter of a torch optimizer
        one shared step tensor (torch's AdamW would then add 1 to it once per parameter at each
        step), and its parameter state's per-parameter steps came back as the placeholder's 0
        here (``_placeholder_state``); either way the resumed bias correction was wrong."""
        for torch_optimizer in self._torch_optimizers():
            for group in torch_optimizer.param_groups:
                if "step" not in group:
                    continue
                for param in group["params"]:
                    if "step" in torch_optimizer.state.get(param, {}):
                        torch_optimizer.state[param]["step"] = torch.tensor(float(group["step"]))

    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers inside megatron's (one per chained optimizer)."""
        chained = getattr(self.megatron, "chained_optimizers", [self.megatron])
        return [each.optimizer for each in chained if each.optimizer is not None]


def _describe(layout: dict[str, int]) -> str:
    return f"TP {layout['tensor_parallel']} x PP {layout['pipeline_parallel']} x DP {layout['data_parallel']}"
