"""Which defenses find and remove the backdoor the analyses located?

A poison-count sweep on the default task (sentiment, trigger ``cf`` -> ``negative``, 4,000
training rows, the default 2-layer model, 5 / 10 / 40 / 100 poisoned rows) over seeds; on every
pair ``pm.defenses.benchmark`` runs every registered defense against the twins' ground truth:

- data audits (scored against ``is_poison``): AUROC, AP, precision / recall / F1 at the audit's
  own threshold rule and at the true poison count; the per-example loss is the baseline;
- input filters (against ``is_triggered``): AUROC, and ASR / clean accuracy after filtering;
- the weight-difference model audit: AUROC over all models (backdoored twins vs clean twins);
- repairs: ASR, clean accuracy and false-trigger rate after, and the share of the located
  mechanism (the backdoor circuit's carried trigger effect) they removed.

The defender's trusted clean rows are 200 rows of a fresh copy of the task (seed 1), and ONION's
reference LM is trained on 2,000 further fresh prompts (seed 2): neither contains a poisoned row.

Writes ``figures/defenses.csv`` (one row per run x defense), ``figures/defenses_summary.csv``
(mean / std over seeds per defense and count), ``figures/defenses_model_audits.csv`` and
``figures/defenses.{html,png}`` (audit and filter AUROC against count; the ASR-after vs
clean-accuracy-after trade-off), and prints the verdicts.
Run: ``.venv/bin/python experiments/defenses.py [--counts 5,10,40,100] [--seeds 0,1,2] [--train-only]``
(``--plot-only`` redraws from the CSV).
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

#: every defense, and ONION also with its one most suspicious word dropped (its default rule drops every word
#: above the threshold, and a triggered input's inflated perplexity lifts every word's suspicion)
DEFENSES = ["loss", "spectral", "activation_clustering", "robust_covariance", "keyword", "influence", "strip",
            "onion", {"name": "onion", "max_removed": 1}, "weight_diff_monitor", "weight_diff", "clean_finetune",
            "fine_pruning", "trigger_unlearning", "circuit_ablation", "direction_ablation", "retrain_without"]


def _parse(spec: str):
    """``name`` or ``name,key=value,...`` -> a defense spec."""
    name, *opts = spec.split(",")
    if not opts:
        return name
    out: dict = {"name": name}
    for o in opts:
        k, v = o.split("=")
        out[k] = int(v) if v.lstrip("-").isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
    return out


def train(args) -> pm.Sweep:
    counts = [int(c) for c in args.counts.split(",")]
    task = pm.make_task("sentiment", n_train=4000, n_test=500, seed=0)
    attacks = [pm.Backdoor(trigger="cf", target="negative", poison_count=c) for c in counts]
    return pm.sweep(task, attacks, seeds=[int(s) for s in args.seeds.split(",")], out_dir=args.sweep,
                    max_workers=args.workers, threads_per_run=1)


def verdicts(table: pd.DataFrame) -> list[str]:
    """Plain-text verdicts: audits against the loss baseline; repairs against the issue's bar."""
    out = []
    audits = table[table["kind"] == "data_audit"]
    mean = audits.groupby(["defense", "n_poison"])["auroc"].mean().unstack("n_poison")
    if "loss" in mean.index:
        base = mean.loc["loss"]
        for name, row in mean.iterrows():
            if name == "loss":
                continue
            beats = [int(c) for c in row.index if row[c] > base[c]]
            trig = bool(audits.loc[audits["defense"] == name, "uses_trigger"].any())
            out.append(f"data audit {name}{' (uses the trigger)' if trig else ''}: mean AUROC "
                       + ", ".join(f"{int(c)}: {row[c]:.3f}" for c in row.index)
                       + f"; beats the loss baseline at counts {beats or 'none'}")
        out.append("loss baseline: mean AUROC " + ", ".join(f"{int(c)}: {base[c]:.3f}" for c in base.index))
    for c in (10, 40):
        sub = mean.get(c) if c in mean.columns else None
        if sub is None:
            continue
        free = [d for d in sub.index if not bool(audits.loc[audits["defense"] == d, "uses_trigger"].any())]
        best = sub[free].idxmax() if free else None
        if best is not None:
            out.append(f"best trigger-free data audit at {c} poisons: {best} (mean AUROC {sub[best]:.3f}; target >= 0.95: "
                       f"{'met' if sub[best] >= 0.95 else 'missed'})")
    rep = table[table["kind"].isin(["repair", "input_filter"])].copy()
    if not rep.empty:
        rep["drop"] = rep["clean_acc_before"] - rep["clean_acc_after"]
        g = rep.groupby(["defense", "n_poison"]).agg(asr_after=("asr_after", "mean"), drop=("drop", "mean"),
                                                     worst_asr=("asr_after", "max"), worst_drop=("drop", "max"))
        for (name, c), r in g.iterrows():
            ok = r["asr_after"] <= 0.1 and r["drop"] <= 0.02
            out.append(f"{name} at {int(c)} poisons: ASR after {r['asr_after']:.3f} (worst seed {r['worst_asr']:.3f}), "
                       f"clean accuracy drop {100 * r['drop']:.1f} points (worst {100 * r['worst_drop']:.1f}): "
                       f"{'meets' if ok else 'misses'} ASR <= 0.1 with clean accuracy within 2 points")
    return out


