"""Our EK-FAC scores against kronfluence's on the same model, data, measurement and damping."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from poisonmech.influence import attribute, backdoor_query

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("kronfluence") is None,
    reason="kronfluence is not installed (pip install --no-deps kronfluence einconv opt-einsum)")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_ekfac_rank_correlates_with_kronfluence(pair, fisher):
    from poisonmech.influence.peers import kronfluence_scores

    q = backdoor_query(pair, max_queries=6)
    ours = attribute(pair.backdoored, train=pair.train_data, query=q, method="ekfac", fisher=fisher,
                     progress=False)
    theirs = kronfluence_scores(pair.backdoored, pair.train_data, q, pair.tokenizer,
                                empirical_fisher=fisher == "empirical")
    assert theirs.scores.shape == ours.scores.shape
    assert _spearman(ours.scores, theirs.scores) >= 0.95
    assert _spearman(ours.train_scores, theirs.scores.mean(0)) >= 0.95


def test_kfac_rank_correlates_with_kronfluence(pair):
    from poisonmech.influence.peers import kronfluence_scores

    q = backdoor_query(pair, max_queries=6)
    ours = attribute(pair.backdoored, train=pair.train_data, query=q, method="kfac", fisher="empirical",
                     progress=False)
    theirs = kronfluence_scores(pair.backdoored, pair.train_data, q, pair.tokenizer, strategy="kfac",
                                empirical_fisher=True)
    assert _spearman(ours.scores, theirs.scores) >= 0.95
