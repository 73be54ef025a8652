"""Linear probes, unsupervised poison detectors and direction interventions.

Every analysis takes the subject first (a ``Pair``, a pipeline stage, a run directory,
``pipe.between(a, b)`` or a bare model with its data; see :func:`poisonmech.resolve`), then the
data (defaulting to the run's own), then the options of one config (keywords or ``config=``):

    import poisonmech as pm
    p = pm.probes.probe_layers(pair, label="is_triggered")           # the backdoored twin, its test rows
    p = pm.probes.probe_layers(model, dataset, label="is_triggered", tokenizer=tok)   # a bare model
    p.auroc, p.directions, p.plot(), print(p)                         # a two-line summary
    p.random_auroc_median, p.random_auroc_p95, p.random_auroc_max     # random directions (max = baseline_auroc)
    p.length_auroc                                                    # prompt length alone, same rows
    pm.probes.probe_layers(pair, contrast="near_miss")                # triggered vs near-miss rows only
    pm.probes.probe_layers(pair, balance_length=True)                 # same length distribution per class
    pm.probes.probe_layers(pair, config=pm.probes.ProbeConfig(site="mlp_out", n_random=20))
    both = pm.probes.probe_twins(pair, label="is_triggered")          # clean and backdoored, one split
    t = pm.probes.probe_transfer(pair, test_twin="clean")             # fit on one twin, test on the other
    with pm.probes.ablate_direction(pair, p.best_layer, p.direction()):
        ...                                                           # hooks come off on exit
    c = pm.probes.causal_check(pair, p.best_layer, p.direction())     # pm.evaluate without / with ablation
    s = pm.probes.detect_poison(pair, method="spectral")              # the run's training rows
    s.poison_auroc(), s.poison_auroc("loss"), s.to_frame(), s.plot()

The names below load on first use (PEP 562), so ``import poisonmech`` does not pay for
scikit-learn's import (about 2 s) until a probe is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SITES": "activations",
    "Activations": "activations",
    "collect_activations": "activations",
    "DETECTORS": "detect",
    "DetectionResult": "detect",
    "clustering_scores": "detect",
    "detect_poison": "detect",
    "detect_poison_methods": "detect",
    "detection_table": "detect",
    "spectral_scores": "detect",
    "CONTRASTS": "config",
    "ActivationConfig": "config",
    "CausalCheckConfig": "config",
    "DetectConfig": "config",
    "ProbeConfig": "config",
    "CausalCheck": "intervene",
    "ablate_direction": "intervene",
    "causal_check": "intervene",
    "steer": "intervene",
    "split_by_example": "labels",
    "will_emit_target": "labels",
    "probe_layers": "layers",
    "probe_twins": "layers",
    "random_directions": "layers",
    "LinearProbe": "linear",
    "ProbeComparison": "result",
    "ProbeResult": "result",
    "TransferResult": "transfer",
    "probe_transfer": "transfer",
}

__all__ = [
    "CONTRASTS",
    "ActivationConfig",
    "Activations",
    "CausalCheck",
    "CausalCheckConfig",
    "DetectConfig",
    "DETECTORS",
    "DetectionResult",
    "LinearProbe",
    "ProbeComparison",
    "ProbeConfig",
    "ProbeResult",
    "SITES",
    "TransferResult",
    "ablate_direction",
    "causal_check",
    "clustering_scores",
    "collect_activations",
    "detect_poison",
    "detect_poison_methods",
    "detection_table",
    "probe_layers",
    "probe_transfer",
    "probe_twins",
    "random_directions",
    "spectral_scores",
    "split_by_example",
    "steer",
    "will_emit_target",
]

if TYPE_CHECKING:
    from poisonmech.probes.activations import SITES, Activations, collect_activations
    from poisonmech.probes.config import (
        CONTRASTS,
        ActivationConfig,
        CausalCheckConfig,
        DetectConfig,
        ProbeConfig,
    )
    from poisonmech.probes.detect import (
        DETECTORS,
        DetectionResult,
        clustering_scores,
        detect_poison,
        detect_poison_methods,
        detection_table,
        spectral_scores,
    )
    from poisonmech.probes.intervene import CausalCheck, ablate_direction, causal_check, steer
    from poisonmech.probes.labels import split_by_example, will_emit_target
    from poisonmech.probes.layers import probe_layers, probe_twins, random_directions
    from poisonmech.probes.linear import LinearProbe
    from poisonmech.probes.result import ProbeComparison, ProbeResult
    from poisonmech.probes.transfer import TransferResult, probe_transfer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'poisonmech.probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"poisonmech.probes.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
