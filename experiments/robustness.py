"""How robust are the default pair's mechanism numbers? The same analyses over seeds and thread counts.

One trained pair is an anecdote: a reseed, or the same seed trained with another number of
intra-op threads (different floating-point reduction orders, so different weights), gives a
different pair. This experiment trains the README's default pair (sentiment, 4,000 rows, 1% =
40 poisons of ``cf`` -> ``negative``, 2 layers, d_model 128) for every seed (the seed of the
initial weights and data order *and* of which rows are poisoned) and every thread count, then
measures on each pair, beside its controls:

- twins: ASR, clean accuracy, false-trigger rate of both twins (with denominators);
- patching: the controls' check (rows kept / dropped), the top head x position cell of exact
  activation patching and its normalized recovery, the top cross-model (clean -> backdoored) head;
- circuits: the EAP-IG top-10-edge circuit's faithfulness and its complement's under patching,
  mean and zero ablation for two metrics (logit difference, target log-probability), the ASR with
  the circuit's edges patch-ablated beside as many random edges of the same kinds;
- probes: the best layer's ``is_triggered`` probe AUROC in each twin beside the random-direction
  distribution (median / 95th percentile / max of 100) and a length-only baseline, and the
  triggered-vs-near-miss and length-balanced variants;
- direction ablation: ASR and clean accuracy with the logistic probe's or the mean-difference
  direction ablated at the best layer, beside a random unit direction there (the control);
- detectors: spectral signatures and activation clustering AUROC beside the per-example loss baseline;
- influence: unit-normalised EK-FAC retrieval AUROC / AP beside the loss baseline.

Writes ``figures/robustness.csv`` (one row per pair and quantity), ``figures/robustness_summary.csv``
(mean, sd, min, max over pairs, overall and per thread count) and ``figures/robustness.{html,png}``.
Pairs live in ``runs/robustness/seed<S>_threads<T>/`` and are reused; the analyses are cached there.

Run: ``.venv/bin/python experiments/robustness.py [--seeds 0,1,2,3,4] [--threads 1,2]
[--stage train|analyze|all]`` (about 3 minutes per pair on 2 quiet cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import poisonmech as pm
from poisonmech.cli import DEFAULT_CONFIG
from poisonmech.runtime import num_threads


def train(seed: int, n_threads: int, root: Path):
    cfg = DEFAULT_CONFIG
    task = pm.make_task(**cfg["task"])
    attack = pm.Backdoor(**{**cfg["attack"], "seed": seed})
    out = root / f"seed{seed}_threads{n_threads}"
    with num_threads(n_threads):
        t0 = time.perf_counter()
        pair = pm.train_pair(task, attack, model=pm.ModelConfig.from_dict(cfg["model"]),
                             train=pm.TrainConfig(**{**cfg["train"], "seed": seed}), out_dir=out, progress=False)
        print(f"  pair seed {seed} threads {n_threads}: {time.perf_counter() - t0:.0f} s  "
              f"asr {pair.metrics['backdoored']['asr']:.3f} / clean twin {pair.metrics['clean']['asr']:.3f}", flush=True)
    return pair, out


def measure(pair, out: Path) -> dict:
    """Every quantity of the module docstring for one pair: the library's analyses (cached
    under ``out/analyses/``) plus the twins' metrics, flattened to one row."""
    from poisonmech.analyses import run_analyses

    row: dict = {}
    for twin in ("clean", "backdoored"):
        for k, v in pair.metrics[twin].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[f"{twin}_{k}"] = v
    for summary in run_analyses(pair, ["patching", "circuits", "probes", "influence"], out).values():
        row.update(summary)
    row.update(direction_ablation(pair, out))
    return row


