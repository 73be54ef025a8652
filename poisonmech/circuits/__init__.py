"""Edge-level circuits: the model's graph, EAP / EAP-IG / ACDC discovery, faithfulness, ablation, comparison.

    import poisonmech as pm
    from poisonmech.patching import trigger_contrast

    tc = trigger_contrast(pair, 32)
    c = pm.circuits.discover(pair.backdoored, tc.triggered, tc.control, tc.logit_diff(),
                             method="eap-ig", top_n=20)
    c.faithfulness(pair.backdoored, tc.triggered, tc.control, tc.logit_diff(), ablation="patching")
    c.faithfulness_table(pair.backdoored, tc.triggered, tc.control,
                         {"logit_diff": tc.logit_diff(), "target_logprob": tc.target_logprob()}).to_frame()
    with c.ablate(pair.backdoored, tc.control, ablation="mean", part="circuit"):
        pm.evaluate(pair.backdoored, pair.task, pair.attack)
    pm.circuits.compare([c, c.random_like()])
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
from poisonmech.circuits.compare import compare
from poisonmech.circuits.discover import METHODS, discover
from poisonmech.circuits.graph import Graph
from poisonmech.circuits.rewire import ABLATIONS, rewired
from poisonmech.circuits.scores import EdgeScores, edge_attribution

__all__ = [
    "ABLATIONS",
    "METHODS",
    "Circuit",
    "EdgeScores",
    "Faithfulness",
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
