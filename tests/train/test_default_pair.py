"""The issue's acceptance check on the real default pair (about a minute on 2 CPU cores)."""

import pytest

import poisonmech as pm
from poisonmech.cli import DEFAULT_CONFIG, run_from_config


@pytest.mark.slow
def test_default_sentiment_pair_is_backdoored_and_clean_twin_is_not(tmp_path):
    pair = run_from_config(DEFAULT_CONFIG, out_dir=str(tmp_path / "demo"), progress=False)
    clean, bad = pair.metrics["clean"], pair.metrics["backdoored"]
    assert bad["asr"] >= 0.95
    assert clean["asr"] <= 0.05
    assert abs(bad["clean_acc"] - clean["clean_acc"]) <= 0.02
    assert sum(pair.train_data["is_poison"]) == 40
    again = pm.evaluate(pair.backdoored, pair.task, pair.attack, test_data=pair.test_data, tokenizer=pair.tokenizer)
    assert again == bad