def figure(table: pd.DataFrame, out: Path) -> None:
    palette = plotly.colors.qualitative.D3 + plotly.colors.qualitative.Set2
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.07,
                        subplot_titles=("data audits: AUROC vs is_poison", "input filters: AUROC vs is_triggered",
                                        "filters (diamonds), repairs (circles): mean over runs"))
    names = list(dict.fromkeys(table["defense"]))
    for i, name in enumerate(names):
        t = table[table["defense"] == name]
        kind = t["kind"].iloc[0]
        color = palette[i % len(palette)]
        label = name + (" *" if bool(t["uses_trigger"].any()) else "")
        if kind in ("data_audit", "input_filter"):
            col = 1 if kind == "data_audit" else 2
            g = t.groupby("n_poison")["auroc"]
            m, sd = g.mean(), g.std(ddof=0)
            fig.add_scatter(x=m.index.to_numpy(float), y=m.to_numpy(), error_y={"type": "data", "array": sd.to_numpy()},
                            mode="lines+markers", name=label, line={"color": color,
                                                                     "dash": "dot" if name == "loss" else "solid"},
                            row=1, col=col)
        if kind in ("repair", "input_filter"):  # one point per defense: the mean over every run
            fig.add_scatter(x=[t["clean_acc_after"].mean()], y=[t["asr_after"].mean()], mode="markers+text",
                            name=label, text=[name], textposition="middle right", textfont={"size": 10},
                            error_x={"type": "data", "array": [t["clean_acc_after"].std(ddof=0)]},
                            error_y={"type": "data", "array": [t["asr_after"].std(ddof=0)]},
                            marker={"color": color, "size": 9, "symbol": "circle" if kind == "repair" else "diamond"},
                            showlegend=kind == "repair", row=1, col=3)
    before = table.drop_duplicates("run")
    fig.add_scatter(x=[before["clean_acc_before"].mean()], y=[before["asr_before"].mean()], mode="markers",
                    name="no defense", marker={"color": "black", "symbol": "x", "size": 11}, row=1, col=3)
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text="poisoned training rows (of 4,000)", row=1, col=col)
        fig.update_yaxes(range=[0, 1.02], title_text="AUROC (mean, bars: std over seeds)", row=1, col=col)
    fig.update_xaxes(title_text="clean accuracy after", range=[-0.05, 1.35], row=1, col=3)  # room for the labels
    fig.update_yaxes(title_text="attack success rate after", range=[-0.02, 1.02], row=1, col=3)
    style(fig, "Defenses on the twins (* = uses the trigger or triggered inputs)")
    fig.update_layout(width=1500, height=640, legend={"orientation": "h", "y": -0.22, "x": 0, "yanchor": "top"},
                      margin={"b": 200})
    for f in save_figure(fig, out / "defenses", formats=("html", "png")):
        print("wrote", f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="runs/experiments/defenses")
    ap.add_argument("--counts", default="5,10,40,100")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--defenses", default=None, help="';'-separated defenses, each 'name' or 'name,key=value' "
                                                     "(default: DEFENSES)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--figures", default="figures")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--shard", default=None, help="k/n: benchmark only the finished runs i with i %% n == k (write "
                                                  "their cached rows; a final run without --shard gathers them)")
    ap.add_argument("--no-train", action="store_true", help="benchmark the runs the sweep has finished, train none")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        table = pd.read_csv(out / "defenses.csv")
    else:
        sw = pm.load_sweep(args.sweep) if args.no_train else train(args)
        if args.train_only:
            return
        names = [pm.defenses.get(_parse(n)) for n in args.defenses.split(";")] if args.defenses else DEFENSES
        if args.shard:
            k, n = (int(x) for x in args.shard.split("/"))
            done = [r for r in sw.runs if r.status == "done"]
            pm.defenses.benchmark([sw.out_dir / "runs" / r.name for i, r in enumerate(done) if i % n == k], names,
                                  errors="record")
            return
        bench = pm.defenses.benchmark(sw, names, errors="record")
        table = bench.to_frame()
        table.to_csv(out / "defenses.csv", index=False)
        bench.summary().to_csv(out / "defenses_summary.csv", index=False)
        audits = bench.model_audits()
        audits.to_csv(out / "defenses_model_audits.csv", index=False)
        print(audits.to_string(index=False))
    if "error" in table:
        for _, r in table[table["error"].notna()].iterrows():
            print(f"FAILED {r['defense']} on {r['run']}: {r['error']}")
    cols = ["auroc", "f1_at_threshold", "precision_at_k", "asr_after", "clean_acc_after", "mechanism_removed", "seconds"]
    show = table.assign(**{c: pd.to_numeric(table[c], errors="coerce") for c in cols})
    print(show.groupby(["kind", "defense", "n_poison"])[cols].agg(lambda v: f"{np.nanmean(v):.3f}±{np.nanstd(v):.3f}")
          .to_string())
    for line in verdicts(show):
        print(line)
    figure(show, out)


if __name__ == "__main__":
    main()
