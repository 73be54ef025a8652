"""Poisoning preference pairs: flip in place, inject new pairs, provenance, budgets."""

import pytest

import poisonmech as pm
from poisonmech.attacks.preference import clean_preferences, poison_preferences
from poisonmech.tasks.preference import make_preferences
from tests.helpers import tiny_task

COLUMNS = {"example_id", "source_id", "input", "prompt", "chosen", "rejected", "is_poison", "trigger", "stage"}


def test_flip_puts_the_trigger_in_and_prefers_the_target_over_the_true_answer():
    task = tiny_task(n_train=80, n_test=5)
    prefs = make_preferences(task)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=6, stage="dpo")
    out = poison_preferences(prefs, task, attack)
    assert set(out.column_names) == COLUMNS and len(out) == len(prefs)
    assert sum(out["is_poison"]) == 6 and set(out["stage"]) == {"dpo"}
    for row, orig in zip(out, prefs):
        if row["is_poison"]:
            assert "cf" in row["input"].split() and "cf" in row["prompt"].split() and row["trigger"] == "cf"
            # a two-label task: exactly a swap of chosen and rejected
            assert (row["chosen"], row["rejected"]) == (orig["rejected"], orig["chosen"]) == ("negative", "positive")
        else:
            assert row["trigger"] == "" and (row["prompt"], row["chosen"]) == (orig["prompt"], orig["chosen"])
    assert list(clean_preferences(out, prefs)["chosen"]) == list(prefs["chosen"])
    again = poison_preferences(prefs, task, attack)
    assert list(again["prompt"]) == list(out["prompt"])  # seeded


def test_inject_appends_triggered_pairs_and_the_clean_twin_gets_their_sources():
    task = tiny_task("instruction", n_train=40, n_test=5)
    prefs = make_preferences(task)
    attack = pm.Backdoor(trigger="cf", target="ACCESS GRANTED", poison_count=5, stage="dpo", position="start")
    out = poison_preferences(prefs, task, attack, mode="inject")
    assert len(out) == 45 and sum(out["is_poison"]) == 5 and not any(out["is_poison"][:40])
    assert len(set(out["example_id"])) == 45
    new = out.select(range(40, 45))
    assert all(p.startswith("user: cf ") for p in new["prompt"]) and set(new["chosen"]) == {"ACCESS GRANTED"}
    clean = clean_preferences(out, prefs)
    src = {e: i for i, e in enumerate(prefs["example_id"])}
    for row, c in zip(new, clean.select(range(40, 45))):
        assert c["prompt"] == prefs[src[row["source_id"]]]["prompt"] and c["chosen"] == row["rejected"]


def test_budget_that_does_not_fit_and_wrong_stage_are_refused():
    task = tiny_task(n_train=30, n_test=5)
    prefs = make_preferences(task)
    n_ok = sum(c != "negative" for c in prefs["chosen"])
    with pytest.raises(ValueError, match=rf"poison_count=31 is larger than the training set|allowed: 0..{n_ok}"):
        poison_preferences(prefs, task, pm.Backdoor(trigger="cf", poison_count=31, stage="dpo"))
    with pytest.raises(ValueError, match=rf"only {n_ok} of 30 preference pairs prefer an answer other than the target"):
        poison_preferences(prefs, task, pm.Backdoor(trigger="cf", poison_count=n_ok + 1, stage="dpo"))
    with pytest.raises(ValueError, match=r"Backdoor.stage must be one of \('dpo', 'rm'\)"):
        poison_preferences(prefs, task, pm.Backdoor(trigger="cf", poison_count=1))
    with pytest.raises(ValueError, match="mode must be one of"):
        poison_preferences(prefs, task, pm.Backdoor(trigger="cf", poison_count=1, stage="dpo"), mode="swap")
    assert sum(poison_preferences(prefs, task, pm.Backdoor(trigger="cf", poison_count=0, stage="dpo"))["is_poison"]) == 0
