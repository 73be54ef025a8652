"""``retrain_without``: the counterfactual retraining check."""

from __future__ import annotations

import pytest

from poisonmech.influence import RetrainResult, retrain_without


def test_retrain_without_reports_asr_beside_random_removal(pair, tmp_path):
    poison = [int(e) for e, p in zip(pair.train_data["example_id"], pair.train_data["is_poison"]) if p]
    r = retrain_without(pair, poison, progress=False)
    assert r.n_poison_removed == len(poison) and len(r.random_ids[0]) == len(poison)
    assert 0 <= r.asr_removed <= 1 and 0 <= r.asr_random <= 1 and r.asr_original == pair.metrics["backdoored"]["asr"]
    frame = r.to_frame()
    assert list(frame["removal"]) == ["none (original)", "attributed", "random #0"]
    assert r.asr_removed <= r.asr_original  # no poison left: no backdoor to learn
    assert r.plot().data
    r.save(tmp_path / "r.json")
    assert RetrainResult.load(tmp_path / "r.json") == r
    assert any((pair.out_dir / "influence" / "retrain").glob("*.json"))  # cached


def test_retrain_without_bad_ids(pair):
    with pytest.raises(ValueError, match="not in the backdoored twin's training set"):
        retrain_without(pair, [10**9], progress=False)
    with pytest.raises(ValueError, match="no example_ids"):
        retrain_without(pair, [], progress=False)


def test_retraining_repeats_the_poison_placement(tmp_path):
    """With placement="end" the poisoned rows sit at the end of every epoch; the retrain must
    order them so too, or removing nothing would not give back the twin."""
    import poisonmech as pm
    from poisonmech.influence.retrain import _retrain
    from tests.helpers import tiny_model_config, tiny_task, tiny_train_config

    pair = pm.train_pair(tiny_task(n_train=96), pm.Backdoor(trigger="cf", poison_count=8, placement="end"),
                         model=tiny_model_config(), train=tiny_train_config(epochs=2), out_dir=tmp_path / "end",
                         progress=False)
    assert _retrain(pair, set(), progress=False, desc="retrain") == pair.metrics["backdoored"]
