"""The learner's torch.optim state in megatron-core's distributed checkpoint, sharded like the
parameters, so a checkpoint written at one TP/PP resumes at another (docs/megatron.md,
"Checkpoints").

megatron-core's helpers for torch optimizers do the sharding: ``get_param_id_to_sharded_param_map``
pairs each optimizer parameter with its ``ShardedTensor`` in the model's sharded state dict, and
``optim_state_to_sharding_state`` turns each per-parameter state tensor (AdamW's ``exp_avg``,
``exp_avg_sq``) into a ``ShardedTensor`` of the same sharding under
``optimizer.state.<name>.<parameter key>``, and keeps ``param_groups`` (the hyperparameters) as
common data. What they leave out is the 0-dim state (AdamW's ``step``): megatron's own optimizers
save one ``common_step``; here each parameter's step is a 1-element tensor replicated over TP and
DP (``optimizer.scalar.<name>.<parameter key>``), so nothing assumes every parameter stepped
equally. The checkpoint also records the parallel layout it was written at: a resume may change TP
and PP, not the data-parallel size (see ``check_layout``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align import ConfigError
from align_megatron.parallel import Parallelism

OPTIMIZER = "optimizer"
STATE_NAMES = "state_names"  # {"tensors": [...], "scalars": [...]}: each parameter's state entries
LAYOUT = "layout"
SCALAR_PREFIX = "optimizer.scalar"


def layout_of(par: Parallelism) -> dict[str, int]:
    return {"tensor_parallel": par.tp, "pipeline_parallel": par.pp, "data_parallel": par.dp}


def sharded_optimizer_state(
    optimizer: torch.optim.Optimizer, model_state: dict[str, Any], par: Parallelism
) -> dict[str, Any] | None:
    """``optimizer``'s state dict as a sharded state dict for ``dist_checkpointing.save``, given
    the model's sharded state dict; None when it cannot be (a parameter the model's sharded state
    does not hold, or a state entry that is not a tensor): the learner then keeps it per rank."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_id = get_param_id_to_sharded_param_map(model_state, params)
    state = optimizer.state_dict()
    named = [item for entry in state["state"].values() for item in entry.items()]  # (name, value)
    if len(by_id) != len(params) or not all(isinstance(value, Tensor) for _, value in named):
        return None
    scalars = sorted({name for name, value in named if value.dim() == 0})
    tensors = sorted({name for name, value in named if value.dim() > 0})
    steps = {
        index: {name: entry[name] for name in scalars if name in entry}
        for index, entry in state["state"].items()
    }
    optim_state_to_sharding_state(state, by_id, exclude_keys=tuple(scalars))
    for index, values in steps.items():
        for name, value in values.items():
            state["state"][index][name] = _replicated_scalar(value, name, by_id[index], par)
    return {
        OPTIMIZER: state,
        STATE_NAMES: {"tensors": tensors, "scalars": scalars},
        LAYOUT: layout_of(par),
    }


def _replicated_scalar(value: Tensor, name: str, param: Any, par: Parallelism) -> Any:
    """A 0-dim state (a step count) of one parameter as a 1-element ``ShardedTensor`` held by
    every TP and DP rank of its stage (one writes it), with the parameter's prepended axes (a
    transformer layer's parameters are one tensor per kind, with the global layer number as its
    first axis)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    key = f"{SCALAR_PREFIX}.{name}.{param.key}"
    if isinstance(param, ShardedTensorFactory):  # linear_fc1's gate and up: their common axes
        built = param.build()
        param = built if isinstance(built, ShardedTensor) else next(nested_values(built))
    axes = [
        (axis, param.global_offset[axis], param.global_shape[axis]) for axis in range(param.prepend_axis_num)
    ]
    return ShardedTensor.from_rank_offsets(
        key,
        value.detach().reshape(1).clone(),
        *axes,
        replica_id=(0, par.tp_rank, par.dp_rank),
        prepend_axis_num=param.prepend_axis_num,
    )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, model_state: dict[str, Any], par: Parallelism, path: Path
) -> None:
    """Read what ``sharded_optimizer_state`` saved in ``path`` into ``optimizer``, each rank its
    parameters' parts (at any TP/PP): a template of zeros of the saved entries is sharded the same
    way and loaded; a parameter that had no state when saved gets none."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )
    from megatron.core.dist_checkpointing.validation import StrictHandling

    common = dist_checkpointing.load_common_state_dict(str(path))
    check_layout(common[LAYOUT], par, path)
    names = common[STATE_NAMES]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_id = get_param_id_to_sharded_param_map(model_state, params)
    template = optimizer.state_dict()
    template["state"] = {
        index: {name: torch.zeros_like(param) for name in names["tensors"]}
        for index, param in enumerate(params)
    }
    optim_state_to_sharding_state(template, by_id)
    for index in template["state"]:
        for name in names["scalars"]:
            scalar = torch.zeros((), dtype=torch.float32, device=params[index].device)
            template["state"][index][name] = _replicated_scalar(scalar, name, by_id[index], par)
    # Entries the checkpoint lacks (a parameter without state when it was saved) are left out.
    loaded, _, _ = dist_checkpointing.load(
        {OPTIMIZER: template}, str(path), strict=StrictHandling.RETURN_UNEXPECTED
    )
    state = loaded[OPTIMIZER]
    wanted = {*names["tensors"], *names["scalars"]}
    state["state"] = {
        index: {
            name: value.reshape(()) if name in names["scalars"] else value for name, value in entry.items()
        }
        for index, entry in state["state"].items()
        if set(entry) == wanted
    }
    optimizer.load_state_dict(state)


def check_layout(saved: dict[str, int], par: Parallelism, path: Path) -> None:
    """A resume may change TP and PP (the state reshards) but not the data-parallel size: no
    test resumes across one, so it is refused rather than trusted (docs/megatron.md)."""
    if saved["data_parallel"] == par.dp:
        return
    processes = par.tp * par.pp * saved["data_parallel"]
    raise ConfigError(
        f"resume: {path} was written with {saved['data_parallel']} data-parallel rank(s) (TP "
        f"{saved['tensor_parallel']} x PP {saved['pipeline_parallel']} x DP {saved['data_parallel']}), "
        f"this run has {par.dp} (TP {par.tp} x PP {par.pp} x DP {par.dp}): a resume may change "
        f"tensor_model_parallel_size and pipeline_model_parallel_size, not the data-parallel size. "
        f"Run {processes} process(es) at this TP and PP, or start a new run from the checkpoint's "
        f"weights (model.path=<checkpoint>/model)."
    )
