"""Linear datamodeling score (LDS) of every attribution method on a small pair.

Poison-retrieval AUROC (``benchmarks/influence_poison_retrieval.py``) says whether a method
ranks the poisoned rows first; the LDS (Park et al. 2023; dattri and kronfluence report it,
kronfluence reaching 0.44 for EK-FAC on GPT-2 / WikiText) says whether its scores *predict
counterfactuals*: the backdoored twin is retrained K times on random halves of its training
set (same initial weights, TrainConfig and order rule), and for each triggered query the
Spearman correlation across the K retrains between the summed scores of the subset's rows
and the measured ``log p(target | triggered input)`` is averaged over the queries.

The K retrains are computed once (``pm.influence.subset_retrains``, cached under the run
directory) and every method is scored against the same models. Two references frame the
numbers: random scores (the null, ~0) and the poison indicator (1 for a poisoned row, 0 for a
clean one, the same for every query: uses the ground truth, so it is an oracle of "how much
does the number of poisons in the subset explain", not a method).

Prints one line per method, ``lds_<method>: mean ± sem (n_query, K; subset-bootstrap sd)``,
beside its poison AUROC, and the wall times. Single-threaded (``torch.set_num_threads(1)``).

    .venv/bin/python benchmarks/influence_lds.py [--k 24] [--out runs/lds_small]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import poisonmech as pm  # noqa: E402
from poisonmech.influence import METHODS, attribute, linear_datamodeling_score, subset_retrains  # noqa: E402

#: (label, method, settings): the eight methods of pm.influence.attribute, baselines first, and
#: EK-FAC on unit gradients
VARIANTS: list[tuple[str, str, dict]] = [(m, m, {}) for m in reversed(METHODS)] + [
    ("ekfac_unit", "ekfac", {"renormalize": "unit"})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=24, help="retrains on random subsets (K)")
    ap.add_argument("--alpha", type=float, default=0.5, help="fraction of the training rows in each subset")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--poison", type=int, default=30, help="poisoned rows")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--queries", type=int, default=32, help="triggered test inputs used as queries")
    ap.add_argument("--seed", type=int, default=0, help="seeds the subsets (the pair is trained with seed 0)")
    ap.add_argument("--out", default="runs/lds_small", help="run directory of the pair (trained here if missing)")
    ap.add_argument("--variants", nargs="*", default=None, help="labels of VARIANTS to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny matrices on a shared machine: one thread is fastest
    t_all = time.perf_counter()

    task = pm.make_task("sentiment", n_train=args.n_train, n_test=100, seed=0)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=args.poison)
    t0 = time.perf_counter()
    pair = pm.train_pair(task, attack, model=pm.ModelConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64),
                         train=pm.TrainConfig(epochs=args.epochs, seed=0), out_dir=args.out, progress=False)
    m = pair.metrics["backdoored"]
    print(f"pair: sentiment, {len(pair.train_data)} rows ({args.poison} poisoned), 1 layer, d_model 32, "
          f"{args.epochs} epochs: backdoored ASR {m['asr']:.3f}, clean accuracy {m['clean_acc']:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    t0 = time.perf_counter()
    retrains = subset_retrains(pair, max_queries=args.queries, n_subsets=args.k, alpha=args.alpha, seed=args.seed,
                               progress=False)
    t_retrain = time.perf_counter() - t0
    meas = retrains.measurements.double().numpy()
    print(f"retrains: K {retrains.n_subsets} subsets of {len(retrains.subsets[0])} rows "
          f"({min(retrains.n_poison)}-{max(retrains.n_poison)} poisoned), {retrains.n_query} queries; "
          f"measurement log p(target | triggered): full model mean {float(retrains.full.mean()):.2f}, "
          f"retrained mean {meas.mean():.2f}, sd across subsets (mean over queries) {meas.std(0, ddof=1).mean():.2f} "
          f"({t_retrain:.0f} s)", flush=True)

    rows = []
    for label, method, kw in VARIANTS:
        if args.variants is not None and label not in args.variants:
            continue
        t0 = time.perf_counter()
        inf = attribute(pair, method=method, max_queries=args.queries, progress=False, **kw)
        r = linear_datamodeling_score(retrains, inf, method=label, seed=args.seed)
        secs = time.perf_counter() - t0
        rows.append((label, r.mean, inf.poison_auroc()))
        print(f"{r.summary()}  [poison AUROC {inf.poison_auroc():.3f}; {secs:.1f} s]", flush=True)

    rng = np.random.default_rng(args.seed)
    null = linear_datamodeling_score(retrains, rng.normal(size=(retrains.n_query, retrains.n_train)), method="random")
    print(f"{null.summary()}  [reference: random scores]")
    flags = np.asarray(pair.train_data["is_poison"], dtype=float)
    oracle = linear_datamodeling_score(retrains, np.tile(flags, (retrains.n_query, 1)), method="poison_indicator")
    print(f"{oracle.summary()}  [reference: 1 for a poisoned row, uses the ground truth]")
    best = max(rows, key=lambda x: x[1]) if rows else None
    if best is not None:
        print(f"best method by LDS: {best[0]} ({best[1]:.2f}); K retrains {t_retrain:.0f} s, "
              f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
