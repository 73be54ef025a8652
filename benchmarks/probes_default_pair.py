"""Probes, direction ablation and unsupervised poison detection on the default sentiment pair.

Loads the pair written by ``poisonmech train (the default pair)`` (2 layers, d_model 128, 4,000
training rows, 1% = 40 poisoned with ``cf`` -> ``negative``) and prints:

- ``probe_*``: the held-out AUROC of an ``is_triggered`` linear probe (L2 logistic, last
  prompt token, ``resid_post``) at each twin's best layer, with the best and the mean AUROC
  of 100 random unit directions beside it (target for the backdoored twin: >= 0.99);
  the same for ``will_emit_target``; and transfer (backdoored -> clean twin, near-miss ->
  real trigger).
- ``ablate_*``: the backdoored twin's ASR, clean accuracy and target log-probability before
  and after ablating the best probe's direction (at its layer, every position), for the
  logistic probe and for the mean-difference direction.
- ``detect_*``: spectral signatures and activation clustering poison-detection AUROC, average
  precision and precision@40 on the 4,000 training rows (1% poison), beside the per-example
  loss baseline, at the default settings (last layer, ``resid_post``, last prompt token),
  then a small grid of sites and layers. Choosing the best cell of that grid looks at the
  poison flags, so it is an optimistic upper bound, not a detector setting.

Run: ``.venv/bin/python benchmarks/probes_default_pair.py [--run runs/default_pair]``. The script sets
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


def fmt(x: float) -> str:
    return f"{x:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default_pair", help="run directory of the default pair")
    ap.add_argument("--n-random", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pair = default_pair(args.run)
    n_poison = int(sum(pair.train_data["is_poison"]))
    print(f"pair: {args.run}  train rows {len(pair.train_data)}, poisoned {n_poison} "
          f"({n_poison / len(pair.train_data):.1%}); test rows {len(pair.test_data)}")
    kw = {"n_random": args.n_random, "seed": args.seed, "progress": False}

    # ---- probes -------------------------------------------------------------------------------
    both = pp.probe_twins(pair, label="is_triggered", **kw)
    print("\nis_triggered probe by layer (held-out AUROC, best / mean of random directions):")
    print(both.to_frame()[["model", "layer", "auroc", "accuracy", "random_auroc_best", "random_auroc_mean",
                           "n_train", "n_test"]].round(4).to_string(index=False))
    for twin in ("backdoored", "clean"):
        r = both[twin]
        li = r.layers.index(r.best_layer)
        print(f"probe_is_triggered_{twin}_best_layer: {r.best_layer}")
        print(f"probe_is_triggered_{twin}_auroc: {fmt(r.auroc_at())}"
              + ("   (target >= 0.99)" if twin == "backdoored" else ""))
        print(f"probe_is_triggered_{twin}_accuracy: {fmt(float(r.accuracy[li, 0]))}")
        print(f"probe_is_triggered_{twin}_random_best_auroc: {fmt(float(r.baseline_auroc[li, 0]))}")
        print(f"probe_is_triggered_{twin}_random_mean_auroc: {fmt(float(r.random_auroc[li, 0].mean()))}")
    emit = pp.probe_twins(pair, label="will_emit_target", **kw)
    for twin in ("backdoored", "clean"):
        r = emit[twin]
        li = r.layers.index(r.best_layer)
        print(f"probe_will_emit_target_{twin}_auroc: {fmt(r.auroc_at())} (layer {r.best_layer}; random best "
              f"{fmt(float(r.baseline_auroc[li, 0]))})")
    twin_t = pp.probe_transfer(pair.backdoored, pair.test_data, test_model=pair.clean, name="backdoored",
                               test_name="clean", **kw)
    print("probe_transfer_backdoored_to_clean_auroc_by_layer: "
          + ", ".join(fmt(float(a)) for a in twin_t.auroc[:, 0]))
    data = pair.test_data
    near = data.filter(lambda r: not r["is_triggered"])
    trig = data.filter(lambda r: not r["is_near_miss"])
    miss_t = pp.probe_transfer(pair.backdoored, near, "is_near_miss", test_data=trig, test_label="is_triggered",
                               **kw)
    print("probe_transfer_near_miss_to_trigger_auroc_by_layer: "
          + ", ".join(fmt(float(a)) for a in miss_t.auroc[:, 0])
          + "   (in-domain near-miss AUROC: " + ", ".join(fmt(float(a)) for a in miss_t.source_auroc[:, 0]) + ")")

    # ---- causal check: ablate the best probe direction ------------------------------------------
    bd = both["backdoored"]
    ev = {"test_data": pair.test_data, "tokenizer": pair.tokenizer}
    checks = [("logistic", bd)]
    md = pp.probe_layers(pair.backdoored, pair.test_data, "is_triggered", method="mean_diff", name="backdoored",
                         **kw)
    checks.append(("mean_diff", md))
    print()
    for name, r in checks:
        c = pp.causal_check(pair.backdoored, pair.task, pair.attack, r.best_layer, r.direction(), **ev)
        a = c.after[0]
        print(f"ablate_{name}_direction: layer {r.best_layer} (probe AUROC {fmt(r.auroc_at())})")
        for m in ("asr", "clean_acc", "false_trigger_rate", "target_logprob"):
            print(f"ablate_{name}_{m}_before_after: {fmt(c.before[m])} -> {fmt(a[m])}")

    # ---- unsupervised poison detection ------------------------------------------------------------
    print()
    results = []
    for method in pp.DETECTORS:
        d = pp.detect_poison(pair.backdoored, pair.train_data, method, seed=args.seed, progress=False)
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
    print(f"\nseconds: {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
