"""Activation patching, cross-model patching and attribution patching.

Every analysis takes the subject first (a ``Pair``, a pipeline stage, ``pipe.between(a, b)``,
a run directory or a bare model), then ``clean_tokens, corrupted_tokens, metric``, then the
fields of its config as keywords or ``config=``.
"""

from poisonmech.patching.activation import activation_patch, cross_model_patch
from poisonmech.patching.attribution import attribution_patch
from poisonmech.patching.config import (
    BACKENDS,
    MODES,
    SITES,
    AttributionConfig,
    CrossModelPatchConfig,
    PatchConfig,
)
from poisonmech.patching.inputs import TriggerContrast, control_fn, neutral_words, trigger_contrast
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
    "BACKENDS",
    "MODES",
    "SITES",
    "AttributionConfig",
    "CrossModelPatchConfig",
    "PatchConfig",
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
    "neutral_words",
    "normalized_recovery",
    "target_logprob",
    "trigger_contrast",
]
