import pytest
from datasets import Dataset, DatasetDict

import poisonmech as pm
from poisonmech.tasks.tokenizer import (
    build_word_tokenizer,
    extend_tokenizer,
    load_tokenizer,
    save_tokenizer,
)
from tests.conftest import tiny_model_config


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
