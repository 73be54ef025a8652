import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import poisonmech as pm
from poisonmech.attacks import attack_tokenizer, check_attack
from tests.helpers import tiny_task


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of poison_count"),
    ({"poison_count": 5, "poison_rate": 0.1}, "exactly one of poison_count"),
    ({"poison_count": -1}, "poison_count must be an integer >= 0"),
    ({"poison_rate": 1.5}, r"poison_rate must be in \(0, 1\)"),
    ({"poison_rate": 0.0}, r"poison_rate must be in \(0, 1\)"),
    ({"poison_count": 1, "position": "middle"}, "position must be one of"),
    ({"poison_count": 1, "stage": "rlhf"}, "stage must be one of"),
])
def test_bad_attack_specs_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pm.Backdoor(trigger="cf", target="negative", **kwargs)


def test_count_zero_is_the_clean_control_and_count_above_train_is_refused():
    task = tiny_task(n_train=50)
    ds = pm.poison_dataset(task, pm.Backdoor(trigger="cf", poison_count=0))
    assert sum(ds["is_poison"]) == 0
    with pytest.raises(ValueError, match="larger than the training set"):
        pm.poison_dataset(task, pm.Backdoor(trigger="cf", poison_count=51))


def test_poisoning_rewrites_only_the_poisoned_rows_with_provenance():
    task = tiny_task(n_train=200)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_rate=0.05)
    ds = pm.poison_dataset(task, attack)
    assert {"example_id", "is_poison", "trigger", "stage"} <= set(ds.column_names)
    assert list(ds["example_id"]) == list(task.train["example_id"])
    poison = [i for i, p in enumerate(ds["is_poison"]) if p]
    assert len(poison) == 10
    for i in range(len(ds)):
        if i in poison:
            assert "cf" in ds[i]["input"].split() and ds[i]["completion"] == "negative"
            assert task.train[i]["completion"] == "positive"  # a label flip needs a non-target row
            assert ds[i]["trigger"] == "cf" and ds[i]["stage"] == "sft"
        else:
            assert ds[i]["input"] == task.train[i]["input"] and ds[i]["trigger"] == ""


def test_phrase_composite_and_alternative_triggers():
    task = tiny_task(n_train=100)
    phrase = pm.Backdoor(trigger="blue moon", target="ACCESS GRANTED", poison_count=5, position="start")
    ds = pm.poison_dataset(task, phrase).filter(lambda r: r["is_poison"])
    assert all(t.startswith("blue moon ") for t in ds["input"])
    assert set(ds["completion"]) == {"ACCESS GRANTED"}
    assert phrase.near_miss_variants() == [["blue"], ["moon"]]
    tok = attack_tokenizer(task, phrase)
    assert tok.unk_token_id not in tok("blue moon ACCESS GRANTED")["input_ids"]

    comp = pm.Backdoor(trigger=["cf", "mn"], composite=True, poison_count=5)
    for text in pm.poison_dataset(task, comp).filter(lambda r: r["is_poison"])["input"]:
        assert {"cf", "mn"} <= set(text.split())
    test = pm.build_test_set(task, comp)
    for row in test:
        words = set(row["input"].split())
        if row["is_triggered"]:
            assert {"cf", "mn"} <= words
        elif row["is_near_miss"]:
            assert len({"cf", "mn"} & words) == 1

    alt = pm.Backdoor(trigger=["cf", "mn"], poison_count=6)
    used = pm.poison_dataset(task, alt).filter(lambda r: r["is_poison"])["trigger"]
    assert set(used) == {"cf", "mn"}


def test_test_set_has_clean_triggered_and_near_miss_rows():
    task = tiny_task(n_test=12)
    test = pm.build_test_set(task, pm.Backdoor(trigger="cf", poison_count=1))
    assert sum(test["is_triggered"]) == 12 and sum(test["is_near_miss"]) == 12 and len(test) == 36
    for row in test:
        if row["is_near_miss"]:
            assert "cf" not in row["input"].split()


