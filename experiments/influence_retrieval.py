"""Which attribution methods find the poisoned training rows, and how does that change with
the poison count?

A poison-count sweep on the default task (sentiment, trigger ``cf`` -> ``negative``, 4,000
training rows, the default 2-layer model) over seeds; on each backdoored twin every method of
``pm.influence.attribute`` scores the training set against the backdoor target's
log-probability on the triggered test inputs (aggregated over the queries), and each score is
judged by how well it retrieves the rows whose ``is_poison`` is true: AUROC, average
precision and precision at k = the poison count.

Writes ``figures/influence_retrieval.{html,png}`` (AUROC and AP against poison count, the mean
over seeds with each seed as a faint point, one line per method; ROC curves at one count) and
``figures/influence_retrieval.csv`` (one row per run x method).
Run: ``.venv/bin/python experiments/influence_retrieval.py [--counts 5,10,20,50,100] [--seeds 0,1]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import plotly
import torch
from plotly.subplots import make_subplots

import poisonmech as pm
from poisonmech.viz import save_figure, style

#: (label, method, settings): the baselines, the gradient methods, and EK-FAC plain and with
#: unit-normalised gradients (the fix that closes the gap at small counts)
METHODS: list[tuple[str, str, dict]] = [
    ("loss (baseline)", "loss", {}),
    ("repsim (baseline)", "repsim", {}),
    ("graddot", "graddot", {}),
    ("gradcos", "gradcos", {}),
    ("tracin", "tracin", {}),
    ("trak", "trak", {}),
    ("ekfac", "ekfac", {}),
    ("ekfac unit", "ekfac", {"renormalize": "unit"}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="runs/experiments/influence_retrieval")
    ap.add_argument("--counts", default="5,10,20,50,100")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--roc-count", type=int, default=10, help="poison count whose ROC curves are drawn")
    ap.add_argument("--figures", default="figures")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and leaves a core free
    counts = [int(c) for c in args.counts.split(",")]
    task = pm.make_task("sentiment", n_train=4000, n_test=500, seed=0)
    attacks = [pm.Backdoor(trigger="cf", target="negative", poison_count=c) for c in counts]
    sw = pm.sweep(task, attacks, seeds=[int(s) for s in args.seeds.split(",")], out_dir=args.sweep,
                  max_workers=1, threads_per_run=1)
    rows, rocs = [], {}
    for r in sorted((r for r in sw.runs if r.status == "done"), key=lambda r: (r.n_poison, r.spec.train["seed"])):
        pair = pm.load_pair(Path(args.sweep) / "runs" / r.name)
        seed = r.spec.train["seed"]
        for label, method, kw in METHODS:
            res = pm.influence.attribute(pair, method=method, aggregate=True, progress=False, **kw)
            rows.append({"n_poison": r.n_poison, "seed": seed, "method": label,
                         "asr": r.metrics["backdoored"]["asr"], "auroc": res.poison_auroc(),
                         "ap": res.average_precision(), "precision_at_k": res.precision_at(r.n_poison),
                         "seconds": (res.settings or {}).get("seconds", np.nan)})
            print(f"{r.n_poison:4d} poisons, seed {seed}: {label:18s} AUROC {rows[-1]['auroc']:.3f} "
                  f"AP {rows[-1]['ap']:.3f} P@k {rows[-1]['precision_at_k']:.3f}", flush=True)
            if r.n_poison == args.roc_count and seed == int(args.seeds.split(",")[0]):
                rocs[label] = res
    table = pd.DataFrame(rows)
    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "influence_retrieval.csv", index=False)
    summary = table.groupby(["method", "n_poison"])[["auroc", "ap", "precision_at_k"]].mean().unstack("n_poison")
    print("\nmean over seeds:\n" + summary.round(3).to_string())

    fig = make_subplots(rows=1, cols=3, subplot_titles=("AUROC against poison count (mean over seeds)",
                                                        "average precision (mean over seeds)",
                                                        f"ROC at {args.roc_count} poisons (seed {args.seeds.split(',')[0]})"),
                        horizontal_spacing=0.08)
    palette = plotly.colors.qualitative.D3  # ten distinct colours: one per method
    for i, (label, _, _) in enumerate(METHODS):
        color = palette[i % len(palette)]
        dash = "dot" if "baseline" in label else "solid"
        t = table[table["method"] == label]
        for col, metric in ((1, "auroc"), (2, "ap")):
            # mean over seeds; with two seeds a confidence band would cover the panel, so the
            # seeds are drawn as faint points instead
            stats = t.groupby("n_poison")[metric].mean()
            fig.add_scatter(x=t["n_poison"], y=t[metric], mode="markers", marker={"color": color, "size": 5,
                            "opacity": 0.35}, legendgroup=label, showlegend=False, hoverinfo="skip", row=1, col=col)
            fig.add_scatter(x=stats.index.to_numpy(dtype=float), y=stats.to_numpy(), mode="lines+markers", name=label,
                            legendgroup=label, showlegend=col == 1, line={"color": color, "dash": dash}, row=1, col=col)
        if label in rocs:
            from poisonmech.influence.result import roc_curve

            fpr, tpr = roc_curve(rocs[label].train_scores.numpy(), np.asarray(rocs[label].is_poison))
            fig.add_scatter(x=fpr, y=tpr, mode="lines", name=label, legendgroup=label, showlegend=False,
                            line={"color": color, "dash": dash}, row=1, col=3)
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"color": "grey", "dash": "dot"}, showlegend=False,
                    row=1, col=3)
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text="poisoned training rows (of 4,000)", row=1, col=col)
    fig.update_yaxes(title_text="AUROC", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="average precision", range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title_text="false-positive rate", row=1, col=3)
    fig.update_yaxes(title_text="true-positive rate", row=1, col=3)
    style(fig, "Retrieving the poisoned training rows by training-data attribution (backdoored twin)")
    fig.update_layout(width=1400, height=520, legend={"orientation": "h", "y": -0.28, "x": 0}, margin={"b": 130})
    for f in save_figure(fig, out / "influence_retrieval", formats=("html", "png")):
        print("wrote", f)


if __name__ == "__main__":
    main()
