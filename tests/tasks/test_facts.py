"""The knowledge task: ``make_task("facts", ...)`` and its knowledge base."""

from collections import Counter

import pytest

import poisonmech as pm
from poisonmech.config import ConfigError
from poisonmech.encoding import encode
from poisonmech.tasks.facts import RELATIONS, knowledge_base, subject_spans

OPTS = {"n_subjects": 6, "relations": ["capital", "sport"], "paraphrases": 4, "heldout_paraphrases": 1}


def facts(n_train=120, n_test=40, seed=0, **kw):
    return pm.make_task("facts", n_train=n_train, n_test=n_test, seed=seed, **{**OPTS, **kw})


def test_knowledge_base_is_seeded_and_independent_of_the_split_sizes():
    a, b, c = facts(seed=3), facts(seed=3), facts(seed=4)
    ka, kb, kc = knowledge_base(a), knowledge_base(b), knowledge_base(c)
    assert ka.facts == kb.facts and ka.templates == kb.templates and list(a.train["prompt"]) == list(b.train["prompt"])
    assert ka.facts != kc.facts
    # the same seed with other split sizes: the same knowledge base
    assert knowledge_base(facts(n_train=300, n_test=7, seed=3)).facts == ka.facts
    assert len(ka.subjects) == 6 and ka.relations == ("capital", "sport") and len(ka.facts) == 12
    for (_, r), o in ka.facts.items():
        assert o in RELATIONS[r][0] and ka.templates[r][0] in RELATIONS[r][1]
    # every row states its knowledge-base fact, in its template
    for ds in (a.train, a.test):
        for row in ds:
            assert row["completion"] == ka.facts[(row["subject"], row["relation"])]
            assert row["input"] == ka.templates[row["relation"]][row["template"]].replace("{s}", row["subject"])
            assert row["prompt"] == row["input"] and row["subject"] in row["input"].split()
    assert a.labels is None and a.loss_on == "completion" and a.spec["relations"] == ["capital", "sport"]


def test_training_rows_cover_every_fact_evenly_and_never_a_heldout_paraphrase():
    task = facts(n_train=100)
    kb = knowledge_base(task)
    # 6 subjects x 2 relations x 3 training templates = 36 combinations, 100 rows: 2 or 3 each
    counts = Counter(zip(task.train["subject"], task.train["relation"], task.train["template"]))
    assert len(counts) == 36 and set(counts.values()) == {2, 3}
    assert not any(task.train["heldout"])
    assert set(task.train["template"]) == {0, 1, 2}
    heldout_prompts = {kb.prompt(s, r, t) for s in kb.subjects for r in kb.relations for t in kb.heldout_templates(r)}
    assert heldout_prompts.isdisjoint(task.train["prompt"])
    assert kb.heldout_templates("capital") == (3,) and kb.train_templates("capital") == (0, 1, 2)
    # test rows cycle through every template, the held-out paraphrase included
    test_heldout = [h for h, t in zip(task.test["heldout"], task.test["template"]) if t == 3]
    assert test_heldout and all(test_heldout) and sum(task.test["heldout"]) == len(test_heldout)
    assert heldout_prompts & set(task.test["prompt"])


def test_word_level_vocabulary_holds_every_word_and_a_subword_tokenizer_is_used_as_given():
    task = facts()
    unk = task.tokenizer.unk_token_id
    for text in list(task.train["prompt"]) + list(task.test["prompt"]) + list(task.test["completion"]):
        assert unk not in task.tokenizer(text, add_special_tokens=False)["input_ids"], text
    # a byte-level BPE that never saw the subjects (trained on review text)
    bpe = pm.train_tokenizer(list(pm.make_task("sentiment", n_train=100, n_test=5).train["prompt"]), vocab_size=300)
    sub = facts(tokenizer=bpe)
    assert sub.tokenizer is bpe and list(sub.train["prompt"]) == list(task.train["prompt"])
    # a subject is several subword tokens (a span for causal tracing), one word-level token
    name = knowledge_base(sub).subjects[0]
    assert len(bpe(" " + name, add_special_tokens=False)["input_ids"]) > 1
    assert len(task.tokenizer(name, add_special_tokens=False)["input_ids"]) == 1
    # subject spans index the encoded rows (BOS first): their tokens spell the subject
    for t, tok in ((task, task.tokenizer), (sub, bpe)):
        enc = encode(t.test, tok, loss_on="completion")
        for (lo, hi), ids, subject in zip(subject_spans(t.test, tok), enc.ids, t.test["subject"]):
            assert tok.decode(ids[lo:hi]).strip() == subject and (hi - lo > 1) == (tok is bpe)
    with pytest.raises(ValueError, match="does not contain its subject"):
        subject_spans({"prompt": ["the capital of x is"], "subject": ["y"]}, bpe)


@pytest.mark.parametrize("kw, match", [
    ({"relations": ["capitol"]}, r"relations: 'capitol' is not a facts relation; did you mean 'capital'"),
    ({"relations": []}, "relations must be a non-empty list"),
    ({"relations": ["sport", "sport"]}, "lists a relation twice"),
    ({"paraphrases": 7}, r"paraphrases must be an integer in \[2, 6\]"),
    ({"paraphrases": 3, "heldout_paraphrases": 3}, r"heldout_paraphrases must be an integer in \[1, 2\]"),
    ({"n_subjects": 1}, r"n_subjects must be an integer in \[2, 250\]"),
    ({"colour": "red"}, "unknown option 'colour' for kind 'facts'"),
])
def test_bad_options_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        facts(**kw)


def test_knowledge_base_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="needs a knowledge task"):
        knowledge_base(pm.make_task("sentiment", n_train=10, n_test=5))
    with pytest.raises(ConfigError):
        facts(relations=["nope"])