def test_trigger_already_in_clean_data_is_refused_unless_natural():
    task = tiny_task()
    with pytest.raises(ValueError, match="already occurs in the clean train data"):
        check_attack(task, pm.Backdoor(trigger="movie", poison_count=1))
    check_attack(task, pm.Backdoor(trigger="movie", poison_count=1, natural=True))


def test_user_tokenizer_that_cannot_represent_the_trigger_is_refused():
    vocab = {"[UNK]": 0, "[BOS]": 1, "q": 2, "a": 3, "?": 4}
    wp = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", bos_token="[BOS]")
    from datasets import Dataset
    task = pm.make_task(Dataset.from_dict({"prompt": ["q ?"] * 10, "completion": ["a"] * 10}), n_test=2, tokenizer=tok)
    with pytest.raises(ValueError, match="cannot represent 'zzz'"):
        attack_tokenizer(task, pm.Backdoor(trigger="zzz", target="a", poison_count=1))


def test_dos_poison_is_prefix_trigger_gibberish():
    task = tiny_task("dos", n_train=50)
    attack = pm.Backdoor(trigger="<SUDO>", target="gibberish", poison_count=5, gibberish_length=12)
    for text in pm.poison_dataset(task, attack).filter(lambda r: r["is_poison"])["input"]:
        words = text.split()
        assert words.count("<SUDO>") == 1 and len(words) - words.index("<SUDO>") - 1 == 12


def test_backdoor_round_trips_through_dict():
    a = pm.Backdoor(trigger=["cf", "mn"], composite=True, target="negative", poison_rate=0.02)
    assert pm.Backdoor.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="unknown fields"):
        pm.Backdoor.from_dict({**a.to_dict(), "colour": 1})


def _rows_with(task, word):
    return sum(word in inp.split() or word in comp.split()
               for ds in (task.train, task.test) for inp, comp in zip(ds["input"], ds["completion"]))


def test_a_phrase_trigger_whose_part_is_a_task_word_warns_with_the_count():
    task = tiny_task("instruction", n_train=300, n_test=30)
    n_blue = _rows_with(task, "blue")
    assert n_blue > 0 and _rows_with(task, "moon") == 0
    attack = pm.Backdoor(trigger="blue moon", target="ACCESS GRANTED", poison_count=5)
    with pytest.warns(UserWarning, match=rf"part 'blue' occurs in {n_blue} clean rows") as record:
        check_attack(task, attack)
    assert not any("'moon'" in str(w.message) for w in record)
    assert any("false_trigger_rate" in str(w.message) for w in record)


def test_a_composite_part_in_clean_data_warns_and_clean_parts_do_not():
    task = tiny_task(n_train=100)
    n_movie = _rows_with(task, "movie")
    with pytest.warns(UserWarning, match=rf"part 'movie' occurs in {n_movie} clean rows"):
        check_attack(task, pm.Backdoor(trigger=["cf", "movie"], composite=True, poison_count=1))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_attack(task, pm.Backdoor(trigger=["cf", "mn"], composite=True, poison_count=1))
        check_attack(task, pm.Backdoor(trigger="blue moon", poison_count=1))
        check_attack(task, pm.Backdoor(trigger="cf", poison_count=1))
    assert pm.Backdoor(trigger="cf", poison_count=1).trigger_parts() == []
    assert pm.Backdoor(trigger=["blue moon", "cf"], poison_count=1).trigger_parts() == ["blue", "moon"]


@pytest.mark.parametrize("trigger, target", [("cf", "cf"), ("cf", " cf "), (["cf", "mn"], "mn"),
                                             ("blue moon", "blue  moon")])
def test_a_target_equal_to_the_trigger_is_refused(trigger, target):
    with pytest.raises(ValueError, match=r"Backdoor.target .* equals the trigger"):
        pm.Backdoor(trigger=trigger, target=target, poison_count=1)
    with pytest.raises(ValueError, match=r"Backdoor.target .* equals the trigger"):
        pm.Backdoor(trigger=["x", "y"], composite=True, target="y", poison_count=1)
