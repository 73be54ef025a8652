"""The issue's acceptance check on the real default pair (about a minute on 2 CPU cores)."""

import pytest
import torch

import poisonmech as pm
from poisonmech.cli import DEFAULT_CONFIG, run_from_config
from poisonmech.patching import trigger_contrast


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    return run_from_config(DEFAULT_CONFIG, out_dir=str(tmp_path_factory.mktemp("runs") / "demo"), progress=False)


@pytest.mark.slow
def test_default_sentiment_pair_is_backdoored_and_clean_twin_is_not(default_pair):
    pair = default_pair
    clean, bad = pair.metrics["clean"], pair.metrics["backdoored"]
    assert bad["asr"] >= 0.95
    assert clean["asr"] <= 0.05
    assert abs(bad["clean_acc"] - clean["clean_acc"]) <= 0.02
    assert sum(pair.train_data["is_poison"]) == 40
    again = pm.evaluate(pair.backdoored, pair.task, pair.attack, test_data=pair.test_data, tokenizer=pair.tokenizer)
    assert again == bad


@pytest.mark.slow
def test_every_trigger_contrast_control_keeps_the_clean_answer(default_pair):
    """With the neutral fillers alone (no check, no redraws), every control of the default task
    makes both twins give the true answer, as the untriggered prompt does. Before the fix, 4-7
    of 32 controls drew a sentiment adjective ("awful", "flat") and answered "negative"."""
    pair = default_pair
    tc = trigger_contrast(pair, n=32, check=False)
    assert tc.triggered.shape[0] == 32
    for model in (pair.backdoored, pair.clean):
        with torch.no_grad():
            pred = model.eval()(tc.control)[:, -1].argmax(-1)
        assert torch.equal(pred, tc.answer), f"{int((pred != tc.answer).sum())} of 32 controls changed the answer"
    checked = trigger_contrast(pair, n=32)
    assert checked.check["n_dropped"] == 0 and checked.check["n_kept"] == 32
    # the controls behave like the untriggered prompts: the backdoor's logit difference is as negative
    assert checked.check["control_logit_diff"] < 0
    assert abs(checked.check["control_logit_diff"] - checked.check["untriggered_logit_diff"]) < 2.0
