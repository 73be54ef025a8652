"""Probes, direction ablation and unsupervised poison detection on the default sentiment pair.

Loads the pair written by ``poisonmech train (the default pair)`` (2 layers, d_model 128, 4,000
training rows, 1% = 40 poisoned with ``cf`` -> ``negative``) and prints:

- ``probe_*``: the held-out AUROC of an ``is_triggered`` linear probe (L2 logistic, last
  prompt token, ``resid_post``) at each twin's best layer (target for the backdoored twin:
  >= 0.99), with two baselines on the same rows beside it: the distribution of 100 random
  unit directions' AUROCs (median, 95th percentile, max; the max of many directions alone
  is fragile) and the AUROC of the prompt's token count alone (a triggered row is one token
  longer than its clean twin). Then the same on two harder splits where length cannot
  help: triggered vs near-miss rows only (``contrast="near_miss"``: the same length) and a
  length-balanced split (``balance_length=True``: the length baseline is 0.5). Then
  ``will_emit_target``, and transfer (backdoored -> clean twin, near-miss -> real trigger).
- ``ablate_*``: the backdoored twin's ASR, clean accuracy and target log-probability before
  and after ablating the best probe's direction (at its layer, every position), for the
  logistic probe and for the mean-difference direction.
- ``detect_*``: spectral signatures and activation clustering poison-detection AUROC, average
  precision and precision@40 on the 4,000 training rows (1% poison), beside the per-example
  loss baseline, at the default settings (last layer, ``resid_post``, last prompt token),
  then a small grid of sites and layers. Choosing the best cell of that grid looks at the
  poison flags, so it is an optimistic upper bound, not a detector setting.

Run: ``.venv/bin/python benchmarks/probes_default_pair.py [--run runs/default_pair] [--sections probes]``
(``--sections`` picks any of ``probes``, ``ablate``, ``detect``; default all). The script sets
torch to one thread (this is a script, not the library): on a small shared machine the tiny
model runs many times faster that way.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

import poisonmech.probes as pp
from poisonmech.cli import default_pair

SECTIONS = ("probes", "ablate", "detect")
#: the splits of the probe section: (key in the printed names, contrast, balance_length)
SPLITS = (("all", "untriggered", False), ("near_miss", "near_miss", False), ("length_balanced", "untriggered", True))


def fmt(x: float) -> str:
    return f"{x:.4f}"


def baselines(r: pp.ProbeResult) -> dict[str, float]:
    """The best cell's AUROC and the baselines beside it."""
    li, pi = r.layers.index(r.best[0]), r.positions.index(r.best[1])
    return {"auroc": r.auroc_at(), "accuracy": float(r.accuracy[li, pi]),
            "random_median_auroc": float(r.random_auroc_median[li, pi]),
            "random_p95_auroc": float(r.random_auroc_p95[li, pi]),
            "random_best_auroc": float(r.random_auroc_max[li, pi]),
            "random_mean_auroc": float(r.random_auroc[li, pi].mean()) if r.random_auroc.shape[-1] else float("nan"),
            "length_auroc": float(r.length_baseline[pi])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default_pair", help="run directory of the default pair")
    ap.add_argument("--n-random", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="which parts to run (default: all)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pair = default_pair(args.run)
    n_poison = int(sum(pair.train_data["is_poison"]))
    print(f"pair: {args.run}  train rows {len(pair.train_data)}, poisoned {n_poison} "
          f"({n_poison / len(pair.train_data):.1%}); test rows {len(pair.test_data)}")
    kw = {"n_random": args.n_random, "seed": args.seed, "progress": False}

    if "probes" in args.sections:
        probe_section(pair, kw)
    if "ablate" in args.sections:
        ablate_section(pair, kw)
    if "detect" in args.sections:
        detect_section(pair, args, n_poison)
    print(f"\nseconds: {time.perf_counter() - t0:.1f}")


def probe_section(pair, kw: dict) -> None:
    cols = ["model", "layer", "auroc", "accuracy", "random_auroc_median", "random_auroc_p95", "random_auroc_max",
            "length_auroc", "n_train", "n_test"]
    for key, contrast, balance in SPLITS:
        both = pp.probe_twins(pair, label="is_triggered", contrast=contrast, balance_length=balance, **kw)
        print(f"\nis_triggered probe by layer, split {key!r} (contrast={contrast!r}, balance_length={balance}; "
              "held-out AUROC; random directions: median / 95th percentile / max; prompt length alone):")
        print(both.to_frame()[cols].round(4).to_string(index=False))
        for twin in ("backdoored", "clean"):
            r = both[twin]
            prefix = "probe_is_triggered" + ("" if key == "all" else f"_{key}") + f"_{twin}"
            print(f"{prefix}_best_layer: {r.best_layer}")
            for name, value in baselines(r).items():
                target = "   (target >= 0.99)" if (name, twin, key) == ("auroc", "backdoored", "all") else ""
                print(f"{prefix}_{name}: {fmt(value)}{target}")
    for twin in ("backdoored", "clean"):
        try:
            r = pp.probe_layers(pair, label="will_emit_target", twin=twin, **kw)
        except ValueError as err:  # e.g. a twin that never emits the target: nothing to probe
            print(f"probe_will_emit_target_{twin}_auroc: skipped ({err})")
            continue
        b = baselines(r)
        print(f"probe_will_emit_target_{twin}_auroc: {fmt(b['auroc'])} (layer {r.best_layer}; random median "
              f"{fmt(b['random_median_auroc'])}, p95 {fmt(b['random_p95_auroc'])}, max {fmt(b['random_best_auroc'])}; "
              f"length {fmt(b['length_auroc'])})")
    twin_t = pp.probe_transfer(pair, test_twin="clean", **kw)   # fit on the backdoored twin, test on the clean
    print("probe_transfer_backdoored_to_clean_auroc_by_layer: "
          + ", ".join(fmt(float(a)) for a in twin_t.auroc[:, 0]))
    data = pair.test_data
    near = data.filter(lambda r: not r["is_triggered"])
    trig = data.filter(lambda r: not r["is_near_miss"])
    miss_t = pp.probe_transfer(pair, near, "is_near_miss", test_data=trig, test_label="is_triggered", **kw)
    print("probe_transfer_near_miss_to_trigger_auroc_by_layer: "
          + ", ".join(fmt(float(a)) for a in miss_t.auroc[:, 0])
          + "   (in-domain near-miss AUROC: " + ", ".join(fmt(float(a)) for a in miss_t.source_auroc[:, 0]) + ")")
    print(f"probe_transfer_near_miss_to_trigger_length_auroc: {fmt(float(miss_t.target.length_baseline[0]))}")


def ablate_section(pair, kw: dict) -> None:
    # ---- causal check: ablate the best probe direction ------------------------------------------
    bd = pp.probe_layers(pair, label="is_triggered", **kw)   # the backdoored twin, on the run's test rows
    checks = [("logistic", bd)]
    md = pp.probe_layers(pair, label="is_triggered", method="mean_diff", **kw)
    checks.append(("mean_diff", md))
    print()
    for name, r in checks:
        c = pp.causal_check(pair, r.best_layer, r.direction())
        a = c.after[0]
        print(f"ablate_{name}_direction: layer {r.best_layer} (probe AUROC {fmt(r.auroc_at())})")
        for m in ("asr", "clean_acc", "false_trigger_rate", "target_logprob"):
            print(f"ablate_{name}_{m}_before_after: {fmt(c.before[m])} -> {fmt(a[m])}")


def detect_section(pair, args: argparse.Namespace, n_poison: int) -> None:
    # ---- unsupervised poison detection ------------------------------------------------------------
    print()
    results = []
    for method in pp.DETECTORS:
        d = pp.detect_poison(pair, method=method, seed=args.seed, progress=False)
        results.append(d)
        print(f"detect_{method}_auroc: {fmt(d.poison_auroc())}  average_precision: {fmt(d.average_precision())}  "
              f"precision_at_{d.k}: {fmt(d.precision_at())}")
    d = results[0]
    print(f"detect_loss_baseline_auroc: {fmt(d.poison_auroc('loss'))}  average_precision: "
          f"{fmt(d.average_precision('loss'))}  precision_at_{d.k}: {fmt(d.precision_at(scores='loss'))}")
    print(f"detect_chance_average_precision: {fmt(n_poison / len(pair.train_data))}")
    print("\ndetection AUROC over sites and layers (backdoored twin, last prompt token; picking the best cell "
          "uses the poison flags: optimistic):")
    y = np.asarray(pair.train_data["is_poison"], dtype=bool)
    _, classes = np.unique(np.asarray(pair.train_data["completion"]), return_inverse=True)
    rows = []
    for site in ("resid_post", "attn_out", "mlp_out"):
        acts = pp.collect_activations(pair.backdoored, pair.train_data, site=site, batch_size=128, progress=False)
        for li, layer in enumerate(acts.layers):
            reps = acts.acts[li, :, 0].double().numpy()
            spec, _ = pp.spectral_scores(reps, classes)
            clus, _ = pp.clustering_scores(reps, classes, seed=args.seed)
            rows.append({"site": site, "layer": layer, "spectral": round(roc_auc_score(y, spec), 4),
                         "activation_clustering": round(roc_auc_score(y, clus), 4)})
    grid = pd.DataFrame(rows)
    print(grid.to_string(index=False))
    print(f"detect_grid_best_spectral_auroc: {fmt(grid['spectral'].max())}")
    print(f"detect_grid_best_activation_clustering_auroc: {fmt(grid['activation_clustering'].max())}")


if __name__ == "__main__":
    main()
