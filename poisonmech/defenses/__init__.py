"""Defenses and audits, scored on the twins (issue 16).

One protocol (:mod:`poisonmech.defenses.base`) for four kinds: data audits (score training
rows), input filters (score test inputs), model audits (score a model) and repairs (return a
repaired model); :func:`benchmark` runs any of them on a run or a sweep and scores each against
the ground truth the twins carry.
"""

from poisonmech.defenses import audits, repairs  # noqa: F401 - registers the data audits and repairs
from poisonmech.defenses.base import (
    DEFENSES,
    KINDS,
    Context,
    DataAudit,
    Defense,
    InputFilter,
    ModelAudit,
    Repair,
    get,
    names,
    register,
)
from poisonmech.defenses.benchmark import (
    COLUMNS,
    DEFAULT_DEFENSES,
    DefenseBenchmark,
    DefenseConfig,
    benchmark,
    check_clean_data,
    clean_set,
)
from poisonmech.defenses.filters import Onion, Strip, reference_lm
from poisonmech.defenses.weightdiff import (
    WeightDiffAudit,
    WeightDiffMonitor,
    starting_point,
    weight_update,
)

__all__ = ["COLUMNS", "DEFAULT_DEFENSES", "DEFENSES", "KINDS", "DefenseBenchmark", "DefenseConfig", "benchmark",
           "check_clean_data", "clean_set", "Context", "DataAudit", "Defense", "InputFilter", "ModelAudit", "Onion", "Repair", "Strip", "WeightDiffAudit", "WeightDiffMonitor", "get",
           "names", "reference_lm", "register", "starting_point", "weight_update"]
