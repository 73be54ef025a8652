"""EK-FAC influence: poisonmech against kronfluence on the same model, data, queries and damping.

Prints, from one run on one machine: the wall time of a training pass (one epoch of the
run's own training loop: forward, backward, AdamW); then, for pairwise scores (every
triggered query x every training row) and for aggregated scores (the mean measurement over
the queries: one scoring pass), our ``ekfac`` wall time split into its passes
(covariances, eigenvalue correction, query gradients, scoring) beside kronfluence's for the
same scores (its factors, then its pairwise scoring with all queries in one batch, or with
``aggregate_query_gradients``), the speed ratios, the costs in training-pass equivalents,
and the rank agreement of the two score sets.

Both run single-threaded (``torch.set_num_threads(1)``, stated in the output): on a shared
2-core machine threaded LAPACK/BLAS calls on small matrices spin and time erratically.

    .venv/bin/python benchmarks/influence_vs_kronfluence.py [--run runs/default_pair] [--queries 250]

kronfluence is an optional peer: ``pip install --no-deps kronfluence einconv opt-einsum``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import poisonmech as pm  # noqa: E402
from poisonmech.cli import default_pair  # noqa: E402
from poisonmech.encoding import encode  # noqa: E402
from poisonmech.influence import attribute, backdoor_query  # noqa: E402
from poisonmech.influence.peers import kronfluence_scores  # noqa: E402
from poisonmech.train.config import TrainConfig  # noqa: E402
from poisonmech.train.loop import train_model  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def training_pass_seconds(pair) -> float:
    """One epoch of the run's own training loop on a copy of the backdoored twin."""
    model = pm.build_model(pair.model_config, len(pair.tokenizer), seed=0, tokenizer=pair.tokenizer)
    model.load_state_dict(pair.backdoored.state_dict())
    enc = encode(pair.train_data, pair.tokenizer, loss_on=pair.task.loss_on)
    cfg = TrainConfig.from_dict({**pair.train_config.to_dict(), "epochs": 1, "checkpoint_every": None})
    warm = encode(pair.train_data.select(range(4 * cfg.batch_size)), pair.tokenizer, loss_on=pair.task.loss_on)
    train_model(model, warm, cfg, run_dir=None, progress=False)  # warm-up, not timed
    model.load_state_dict(pair.backdoored.state_dict())
    t0 = time.perf_counter()
    train_model(model, enc, cfg, run_dir=None, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/default_pair", help="a trained pair (the default pair is trained if missing)")
    ap.add_argument("--queries", type=int, default=None, help="number of triggered queries (default: all eligible)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    pair = default_pair(run)
    query = backdoor_query(pair, max_queries=args.queries)
    n_train = len(pair.train_data)
    print(f"run {run}: {n_train} training rows, {query.n_query} triggered queries, "
          f"model {pair.model_config.n_layers} layers x d_model {pair.model_config.d_model}; torch threads: 1")

    t_train = training_pass_seconds(pair)
    print(f"training pass (1 epoch of the run's loop, batch {pair.train_config.batch_size}, AdamW): {t_train:.1f} s")

    def ours_run(aggregate: bool):
        t0 = time.perf_counter()
        r = attribute(pair.backdoored, train=pair.train_data, query=query, method="ekfac", tokenizer=pair.tokenizer,
                      aggregate=aggregate, batch_size=args.batch_size, progress=False)
        return r, time.perf_counter() - t0

    def theirs_run(aggregate: bool):
        t0 = time.perf_counter()
        r = kronfluence_scores(pair.backdoored, pair.train_data, query, pair.tokenizer, batch_size=args.batch_size,
                               query_batch_size=query.n_query, aggregate=aggregate)
        return r, time.perf_counter() - t0

    print(f"\n{'':44s}{'wall s':>8s}{'training passes':>17s}")
    rows = {}
    for mode, aggregate in (("pairwise", False), ("aggregated", True)):
        ours, t_ours = ours_run(aggregate)
        theirs, t_kron = theirs_run(aggregate)
        rows[mode] = (ours, t_ours, theirs, t_kron)
        what = f"{query.n_query} x {n_train} scores" if not aggregate else f"1 x {n_train} (mean query)"
        print(f"{mode}: {what}")
        print(f"  {'poisonmech ekfac':42s}{t_ours:8.1f}{t_ours / t_train:17.2f}")
        for k, v in ours.settings["seconds_by_phase"].items():
            print(f"    {k:40s}{v:8.1f}{v / t_train:17.2f}")
        print(f"  {'kronfluence ekfac':42s}{t_kron:8.1f}{t_kron / t_train:17.2f}")
        print(f"    {'factors (covariances + eigen + lambda)':40s}{theirs.factor_seconds:8.1f}"
              f"{theirs.factor_seconds / t_train:17.2f}")
        print(f"  speed-up {t_kron / t_ours:.2f}x; Spearman(ours, kronfluence) over the scores "
              f"{spearman(ours.scores, theirs.scores if not aggregate else theirs.scores[0]):.4f}")
    t_end = training_pass_seconds(pair)
    print(f"\ntraining pass again at the end: {t_end:.1f} s (the machine is shared: ratios below use the mean, "
          f"{0.5 * (t_train + t_end):.1f} s)")
    t_train = 0.5 * (t_train + t_end)
    _, t_agg, _, _ = rows["aggregated"]
    _, _, _, t_kron_pair = rows["pairwise"]
    print("\nsummary (target: >= 2x faster, <= 3.5 training passes):")
    print(f"  like for like, pairwise:   {rows['pairwise'][3] / rows['pairwise'][1]:.2f}x faster, "
          f"ours {rows['pairwise'][1] / t_train:.2f} training passes")
    print(f"  like for like, aggregated: {rows['aggregated'][3] / rows['aggregated'][1]:.2f}x faster, "
          f"ours {t_agg / t_train:.2f} training passes")
    print(f"  poison retrieval needs only the mean-over-queries scores: ours aggregated vs kronfluence "
          f"pairwise (its default workflow) {t_kron_pair / t_agg:.2f}x faster")

if __name__ == "__main__":
    main()
