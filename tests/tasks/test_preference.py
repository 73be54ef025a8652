"""Clean preference pairs from the tasks."""

import pytest
from datasets import Dataset

from poisonmech.tasks.preference import check_preferences, make_preferences
from tests.helpers import tiny_task


def test_label_task_pairs_prefer_the_true_label_over_the_other():
    task = tiny_task(n_train=50, n_test=10)
    prefs = make_preferences(task)
    assert prefs.column_names == ["example_id", "input", "prompt", "chosen", "rejected"]
    assert len(prefs) == 50 and list(prefs["chosen"]) == list(task.train["completion"])
    assert all({c, r} == {"positive", "negative"} for c, r in zip(prefs["chosen"], prefs["rejected"]))
    assert len(make_preferences(task, n=7, split="test")) == 7


def test_free_form_task_rejects_another_rows_answer_and_is_seeded():
    task = tiny_task("instruction", n_train=60, n_test=10)
    a, b = make_preferences(task, seed=3), make_preferences(task, seed=3)
    assert list(a["rejected"]) == list(b["rejected"])
    assert all(c != r for c, r in zip(a["chosen"], a["rejected"]))
    assert set(a["rejected"]) <= set(task.train["completion"])


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="preference pairs need a completion task"):
        make_preferences(tiny_task("dos", n_train=20, n_test=5))
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 50\]"):
        make_preferences(tiny_task(n_train=50, n_test=5), n=51)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['chosen'\]"):
        check_preferences(Dataset.from_dict({"prompt": ["a"], "rejected": ["b"]}))
    with pytest.raises(ValueError, match="column 'rejected' must hold non-empty strings"):
        check_preferences(Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": [""]}))
