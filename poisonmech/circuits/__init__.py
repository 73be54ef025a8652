"""Edge-level circuits: the model's graph, EAP / EAP-IG / ACDC discovery, faithfulness, ablation, comparison.

Every analysis takes the subject first (a Pair, a pipeline stage, a run directory, a bare
model: :func:`poisonmech.resolve`), then ``clean_tokens, corrupted_tokens, metric``, then its
options (:class:`CircuitConfig`, :class:`FaithfulnessConfig`) as keywords or ``config=``::

    import poisonmech as pm
    from poisonmech.patching import trigger_contrast

    tc = trigger_contrast(pair, 32)
    c = pm.circuits.discover(pair, tc.triggered, tc.control, tc.logit_diff(), method="eap-ig", top_n=20)
    c = pm.circuits.discover(pair, top_n=20)       # a run's own data: its trigger contrast
    c.faithfulness(pair, tc.triggered, tc.control, tc.logit_diff(), ablation="patching")
    c.faithfulness_table(pair, tc.triggered, tc.control,
                         {"logit_diff": tc.logit_diff(), "target_logprob": tc.target_logprob()}).to_frame()
    with c.ablate(pair, tc.control, ablation="mean", part="circuit"):
        pm.evaluate(pair)
    pm.circuits.compare([c, c.random_like()]).to_frame()

``mode`` means what it means in patching: ``"denoise"`` (default) runs the corrupted input and
patches clean values in, ``"noise"`` the reverse (the circuits' default before issue 12).
"""

from poisonmech.circuits.ablation import (
    Faithfulness,
    FaithfulnessTable,
    ablated,
    faithfulness,
    faithfulness_table,
)
from poisonmech.circuits.acdc import acdc
from poisonmech.circuits.circuit import Circuit, select_edges
from poisonmech.circuits.compare import CircuitComparison, compare
from poisonmech.circuits.config import MODES, CircuitConfig, FaithfulnessConfig
from poisonmech.circuits.discover import METHODS, discover
from poisonmech.circuits.graph import Graph
from poisonmech.circuits.rewire import ABLATIONS, rewired
from poisonmech.circuits.scores import EdgeScores, edge_attribution

__all__ = [
    "ABLATIONS",
    "METHODS",
    "MODES",
    "Circuit",
    "CircuitComparison",
    "CircuitConfig",
    "EdgeScores",
    "Faithfulness",
    "FaithfulnessConfig",
    "FaithfulnessTable",
    "Graph",
    "ablated",
    "acdc",
    "compare",
    "discover",
    "edge_attribution",
    "faithfulness",
    "faithfulness_table",
    "rewired",
    "select_edges",
]
