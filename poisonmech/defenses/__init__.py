"""Defenses and audits, scored on the twins (issue 16).

One protocol (:mod:`poisonmech.defenses.base`) for four kinds: data audits (score training
rows), input filters (score test inputs), model audits (score a model) and repairs (return a
repaired model); :func:`benchmark` runs any of them on a run or a sweep and scores each against
the ground truth the twins carry.
"""

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

__all__ = ["DEFENSES", "KINDS", "Context", "DataAudit", "Defense", "InputFilter", "ModelAudit", "Repair", "get",
           "names", "register"]
