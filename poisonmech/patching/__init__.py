"""Activation patching, cross-model patching, attribution patching and causal tracing.

Every analysis takes the subject first (a ``Pair``, a pipeline stage, ``pipe.between(a, b)``,
a run directory or a bare model), then ``clean_tokens, corrupted_tokens, metric`` (causal
tracing, which makes its own corrupted runs: ``prompts, subject_spans, target``), then the
fields of its config as keywords or ``config=``.
"""

from poisonmech.patching.activation import activation_patch, cross_model_patch
from poisonmech.patching.attribution import attribution_patch
from poisonmech.patching.causal_trace import causal_trace
from poisonmech.patching.config import (
    BACKENDS,
    CAUSAL_TRACE_SITES,
    MODES,
    SITES,
    AttributionConfig,
    CausalTraceConfig,
    CrossModelPatchConfig,
    PatchConfig,
)
from poisonmech.patching.inputs import (
    TriggerContrast,
    control_fn,
    neutral_words,
    trigger_contrast,
)
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
from poisonmech.patching.reward_inputs import RewardScore

__all__ = [
    "BACKENDS",
    "CAUSAL_TRACE_SITES",
    "MODES",
    "SITES",
    "AttributionConfig",
    "CausalTraceConfig",
    "CrossModelPatchConfig",
    "PatchConfig",
    "activation_patch",
    "attribution_patch",
    "causal_trace",
    "control_fn",
    "cross_model_patch",
    "LogitDiff",
    "Metric",
    "NormalizedRecovery",
    "PatchResult",
    "RewardScore",
    "TargetLogProb",
    "TriggerContrast",
    "last_positions",
    "logit_diff",
    "neutral_words",
    "normalized_recovery",
    "target_logprob",
    "trigger_contrast",
]
