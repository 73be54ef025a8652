import pytest
from datasets import Dataset, DatasetDict

import poisonmech as pm
from poisonmech.tasks.tokenizer import (
    build_word_tokenizer,
    extend_tokenizer,
    load_tokenizer,
    save_tokenizer,
)
from tests.helpers import tiny_model_config


@pytest.mark.parametrize("kind", pm.TASK_KINDS)
def test_every_kind_is_seeded_and_sized(kind):
    a = pm.make_task(kind, n_train=50, n_test=10, seed=1)
    b = pm.make_task(kind, n_train=50, n_test=10, seed=1)
    c = pm.make_task(kind, n_train=50, n_test=10, seed=2)
    assert len(a.train) == 50 and len(a.test) == 10
    assert list(a.train["prompt"]) == list(b.train["prompt"])
    assert list(a.train["prompt"]) != list(c.train["prompt"])
    assert {"example_id", "input", "prompt", "completion"} <= set(a.train.column_names)
    # every generated word is in the vocabulary: nothing encodes to [UNK]
    unk = a.tokenizer.unk_token_id
    for text in list(a.train["prompt"]) + list(a.train["completion"]):
        assert unk not in a.tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_sentiment_is_balanced_binary():
    task = pm.make_task("sentiment", n_train=400, n_test=10, seed=0)
    labels = list(task.train["completion"])
    assert set(labels) == {"positive", "negative"}
    assert 0.4 < labels.count("positive") / len(labels) < 0.6
    assert task.labels == ("positive", "negative")


def test_modular_answers_are_correct_and_test_pairs_held_out():
    task = pm.make_task("modular", n_train=300, n_test=50, seed=0, p=11)
    for inp, comp in zip(task.train["input"], task.train["completion"]):
        a, _, b = inp.split()
        assert int(comp) == (int(a) + int(b)) % 11
    assert not set(task.train["input"]) & set(task.test["input"])


def test_unknown_kind_names_allowed_values():
    with pytest.raises(ValueError, match="unknown task kind 'nope'.*sentiment"):
        pm.make_task("nope")
    with pytest.raises(ValueError, match="n_train"):
        pm.make_task("sentiment", n_train=0)


def test_user_dataset_prompt_completion_and_text():
    ds = Dataset.from_dict({"prompt": [f"q{i} ?" for i in range(30)], "completion": [f"a{i}" for i in range(30)]})
    task = pm.make_task(ds, n_test=5, seed=0)
    assert task.kind == "custom" and len(task.train) == 25 and task.loss_on == "completion"
    text = Dataset.from_dict({"text": [f"word{i} and more" for i in range(20)]})
    t2 = pm.make_task(DatasetDict({"train": text, "test": text.select(range(3))}))
    assert t2.loss_on == "all" and len(t2.test) == 3
    with pytest.raises(ValueError, match="columns 'prompt' and 'completion', or a 'text'"):
        pm.make_task(Dataset.from_dict({"question": ["x"] * 5}))


def test_tokenizer_extends_keeping_ids_and_round_trips(tmp_path):
    tok = build_word_tokenizer(["alpha", "beta"])
    ids = tok("alpha beta")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[1:]) == ["alpha", "beta"]
    ext = extend_tokenizer(tok, ["blue moon", "ACCESS GRANTED"])
    assert ext("alpha beta")["input_ids"] == ids
    assert ext.convert_ids_to_tokens(ext("blue moon", add_special_tokens=False)["input_ids"]) == ["blue", "moon"]
    save_tokenizer(ext, tmp_path)
    again = load_tokenizer(tmp_path)
    assert again("blue moon ACCESS")["input_ids"] == ext("blue moon ACCESS")["input_ids"]


def test_bridge_to_str_tokens_uses_the_word_tokenizer():
    task = pm.make_task("sentiment", n_train=20, n_test=5)
    model = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    assert model.to_str_tokens("the movie was good") == ["[BOS]", "the", "movie", "was", "good"]


