"""Is it the same circuit at every poison count? Backdoor circuits across a poison-count sweep.

For each run of a poison-count sweep (the demo's by default), the backdoor circuit of the
backdoored twin (EAP-IG, top 10 edges, from the ``circuits`` analysis), then the pairwise edge
overlap (Jaccard) between counts, and the twin's ASR with its circuit's edges patch-ablated.

Writes ``figures/circuits_across_counts.{html,png}`` and ``figures/circuits_across_counts.csv``.
Run: ``.venv/bin/python experiments/circuits_across_counts.py [--sweep runs/demo] [--counts 0,5,10,40]``
(runs the sweep first when it is missing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from plotly.subplots import make_subplots

import poisonmech as pm
from poisonmech.viz import save_figure, style


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="runs/demo")
    ap.add_argument("--counts", default="0,5,10,40")
    ap.add_argument("--figures", default="figures")
    args = ap.parse_args()
    task = pm.make_task("sentiment", n_train=4000, n_test=500, seed=0)
    attacks = [pm.Backdoor(trigger="cf", target="negative", poison_count=int(c)) for c in args.counts.split(",")]
    sw = pm.sweep(task, attacks, seeds=[0], out_dir=args.sweep, analyses=["circuits"])
    circuits, rows = {}, []
    for r in sorted((r for r in sw.runs if r.status == "done"), key=lambda r: r.n_poison):
        path = Path(args.sweep) / "runs" / r.name / "analyses" / "circuits" / "circuit.json"
        circuits[f"{r.n_poison} poisons"] = pm.circuits.Circuit.load(path)
        s = r.analyses["circuits"]
        rows.append({"n_poison": r.n_poison, "asr": r.metrics["backdoored"]["asr"],
                     "asr_circuit_ablated": s["asr_circuit_ablated"],
                     "clean_acc_circuit_ablated": s["clean_acc_circuit_ablated"],
                     "circuit_faithfulness": s["circuit_faithfulness"],
                     "edges": "; ".join(circuits[f"{r.n_poison} poisons"].edges)})
    table = pd.DataFrame(rows)
    overlap = pm.circuits.compare(circuits)
    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "circuits_across_counts.csv", index=False)
    print(table.drop(columns="edges").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(overlap[["a", "b", "edge_jaccard", "node_jaccard", "score_spearman"]].to_string(index=False))

    labels = list(circuits)
    mat = np.eye(len(labels))
    for _, row in overlap.iterrows():
        i, j = labels.index(row["a"]), labels.index(row["b"])
        mat[i, j] = mat[j, i] = row["edge_jaccard"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("edge overlap (Jaccard) of the circuits",
                                                        "ASR: intact vs circuit ablated"),
                        horizontal_spacing=0.22)
    fig.add_heatmap(z=mat, x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues", row=1, col=1,
                    colorbar={"x": 0.40, "len": 0.8, "thickness": 12, "title": "Jaccard"})
    x = table["n_poison"].astype(float).replace(0.0, 0.5)
    fig.add_scatter(x=x, y=table["asr"], name="intact", mode="lines+markers", row=1, col=2)
    fig.add_scatter(x=x, y=table["asr_circuit_ablated"], name="circuit patch-ablated", mode="lines+markers",
                    row=1, col=2)
    fig.update_xaxes(type="log", title_text="poisoned training examples (0 at 0.5)", row=1, col=2)
    fig.update_yaxes(title_text="attack success rate", range=[0, 1.05], row=1, col=2)
    style(fig, "Backdoor circuits across poison counts (backdoored twin, EAP-IG top 10 edges)")
    fig.update_layout(legend={"orientation": "h", "y": -0.22, "x": 0.6}, margin={"b": 90})
    for f in save_figure(fig, out / "circuits_across_counts", formats=("html", "png")):
        print("wrote", f)


if __name__ == "__main__":
    main()
