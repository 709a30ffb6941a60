"""align-dpo: Direct Preference Optimization and its loss family, as loss plugins."""

import align
from align_dpo.algorithm import DPO, DPOConfig, reward_metrics
from align_dpo.losses import DPOLoss, dpo
from align_dpo.losses import register_losses as register_losses

__all__ = ["DPO", "DPOConfig", "DPOLoss", "dpo", "reward_metrics"]


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(
        DPOConfig,
        batch=align.PairedTokens,
        data_format="preference",
        loss_batch=align.PreferenceBatch,
        default_loss="dpo",
    )(DPO)
