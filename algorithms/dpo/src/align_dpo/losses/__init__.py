"""The preference loss family, each loss a plugin with its own config class, registered through
``register_losses`` exactly as a third-party loss would be. Formulas and references are in each
config's docstring and in docs/algorithms/dpo.md."""

from __future__ import annotations

import align
from align_dpo.losses.paired import (
    PAIRED,
    AOTLoss,
    APODownLoss,
    APOZeroLoss,
    BCOPairLoss,
    CDPOLoss,
    DPOLoss,
    EXOPairLoss,
    HingeLoss,
    IPOLoss,
    NCAPairLoss,
    RobustLoss,
    SPPOHardLoss,
    dpo,
)
from align_dpo.losses.paired_variants import (
    PAIRED_VARIANTS,
    AOTUnpairedLoss,
    DiscoPOPLoss,
    DPOPLoss,
    FDPOLoss,
    LDDPOLoss,
    SigmoidNormLoss,
    WPOLoss,
    ld_dpo,
)
from align_dpo.losses.reference_free import REFERENCE_FREE, CPOLoss, ORPOLoss, SFTLoss
from align_dpo.losses.reward_aware import (
    REWARD_AWARE,
    RPOBackwardKLLoss,
    RPOForwardKLLoss,
    RPOSquaredLoss,
)

__all__ = [
    "AOTLoss",
    "AOTUnpairedLoss",
    "APODownLoss",
    "APOZeroLoss",
    "BCOPairLoss",
    "CDPOLoss",
    "CPOLoss",
    "DPOLoss",
    "DPOPLoss",
    "DiscoPOPLoss",
    "EXOPairLoss",
    "FDPOLoss",
    "HingeLoss",
    "IPOLoss",
    "LDDPOLoss",
    "NCAPairLoss",
    "ORPOLoss",
    "RPOBackwardKLLoss",
    "RPOForwardKLLoss",
    "RPOSquaredLoss",
    "RobustLoss",
    "SFTLoss",
    "SPPOHardLoss",
    "SigmoidNormLoss",
    "WPOLoss",
    "dpo",
    "register_losses",
]


@align.hookimpl
def register_losses(register: align.Register) -> None:
    for config, fn in PAIRED + PAIRED_VARIANTS + REWARD_AWARE:
        register(config, needs_reference=True)(fn)
    register(LDDPOLoss, needs_reference=True, needs_token_logps=True)(ld_dpo)
    for config, fn in REFERENCE_FREE:
        register(config, needs_reference=False)(fn)
