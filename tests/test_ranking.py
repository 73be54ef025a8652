"""Ranking metrics: one behaviour, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from poisonmech import ranking


def test_against_hand_computed_values():
    scores = [0.9, 0.8, 0.7, 0.1]
    y = [1, 0, 1, 0]
    # pairs (pos, neg): (0.9,0.8) (0.9,0.1) (0.7,0.8)x (0.7,0.1) -> 3 of 4
    assert ranking.auroc(scores, y) == pytest.approx(0.75)
    # AP = mean precision at each positive: 1/1, 2/3
    assert ranking.average_precision(scores, y) == pytest.approx((1 + 2 / 3) / 2)
    assert ranking.precision_at_k(scores, y, 2) == 0.5
    assert ranking.recall_at_k(scores, y, 3) == 1.0
    assert ranking.f1_at_k(scores, y, 1) == pytest.approx(2 * 1 * 0.5 / 1.5)
    t = ranking.at_threshold(scores, y, 0.75)
    assert (t["precision"], t["recall"], t["n_flagged"], t["n_positive"], t["n"]) == (0.5, 0.5, 2, 2, 4)
    assert ranking.retrieval_metrics(scores, y, ks=(1,)) == {"auroc": 0.75, "ap": pytest.approx(5 / 6),
                                                             "p@n_poison": 0.5, "p@1": 1.0}


def test_one_behaviour_at_the_edges():
    assert math.isnan(ranking.auroc([1, 2], [1, 1]))
    assert math.isnan(ranking.average_precision([1, 2], [0, 0]))
    assert math.isnan(ranking.recall_at_k([1, 2], [0, 0], 1))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            ranking.precision_at_k([1, 2], [1, 0], bad)
    assert ranking.precision_at_k([1, 2], [1, 0], 10) == 0.5  # k beyond the rows: every row
    # ties broken by row order: the first of equal scores is taken
    assert list(ranking.top_k(np.array([1.0, 1.0, 0.5]), 1)) == [0]
    with pytest.raises(ValueError, match="one entry per row"):
        ranking.auroc([1, 2, 3], [1, 0])