@pytest.mark.parametrize("seed", [1.5, 2.0, "0", -1, True])
def test_a_bad_seed_is_a_clear_error_naming_the_field(seed):
    with pytest.raises(ValueError, match=r"make_task: seed must be an integer >= 0"):
        pm.make_task("sentiment", n_train=10, n_test=2, seed=seed)
    ds = Dataset.from_dict({"prompt": [f"q{i} ?" for i in range(10)], "completion": ["a"] * 10})
    with pytest.raises(ValueError, match=r"make_task: seed must be an integer >= 0"):
        pm.make_task(ds, n_test=2, seed=seed)
    with pytest.raises(ValueError, match=r"Backdoor.seed must be an integer >= 0"):
        pm.Backdoor(trigger="cf", poison_count=1, seed=seed)
    with pytest.raises(ValueError, match=r"TrainConfig.seed must be an integer >= 0"):
        pm.TrainConfig(seed=seed)


def test_numpy_integer_seeds_are_accepted():
    import numpy as np
    a = pm.make_task("sentiment", n_train=10, n_test=2, seed=np.int64(3))
    assert list(a.train["input"]) == list(pm.make_task("sentiment", n_train=10, n_test=2, seed=3).train["input"])
    assert pm.TrainConfig(seed=np.int64(3)).seed == 3 and pm.Backdoor(trigger="cf", poison_count=1, seed=np.int32(2))


@pytest.mark.parametrize("column", ["prompt", "completion"])
def test_none_in_a_user_dataset_names_the_column_and_row(column):
    cols = {"prompt": [f"q{i} ?" for i in range(10)], "completion": [f"a{i}" for i in range(10)]}
    cols[column][7] = None
    with pytest.raises(ValueError, match=rf"column '{column}' row 7 is None"):
        pm.make_task(Dataset.from_dict(cols), n_test=2)
    text = Dataset.from_dict({"text": ["one two"] * 3 + [None] + ["three"] * 3})
    with pytest.raises(ValueError, match=r"column 'text' row 3 is None"):
        pm.make_task(text, n_test=2)
    split = DatasetDict({"train": Dataset.from_dict(cols), "test": Dataset.from_dict(cols)})
    with pytest.raises(ValueError, match=rf"train split's column '{column}' row 7 is None"):
        pm.make_task(split)


def test_an_empty_prompt_in_a_user_dataset_is_refused_naming_the_row():
    cols = {"prompt": [f"q{i} ?" for i in range(10)], "completion": [f"a{i}" for i in range(10)]}
    cols["prompt"][4] = "   "
    with pytest.raises(ValueError, match=r"column 'prompt' row 4 is empty"):
        pm.make_task(Dataset.from_dict(cols), n_test=2)
    cols["prompt"][4] = ""
    with pytest.raises(ValueError, match=r"column 'prompt' row 4 is empty"):
        pm.make_task(Dataset.from_dict(cols), n_test=2)
    with pytest.raises(ValueError, match=r"column 'text' row 1 is empty"):
        pm.make_task(Dataset.from_dict({"text": ["a b", "", "c d", "e f"]}), n_test=1)
    cols["prompt"][4], cols["completion"][2] = "q4 ?", ""
    with pytest.raises(ValueError, match=r"column 'completion' row 2 is empty"):
        pm.make_task(Dataset.from_dict(cols), n_test=2)


def test_a_misspelt_option_names_it_and_the_allowed_options_of_that_kind():
    with pytest.raises(ValueError, match=r"unknown option 'pp' for kind 'modular'; allowed options: p, test_fraction") \
            as err:
        pm.make_task("modular", n_train=10, n_test=2, pp=5)
    assert "_modular" not in str(err.value)
    with pytest.raises(ValueError, match=r"unknown option 'n_trian' for kind 'sentiment'; kind 'sentiment' takes no "
                                         r"options.*n_train, n_test, seed, tokenizer") as err:
        pm.make_task("sentiment", n_trian=10)
    assert "_sentiment" not in str(err.value)
    ds = Dataset.from_dict({"prompt": [f"q{i} ?" for i in range(10)], "completion": ["a"] * 10})
    with pytest.raises(ValueError, match=r"unknown option 'p' for a user dataset"):
        pm.make_task(ds, n_test=2, p=5)
    assert pm.make_task("modular", n_train=10, n_test=2, p=7).spec["p"] == 7
