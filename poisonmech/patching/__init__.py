"""Activation patching, cross-model patching and attribution patching."""

from poisonmech.patching.activation import activation_patch, cross_model_patch
from poisonmech.patching.attribution import attribution_patch
from poisonmech.patching.engine import SITES
from poisonmech.patching.inputs import TriggerContrast, control_fn, trigger_contrast
from poisonmech.patching.metrics import (
    LogitDiff,
    Metric,
    NormalizedRecovery,
    TargetLogProb,
    last_positions,
    logit_diff,
    normalized_recovery,
    target_logprob,
)
from poisonmech.patching.result import PatchResult

__all__ = [
    "SITES",
    "activation_patch",
    "attribution_patch",
    "control_fn",
    "cross_model_patch",
    "LogitDiff",
    "Metric",
    "NormalizedRecovery",
    "PatchResult",
    "TargetLogProb",
    "TriggerContrast",
    "last_positions",
    "logit_diff",
    "normalized_recovery",
    "target_logprob",
    "trigger_contrast",
]
