"""SimPO (Meng et al., 2024): a reference-free margin on length-normalised log-probs,
``-log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma)``."""

from typing import Literal

import torch.nn.functional as F

import align


class SimPO(align.LossConfig):
    name: Literal["simpo"] = "simpo"
    beta: float = 2.0
    gamma: float = 0.5


@align.hookimpl
def register_losses(register: align.Register) -> None:
    @register(SimPO, needs_reference=False)
    def simpo(cfg: SimPO, b: align.PreferenceBatch) -> align.LossOutput:
        margin = cfg.beta * (b.chosen_logps_mean - b.rejected_logps_mean) - cfg.gamma
        return align.LossOutput(-F.logsigmoid(margin).mean(), {"margin": margin.mean()})
