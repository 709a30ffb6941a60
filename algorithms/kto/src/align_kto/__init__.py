"""align-kto: KTO (Ethayarajh et al., 2024) on unpaired desirable/undesirable examples.

Registers the ``kto`` algorithm, the ``kto``, ``apo_zero_unpaired`` and ``bco`` losses (over
``align.UnpairedBatch``, so other KTO-like losses plug in the same way) and the ``unpaired`` data
format.
"""

import align
from align_kto.algorithm import KTO, KTOConfig, reward_auc, reward_metrics
from align_kto.data import UnpairedColumns, UnpairedData, UnpairedFormat, UnpairedTokens
from align_kto.losses import KTOLoss, kl_estimate, kto
from align_kto.losses import register_losses as register_losses
from align_kto.unpaired_losses import APOZeroUnpairedLoss, BCOLoss, apo_zero_unpaired, bco

__all__ = [
    "KTO",
    "APOZeroUnpairedLoss",
    "BCOLoss",
    "KTOConfig",
    "KTOLoss",
    "UnpairedColumns",
    "UnpairedData",
    "UnpairedFormat",
    "UnpairedTokens",
    "apo_zero_unpaired",
    "bco",
    "kl_estimate",
    "kto",
    "reward_auc",
    "reward_metrics",
]


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(
        KTOConfig,
        batch=UnpairedTokens,
        data_format="unpaired",
        loss_batch=align.UnpairedBatch,
        default_loss="kto",
    )(KTO)


@align.hookimpl
def register_data_formats(register: align.Register) -> None:
    register(UnpairedData, batch=UnpairedTokens)(UnpairedFormat)