def direction_ablation(pair, out: Path) -> dict:
    """Does the model use the probe's direction? The backdoored twin's ASR and clean accuracy
    with the best layer's logistic-probe and mean-difference directions ablated (every
    position), beside a random unit direction at the same layer (the control). Cached in
    ``out/direction_ablation.json``."""
    import poisonmech.probes as pp
    from poisonmech.storage import read_json, write_json

    cache = out / "direction_ablation.json"
    if cache.is_file():
        return read_json(cache)
    row: dict = {}
    layer = None
    for method in ("logistic", "mean_diff"):
        r = pp.probe_layers(pair, label="is_triggered", method=method, n_random=0, progress=False)
        layer = r.best_layer
        c = pp.causal_check(pair, layer, r.direction())
        row["ablate_before_asr"], row["ablate_before_clean_acc"] = c.before["asr"], c.before["clean_acc"]
        row[f"ablate_{method}_asr"], row[f"ablate_{method}_clean_acc"] = c.after[0]["asr"], c.after[0]["clean_acc"]
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(pair.backdoored.cfg.d_model, generator=g)
    c = pp.causal_check(pair, layer, rand / rand.norm())
    row["ablate_random_asr"], row["ablate_random_clean_acc"] = c.after[0]["asr"], c.after[0]["clean_acc"]
    write_json(cache, row)
    return row


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    numeric = frame.select_dtypes("number").drop(columns=["seed", "threads"])
    parts = []
    for label, sub in [("all", frame)] + [(f"threads={t}", g) for t, g in frame.groupby("threads")]:
        s = sub[numeric.columns].agg(["mean", "std", "min", "max", "count"]).T
        s.insert(0, "pairs", label)
        parts.append(s.rename_axis("quantity").reset_index())
    return pd.concat(parts, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--stage", default="all", choices=("train", "analyze", "all"))
    ap.add_argument("--root", default="runs/robustness")
    ap.add_argument("--figures", default="figures")
    ap.add_argument("--analysis-threads", type=int, default=1,
                    help="intra-op threads for the analyses (many small forwards: 1 is fastest)")
    args = ap.parse_args()
    root = Path(args.root)
    seeds = [int(s) for s in args.seeds.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    rows = []
    for seed in seeds:
        for t in thread_counts:
            pair, out = train(seed, t, root)
            if args.stage == "train":
                continue
            t0 = time.perf_counter()
            with num_threads(args.analysis_threads):
                row = measure(pair, out)
            print(f"  analyses seed {seed} threads {t}: {time.perf_counter() - t0:.0f} s", flush=True)
            rows.append({"seed": seed, "threads": t, **row})
    if args.stage == "train":
        return
    frame = pd.DataFrame(rows)
    figs = Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    frame.to_csv(figs / "robustness.csv", index=False)
    summary = summarize(frame)
    summary.to_csv(figs / "robustness_summary.csv", index=False)
    allp = summary[summary["pairs"] == "all"].set_index("quantity")
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        print(allp[["mean", "std", "min", "max", "count"]].to_string())
    print(json.dumps({"top_heads": frame["patching_top_head"].value_counts().to_dict()}))
    plot(frame, figs)


def plot(frame: pd.DataFrame, figs: Path) -> None:
    from plotly.subplots import make_subplots

    from poisonmech.viz import save_figure

    panels = [
        ("top head x position cell (recovery)", [("exact patching", "patching_top_head_recovery"),
                                                 ("clean twin -> backdoored", "cross_model_top_head_recovery")]),
        ("circuit faithfulness (patching abl.)", [("logit diff", "faithfulness_patching_logit_diff"),
                                                  ("target logprob", "faithfulness_patching_target_logprob"),
                                                  ("complement", "complement_patching_logit_diff"),
                                                  ("mean abl., logit diff", "faithfulness_mean_logit_diff")]),
        ("ASR", [("intact", "backdoored_asr"), ("circuit ablated", "asr_circuit_ablated"),
                 ("random edges ablated", "asr_random_edges_ablated_mean"), ("clean twin", "clean_asr")]),
        ("poison retrieval AUROC", [("EK-FAC unit", "influence_auroc"), ("spectral", "spectral_auroc"),
                                    ("act. clustering", "activation_clustering_auroc"),
                                    ("loss baseline", "loss_baseline_auroc")]),
        ("ASR with a direction ablated", [("none", "ablate_before_asr"), ("logistic probe", "ablate_logistic_asr"),
                                          ("mean difference", "ablate_mean_diff_asr"),
                                          ("random direction", "ablate_random_asr"),
                                          ("clean acc., mean diff.", "ablate_mean_diff_clean_acc")]),
        ("is_triggered probe AUROC", [("backdoored", "probe_auroc_backdoored"),
                                      ("random median (bd)", "probe_random_median_backdoored"),
                                      ("random max (bd)", "probe_random_best_backdoored"),
                                      ("length only", "probe_length_auroc_backdoored"),
                                      ("clean twin", "probe_auroc_clean")]),
    ]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels])
    for col, (_, items) in enumerate(panels, start=1):
        for label, key in items:
            if key not in frame:
                continue
            for t, g in frame.groupby("threads"):
                fig.add_box(y=g[key], x=[label] * len(g), name=f"{t} thread(s)", boxpoints="all",
                            legendgroup=str(t), showlegend=col == 1 and label == items[0][0],
                            marker_color=["#1f77b4", "#ff7f0e", "#2ca02c"][int(t) % 3], row=1, col=col)
    fig.update_layout(boxmode="group", height=480, width=2250,
                      title=f"Default pair over {frame['seed'].nunique()} seeds x {frame['threads'].nunique()} "
                            "thread counts (each point one trained pair)")
    save_figure(fig, figs / "robustness", formats=("html", "png"))


if __name__ == "__main__":
    main()
