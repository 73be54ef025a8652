"""Poison retrieval by every attribution method, and the counterfactual retraining check.

For each poison count (default pairs ``runs/poison{k}``: the default sentiment task, trigger
``cf`` -> ``negative``, k poisoned rows out of 4,000; trained here if missing), every method
of ``pm.influence.attribute`` scores the training set against the run's triggered test
inputs, and the table gives how well the scores retrieve the poisoned rows: AUROC, average
precision (AP), precision at k (k = the number of poisons) and at 2k, with wall time. Plain
methods are joined by the fixes the literature proposes (unit-normalised gradients, relative
influence, the log-odds link, a contrastive measurement: triggered minus untriggered twin)
and by checkpoint ensembles (each checkpoint's scores standardised, then averaged).

Then, per count, the backdoored twin is retrained without the top-k rows of the method
with the best average precision (removal takes the top of the ranking, which AP measures;
AUROC weighs the whole ranking), and without k random rows (``pm.influence.retrain_without``), and the ASR of each
is printed beside the original's (and again with 2k rows when the backdoor survived k).

    .venv/bin/python benchmarks/influence_poison_retrieval.py [--counts 10 50 100] [--no-retrain]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import poisonmech as pm  # noqa: E402
from poisonmech.influence import attribute, retrain_without  # noqa: E402

#: (label, method, settings): the eight methods with defaults, then the literature's fixes
VARIANTS: list[tuple[str, str, dict]] = [
    ("loss", "loss", {}),
    ("repsim", "repsim", {}),
    ("graddot", "graddot", {}),
    ("gradcos", "gradcos", {}),
    ("tracin", "tracin", {}),
    ("trak", "trak", {}),
    ("kfac", "kfac", {}),
    ("ekfac", "ekfac", {}),
    ("repsim contrastive", "repsim", {"measurement": "contrastive"}),
    ("graddot contrastive-logodds", "graddot", {"measurement": "contrastive_logodds"}),
    ("gradcos contrastive-logodds", "gradcos", {"measurement": "contrastive_logodds"}),
    ("tracin unit", "tracin", {"renormalize": "unit"}),
    ("ekfac unit", "ekfac", {"renormalize": "unit"}),
    ("ekfac relative", "ekfac", {"renormalize": "relative"}),
    ("ekfac logodds", "ekfac", {"measurement": "logodds"}),
    ("ekfac contrastive", "ekfac", {"measurement": "contrastive"}),
    ("ekfac contrastive-logodds", "ekfac", {"measurement": "contrastive_logodds"}),
    ("trak ensemble", "trak", {"ensemble": "all"}),
    ("ekfac ensemble", "ekfac", {"ensemble": "all"}),
    ("ekfac unit ensemble", "ekfac", {"renormalize": "unit", "ensemble": "all"}),
]


def load_or_train(count: int, root: Path):
    out = root / f"poison{count}"
    if not (out / "metrics.json").is_file():
        task = pm.make_task("sentiment", n_train=4000, n_test=500, seed=0)
        return pm.train_pair(task, pm.Backdoor(trigger="cf", target="negative", poison_count=count), out_dir=out)
    return pm.load_pair(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--runs", default="runs", help="folder holding runs/poison{k}")
    ap.add_argument("--no-retrain", action="store_true", help="skip the retraining check")
    ap.add_argument("--variants", nargs="*", default=None, help="labels of VARIANTS to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small matrices on a shared machine: one thread is fastest
    variants = [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    rows, best, best_ap = [], {}, {}
    for count in args.counts:
        pair = load_or_train(count, Path(args.runs))
        asr = pair.metrics["backdoored"]["asr"]
        print(f"\n== {count} poisoned rows of {len(pair.train_data)} (backdoored twin ASR {asr:.3f}) ==", flush=True)
        for label, method, kw in variants:
            t0 = time.perf_counter()
            # the mean measurement over queries: for every method equal to the mean of its
            # per-query scores, which is what the retrieval metrics rank
            if kw.get("ensemble") == "all":  # every checkpoint of the run
                kw = {**kw, "ensemble": len(pair.checkpoints["backdoored"])}
            r = attribute(pair, method=method, aggregate=True, progress=False, **kw)
            secs = r.settings["seconds"] if "seconds" in r.settings else time.perf_counter() - t0
            m = {"count": count, "method": label, "auroc": r.poison_auroc(), "ap": r.average_precision(),
                 "p@k": r.precision_at(count), "p@2k": r.precision_at(2 * count), "seconds": secs}
            rows.append(m)
            print(f"  {label:30s} AUROC {m['auroc']:.3f}  AP {m['ap']:.3f}  P@{count} {m['p@k']:.3f}  "
                  f"P@{2 * count} {m['p@2k']:.3f}  ({secs:.0f} s)", flush=True)
            if count not in best or (m["auroc"], m["ap"]) > (best[count][1]["auroc"], best[count][1]["ap"]):
                best[count] = (r, m)
            # retraining removes the top of the ranking, which average precision measures
            if count not in best_ap or (m["ap"], m["auroc"]) > (best_ap[count][1]["ap"], best_ap[count][1]["auroc"]):
                best_ap[count] = (r, m)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print("\nAUROC by method (rows) and poison count (columns):")
    print(table.pivot(index="method", columns="count", values="auroc").loc[[v[0] for v in variants]].round(3))
    print("\nAP by method and poison count:")
    print(table.pivot(index="method", columns="count", values="ap").loc[[v[0] for v in variants]].round(3))
    print("\nprecision@k (k = poison count) by method and poison count:")
    print(table.pivot(index="method", columns="count", values="p@k").loc[[v[0] for v in variants]].round(3))
    print("\nbest method per count:")
    for count, (_, m) in best.items():
        ek = table[(table["count"] == count) & (table["method"] == "ekfac")]["auroc"]
        ek_s = f"{float(ek.iloc[0]):.3f}" if len(ek) else "n/a"
        print(f"  {count:4d}: {m['method']:30s} AUROC {m['auroc']:.3f} AP {m['ap']:.3f}  (plain ekfac AUROC {ek_s})")

    if args.no_retrain:
        return
    print("\nretraining the backdoored twin without the top-k rows of the method with the best average "
          "precision vs k random rows:")
    for count, (r, m) in best_ap.items():
        pair = load_or_train(count, Path(args.runs))
        for k in (count, 2 * count):
            top = [int(i) for i in r.top(k)["example_id"]]
            t0 = time.perf_counter()
            rr = retrain_without(pair, top, n_random=1, seed=0, progress=False)
            print(f"  {count:4d} poisons, removing {k} rows: original ASR {rr.asr_original:.3f} | "
                  f"top-{k} by {m['method']} ({rr.n_poison_removed} poisons) -> ASR {rr.asr_removed:.3f} | "
                  f"{k} random ({rr.n_poison_random[0]} poisons) -> ASR {rr.asr_random:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if rr.asr_removed <= 0.5:  # the backdoor is gone: no need to remove more
                break


if __name__ == "__main__":
    main()
