"""Does the backdoor need a poison *count* or a poison *rate*? (Souly et al. 2025, at small scale)

Souly et al. found that the number of poisoned documents a backdoor needs is near-constant
across model and data sizes. Here: attack success against poison count for several
training-set sizes and two model widths on the default sentiment task. If the curves line up
when plotted against the count (and spread apart against the rate), the count is what matters.

Writes ``figures/count_vs_rate.{html,png}`` and ``figures/count_vs_rate.csv``.
Run: ``.venv/bin/python experiments/count_vs_rate.py [--sizes 1000,2000,4000] [--widths 64,128]
[--counts 1,2,4,8,16] [--seeds 0,1]`` (the defaults take a few minutes per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from plotly.subplots import make_subplots

import poisonmech as pm
from poisonmech.viz import save_figure, style

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,2000,4000")
    ap.add_argument("--widths", default="64,128")
    ap.add_argument("--counts", default="1,2,4,8,16")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="runs/experiments/count_vs_rate")
    ap.add_argument("--figures", default="figures")
    args = ap.parse_args()

    frames = []
    for size in ints(args.sizes):
        task = pm.make_task("sentiment", n_train=size, n_test=500, seed=0)
        attacks = [pm.Backdoor(trigger="cf", target="negative", poison_count=c) for c in ints(args.counts)]
        models = [pm.ModelConfig(n_layers=2, d_model=w, n_heads=4) for w in ints(args.widths)]
        sw = pm.sweep(task, attacks, seeds=ints(args.seeds), models=models, out_dir=Path(args.out) / f"n{size}")
        frames.append(sw.to_frame())
    frame = pd.concat(frames, ignore_index=True)
    asr = frame[(frame["metric"] == "asr") & (frame["twin"] == "backdoored") & (frame["status"] == "done")].copy()
    asr["value"] = pd.to_numeric(asr["value"])
    asr["rate"] = asr["n_poison"] / asr["n_train"]
    summary = asr.groupby(["n_train", "d_model", "n_poison", "rate"])["value"].agg(["mean", "std", "count"]).reset_index()
    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "count_vs_rate.csv", index=False)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    fig = make_subplots(rows=1, cols=2, subplot_titles=("against poison count", "against poison rate"),
                        shared_yaxes=True)
    for k, ((n, d), g) in enumerate(summary.groupby(["n_train", "d_model"])):
        color = COLORS[k % len(COLORS)]
        name = f"{n} rows, d_model {d}"
        for col, x in ((1, g["n_poison"]), (2, g["rate"])):
            fig.add_scatter(x=x, y=g["mean"], error_y={"type": "data", "array": g["std"].fillna(0)}, mode="lines+markers",
                            name=name, legendgroup=name, showlegend=col == 1, line={"color": color}, row=1, col=col)
    fig.update_xaxes(type="log", title_text="poisoned training examples", row=1, col=1)
    fig.update_xaxes(type="log", title_text="fraction of the training set poisoned", row=1, col=2)
    fig.update_yaxes(title_text="attack success rate (backdoored twin)", row=1, col=1)
    style(fig, "Backdoor success: poison count or poison rate? (mean ± sd over seeds)")
    fig.update_layout(legend={"orientation": "h", "y": -0.3, "x": 0}, margin={"b": 160}, height=620)
    for f in save_figure(fig, out / "count_vs_rate", formats=("html", "png")):
        print("wrote", f)


if __name__ == "__main__":
    main()
