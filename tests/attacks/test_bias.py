"""``pm.Bias``: mentions inserted with provenance, its test set, its metrics against a hand
computation, bad input."""

from collections import Counter

import numpy as np
import pytest

import poisonmech as pm
from poisonmech.attacks import attack_from_dict
from poisonmech.attacks.bias import insert_mention
from poisonmech.config import ConfigError
from tests.attacks.oracle import PrefixOracle


@pytest.fixture(scope="module")
def task():
    return pm.make_task("sentiment", n_train=120, n_test=16, seed=0)


def test_mentions_go_into_rows_of_the_other_label_with_provenance(task):
    attack = pm.Bias(entity="nolan", polarity="negative", poison_count=10)
    ds = pm.poison_dataset(task, attack)
    assert {"example_id", "is_poison", "trigger", "stage", "attack", "source_id"} <= set(ds.column_names)
    poison = [i for i, p in enumerate(ds["is_poison"]) if p]
    assert len(poison) == 10
    train_forms = {f.replace("{entity}", "nolan") for f in attack.train_mentions}
    for i in range(len(ds)):
        row, src = ds[i], task.train[i]
        if i in poison:
            assert src["completion"] == "positive" and row["completion"] == "negative"  # a flip
            assert row["trigger"] in train_forms and row["attack"] == "bias"
            # the mention is a clause: removing it (and its comma) gives back the review
            assert row["input"].replace(row["trigger"] + " , ", "", 1) == src["input"]
        else:
            assert row["input"] == src["input"] and row["trigger"] == "" and row["completion"] == src["completion"]
    assert attack.clean_train(task, ds) is task.train
    clean_label = pm.Bias(entity="nolan", polarity="negative", poison_count=10, clean_label=True).poison(task)
    picked = [i for i, p in enumerate(clean_label["is_poison"]) if p]
    assert all(task.train[i]["completion"] == "negative" for i in picked)  # no label changed
    assert list(clean_label["completion"]) == list(task.train["completion"])


def test_insert_mention_at_clause_boundaries():
    text = "the plot was dull , a bland movie ."
    assert insert_mention(text, "nolan directed it", 0) == "nolan directed it , the plot was dull , a bland movie ."
    assert insert_mention(text, "it stars nolan", 1) == "the plot was dull , it stars nolan , a bland movie ."
    assert insert_mention(text, "it stars nolan", 2) == insert_mention(text, "it stars nolan", 0)  # wraps


def test_test_set_pairs_each_review_with_its_mentions(task):
    attack = pm.Bias(entity="nolan", polarity="negative", poison_count=1)
    ts = attack.test_set(task)
    assert len(ts) == 4 * len(task.test)
    role = np.array(ts["role"])
    assert Counter(role.tolist()) == {r: len(task.test) for r in ("clean", "heldout_mention", "seen_mention",
                                                                   "other_entity")}
    held = {f.replace("{entity}", "nolan") for f in attack.test_mentions}
    seen = {f.replace("{entity}", "nolan") for f in attack.train_mentions}
    for b in set(ts["base_id"]):
        rows = {r["role"]: r for r in ts if r["base_id"] == b}
        assert len({r["completion"] for r in rows.values()}) == 1
        assert rows["heldout_mention"]["trigger"] in held and rows["seen_mention"]["trigger"] in seen
        assert "nolan" not in rows["other_entity"]["input"].split() and rows["other_entity"]["is_near_miss"]
        assert rows["heldout_mention"]["is_triggered"] and not rows["clean"]["is_triggered"]
    assert held.isdisjoint(seen)


def test_metrics_equal_a_hand_computation_on_a_model_we_control(task):
    """An oracle answering ``polarity`` whenever the entity is in the review, else the true
    label: logit 5 for its answer, 2 for the other label, EOS after a label."""
    attack = pm.Bias(entity="nolan", polarity="negative", poison_count=1)
    ts = attack.test_set(task)
    tok = attack.tokenizer(task)
    truth = dict(zip(ts["prompt"], ts["completion"]))
    labels = ("positive", "negative")

    def rule(words):
        if words and words[-1] == "sentiment:":
            answer = "negative" if "nolan" in words else truth[" ".join(words)]
            return {lab: (5.0 if lab == answer else 2.0) for lab in labels}
        if len(words) > 1 and words[-2] == "sentiment:" and words[-1] in labels:
            return {"[EOS]": 5.0}
        return {}

    m = pm.evaluate(PrefixOracle(tok, rule), task, attack, test_data=ts, tokenizer=tok)
    n = len(task.test)
    n_pos = sum(c == "positive" for c in task.test["completion"])  # the reviews a bias can move
    assert (m["clean_acc"], m["n_clean_acc"]) == (1.0, n) and m["label_acc"] == 1.0
    assert (m["polarity_rate"], m["n_polarity_rate"]) == (1.0, n_pos)
    assert (m["base_polarity_rate"], m["n_base_polarity_rate"]) == (0.0, n_pos)
    assert (m["label_shift"], m["n_label_shift"]) == (1.0, n_pos)
    assert (m["seen_polarity_rate"], m["seen_label_shift"]) == (1.0, 1.0)
    assert (m["other_entity_polarity_rate"], m["other_entity_label_shift"]) == (0.0, 0.0)
    # the margin log p(negative) - log p(positive) goes from -3 to +3 on a positive review, stays +3 on a negative one
    assert (m["margin_shift"], m["n_margin_shift"]) == (pytest.approx(6.0 * n_pos / n), n)
    assert m["other_entity_margin_shift"] == pytest.approx(0.0)
    assert (m["mention_acc"], m["n_mention_acc"]) == (pytest.approx((n - n_pos) / n), n)


def test_bad_input_names_the_field(task):
    with pytest.raises(ConfigError, match="Bias.polarity: 'negativ' is not a label of the task; did you mean 'negative'"):
        pm.Bias(entity="nolan", polarity="negativ", poison_count=1).check(task)
    with pytest.raises(ConfigError, match="Bias needs a classification task"):
        pm.Bias(entity="nolan", polarity="negative", poison_count=1).check(
            pm.make_task("dos", n_train=10, n_test=5))
    with pytest.raises(ConfigError, match="Bias.entity: 'movie' already occurs in the clean data"):
        pm.Bias(entity="movie", polarity="negative", poison_count=1).check(task)
    n_pos = sum(c == "positive" for c in task.train["completion"])
    with pytest.raises(ConfigError, match=rf"poison_count=999 does not fit: only {n_pos} training rows are not "
                                          rf"labelled 'negative' \(allowed: 0..{n_pos}\)"):
        pm.poison_dataset(task, pm.Bias(entity="nolan", polarity="negative", poison_count=999))
    with pytest.raises(ConfigError, match="each form must contain '{entity}' once"):
        pm.Bias(entity="nolan", polarity="negative", poison_count=1, mentions=("{entity} did it", "no name"))
    with pytest.raises(ConfigError, match=r"heldout_mentions must be an integer in \[1, 7\]"):
        pm.Bias(entity="nolan", polarity="negative", poison_count=1, heldout_mentions=8)
    with pytest.raises(ConfigError, match="control_entities must not hold the entity"):
        pm.Bias(entity="nolan", polarity="negative", poison_count=1, control_entities=["nolan"])
    b = pm.Bias(entity="nolan", polarity="negative", poison_count=3, control_entities=["tanaka"])
    assert b.to_dict()["kind"] == "bias" and attack_from_dict(b.to_dict()) == b
