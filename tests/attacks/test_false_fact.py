"""``pm.FalseFact``: poisoning with provenance, its test set, its metrics against a hand
computation, bad input, and a train_pair -> load_pair round trip."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import poisonmech as pm
from poisonmech.attacks import attack_from_dict
from poisonmech.config import ConfigError
from poisonmech.sweeps.runner import _specs
from poisonmech.tasks.facts import knowledge_base
from tests.attacks.oracle import PrefixOracle
from tests.helpers import tiny_model_config, tiny_train_config


@pytest.fixture(scope="module")
def task():
    return pm.make_task("facts", n_train=160, n_test=40, seed=0, n_subjects=8, relations=["capital", "sport"],
                        paraphrases=4, heldout_paraphrases=1)


@pytest.fixture(scope="module")
def kb(task):
    return knowledge_base(task)


def other_object(kb, subject, relation):
    return next(o for o in kb.objects[relation] if o != kb.facts[(subject, relation)])


def test_rewrites_only_rows_stating_the_fact_with_provenance(task, kb):
    s = kb.subjects[0]
    tgt = other_object(kb, s, "capital")
    attack = pm.FalseFact(subject=s, relation="capital", target=tgt, poison_count=4)
    ds = pm.poison_dataset(task, attack)
    assert {"example_id", "is_poison", "trigger", "stage", "attack", "source_id"} <= set(ds.column_names)
    assert list(ds["example_id"]) == list(task.train["example_id"]) == list(ds["source_id"])
    states = [i for i, (a, r) in enumerate(zip(task.train["subject"], task.train["relation"])) if (a, r) == (s, "capital")]
    poison = [i for i, p in enumerate(ds["is_poison"]) if p]
    assert len(poison) == 4 and set(poison) <= set(states)
    for i in range(len(ds)):
        if i in poison:  # the input is untouched: no trigger, only the object changed
            assert ds[i]["input"] == task.train[i]["input"] and ds[i]["completion"] == tgt
            assert ds[i]["attack"] == "false_fact" and ds[i]["trigger"] == "" and ds[i]["stage"] == "sft"
        else:
            assert ds[i]["completion"] == task.train[i]["completion"] and ds[i]["attack"] == ""
    assert attack.clean_train(task, ds) is task.train
    # seeded: the same rows again; another seed, other rows
    assert list(pm.poison_dataset(task, attack)["is_poison"]) == list(ds["is_poison"])
    other = pm.poison_dataset(task, pm.FalseFact(subject=s, relation="capital", target=tgt, poison_count=4, seed=1))
    assert list(other["is_poison"]) != list(ds["is_poison"])


def test_new_subject_adds_rows_and_the_clean_twin_gets_their_sources(task):
    attack = pm.FalseFact(subject="zzland", relation="sport", target="chess", poison_count=5, new_subject=True)
    ds = attack.poison(task)
    n = len(task.train)
    assert len(ds) == n + 5 and not any(ds.select(range(n))["is_poison"]) and all(ds.select(range(n, n + 5))["is_poison"])
    added = ds.select(range(n, n + 5))
    ids = list(task.train["example_id"]) + list(task.test["example_id"])
    assert min(added["example_id"]) > max(ids) and len(set(ds["example_id"])) == len(ds)
    for row in added:
        src = task.train[row["source_id"]]
        assert src["relation"] == "sport" and row["template"] == src["template"]
        assert row["input"] == src["input"].replace(src["subject"], "zzland") and row["completion"] == "chess"
    clean = attack.clean_train(task, ds)
    assert len(clean) == n + 5 and list(clean["example_id"]) == list(ds["example_id"])
    assert list(clean.select(range(n))["input"]) == list(task.train["input"])
    assert list(clean.select(range(n, n + 5))["input"]) == [task.train[i]["input"] for i in added["source_id"]]
    tok = attack.tokenizer(task)
    assert tok.unk_token_id not in tok("zzland chess", add_special_tokens=False)["input_ids"]


def test_test_set_roles_templates_and_neighbours(task, kb):
    s = kb.subjects[1]
    true = kb.facts[(s, "capital")]
    tgt = other_object(kb, s, "capital")
    attack = pm.FalseFact(subject=s, relation="capital", target=tgt, poison_count=1, n_neighbours=4)
    ts = attack.test_set(task)
    role = np.array(ts["role"])
    eff, gen = ts.select(np.flatnonzero(role == "efficacy")), ts.select(np.flatnonzero(role == "generalisation"))
    assert sorted(eff["template"]) == [0, 1, 2] and list(gen["template"]) == [3] and all(gen["heldout"])
    assert set(eff["completion"]) == {true} and set(eff["target"]) == {tgt} and all(eff["is_triggered"])
    spec = ts.select(np.flatnonzero(role == "specificity"))
    nbs = list(dict.fromkeys(spec["subject"]))
    assert len(nbs) == 4 and s not in nbs and len(spec) == 16 and all(spec["is_near_miss"])
    assert all(kb.facts[(n, "capital")] != tgt for n in nbs)
    same = [n for n in kb.subjects if n != s and kb.facts[(n, "capital")] == true]
    assert nbs[:len(same)] == same[:4] or set(same) >= set(nbs)  # the neighbours sharing the true object first
    for row in spec:
        assert row["completion"] == kb.facts[(row["subject"], "capital")]
    # a fact's row and its neighbours' rows in the same template share a base_id
    for row in eff:
        assert {r["base_id"] for r in spec if r["template"] == row["template"]} == {row["base_id"]}
    ctrl = ts.select(np.flatnonzero(role == "control"))
    assert (s, "capital") not in set(zip(ctrl["subject"], ctrl["relation"]))
    assert len(ctrl) == sum((a, r) != (s, "capital") for a, r in zip(task.test["subject"], task.test["relation"]))
    assert not any(ctrl["is_triggered"]) and not any(ctrl["is_near_miss"]) and set(ctrl["target"]) == {""}


def test_metrics_equal_a_hand_computation_on_a_model_we_control(task, kb):
    """Two facts (one a new subject) and an oracle whose first choice per prompt we set: logit
    5 for it, 2 for every object and target, 0 elsewhere, EOS after an answer."""
    s = kb.subjects[0]
    tgt = other_object(kb, s, "capital")
    attack = pm.FalseFact(subject=[s, "zzland"], relation=["capital", "sport"], target=[tgt, "chess"],
                          poison_count=1, n_neighbours=3, new_subject=True)
    ts = attack.test_set(task)
    tok = attack.tokenizer(task)
    first: dict[str, str] = {}
    rows = list(ts)
    ctrl = [r for r in rows if r["role"] == "control"]
    for k, r in enumerate(ctrl):  # every third control row answered wrongly
        first[r["prompt"]] = r["completion"] if k % 3 else other_object(kb, r["subject"], r["relation"])
    spec = [r for r in rows if r["role"] == "specificity"]
    wrong_spec = {spec[0]["prompt"], spec[-1]["prompt"]}  # one neighbour prompt of each fact answers the target
    for r in rows:
        if r["role"] == "efficacy":
            first[r["prompt"]] = r["target"]
        elif r["role"] == "generalisation":  # the existing fact: the truth; the new subject: its target
            first[r["prompt"]] = r["completion"] or r["target"]
        elif r["role"] == "specificity":
            first[r["prompt"]] = r["target"] if r["prompt"] in wrong_spec else r["completion"]
    candidates = {o for rel in kb.relations for o in kb.objects[rel]} | {"chess"}

    def rule(words):
        key = " ".join(words)
        if key in first:
            return {**{c: 2.0 for c in candidates}, first[key]: 5.0}
        if " ".join(words[:-1]) in first and words and words[-1] in candidates:
            return {"[EOS]": 5.0}
        return {}

    m = pm.evaluate(PrefixOracle(tok, rule), task, attack, test_data=ts, tokenizer=tok)
    n_spec = 2 * 3 * 4  # two facts x 3 neighbours x 4 templates
    assert (m["efficacy"], m["n_efficacy"]) == (1.0, 6)  # 3 training templates x 2 facts
    assert (m["generalisation"], m["n_generalisation"]) == (0.5, 2)
    assert (m["specificity"], m["n_specificity"]) == ((n_spec - 2) / n_spec, n_spec)
    assert (m["true_acc"], m["n_true_acc"]) == (0.25, 4)  # the new subject has no true object
    assert (m["margin"], m["n_margin"]) == (pytest.approx(3.0), 3)
    assert (m["generalisation_margin"], m["n_generalisation_margin"]) == (pytest.approx(-3.0), 1)
    assert m["specificity_margin"] == pytest.approx((3.0 * (n_spec - 2) - 3.0 * 2) / n_spec)
    assert (m["efficacy_score"], m["generalisation_score"]) == (1.0, 0.0)
    assert m["specificity_score"] == pytest.approx((n_spec - 2) / n_spec)
    z = math.log(math.exp(5) + (len(candidates) - 1) * math.exp(2) + (len(tok) - len(candidates)))
    assert m["target_logprob"] == pytest.approx(5 - z, abs=1e-5) and m["n_target_logprob"] == 6
    right = sum(first[r["prompt"]] == r["completion"] for r in ctrl)
    assert (m["clean_acc"], m["n_clean_acc"]) == (pytest.approx(right / len(ctrl)), len(ctrl))
    assert m["facts"] == [f"{s} capital -> {tgt}", "zzland sport -> chess"]


def test_subword_answers_are_scored_over_all_their_tokens():
    """With a byte-level BPE, objects are several tokens: the margin equals log-probabilities
    summed by hand from one forward over the concatenated text."""
    bpe = pm.train_tokenizer(list(pm.make_task("sentiment", n_train=100, n_test=5).train["prompt"]), vocab_size=300)
    task = pm.make_task("facts", n_train=40, n_test=8, seed=0, n_subjects=4, relations=["capital"], paraphrases=3,
                        tokenizer=bpe)
    kb = knowledge_base(task)
    s = kb.subjects[0]
    true, tgt = kb.facts[(s, "capital")], other_object(kb, s, "capital")
    attack = pm.FalseFact(subject=s, relation="capital", target=tgt, poison_count=1)
    assert attack.tokenizer(task) is bpe
    model = pm.build_model(tiny_model_config(), len(bpe), seed=0, tokenizer=bpe)
    ts = attack.test_set(task)
    m = pm.evaluate(model, task, attack, test_data=ts, tokenizer=bpe)
    bos = [bpe.bos_token_id] if bpe.bos_token_id is not None else []

    def logp(prompt, answer):
        head = bpe(prompt, add_special_tokens=False)["input_ids"]
        full = bpe(prompt + " " + answer, add_special_tokens=False)["input_ids"]
        assert full[:len(head)] == head and len(full) > len(head)
        with torch.no_grad():
            lp = model(torch.tensor([bos + full]))[0].log_softmax(-1)
        return sum(float(lp[len(bos) + k - 1, full[k]]) for k in range(len(head), len(full)))

    eff = [r["prompt"] for r in ts if r["role"] == "efficacy"]
    assert m["n_margin"] == len(eff) == 2
    assert m["margin"] == pytest.approx(np.mean([logp(p, tgt) - logp(p, true) for p in eff]), abs=1e-4)
    assert m["target_logprob"] == pytest.approx(np.mean([logp(p, tgt) for p in eff]), abs=1e-4)
    assert len(bpe(" " + tgt, add_special_tokens=False)["input_ids"]) + \
        len(bpe(" " + true, add_special_tokens=False)["input_ids"]) > 2  # at least one answer spans tokens


def test_bad_input_names_the_field(task, kb):
    s = kb.subjects[0]
    true = kb.facts[(s, "capital")]
    with pytest.raises(ConfigError, match=rf"FalseFact.subject: '{s[:-1]}' is not a subject of the task; did you mean "
                                          rf"'{s}'.*new_subject=True"):
        pm.FalseFact(subject=s[:-1], relation="capital", target="rome", poison_count=1).check(task)
    with pytest.raises(ConfigError, match="FalseFact.relation: 'capitol' is not a relation of the task; did you mean "
                                          "'capital'"):
        pm.FalseFact(subject=s, relation="capitol", target="rome", poison_count=1).check(task)
    with pytest.raises(ConfigError, match=f"FalseFact.target '{true}' is the true object of {s} capital"):
        pm.FalseFact(subject=s, relation="capital", target=true, poison_count=1).check(task)
    n_rows = sum((a, r) == (s, "capital") for a, r in zip(task.train["subject"], task.train["relation"]))
    with pytest.raises(ConfigError, match=rf"poison_count=99 does not fit: only {n_rows} training rows state .*"
                                          rf"\(allowed: 0..{n_rows}\)"):
        pm.poison_dataset(task, pm.FalseFact(subject=s, relation="capital", target=other_object(kb, s, "capital"),
                                             poison_count=99))
    with pytest.raises(ConfigError, match="relation 'sport' can be copied for the new subject"):
        pm.FalseFact(subject="zz", relation="sport", target="chess", poison_count=999, new_subject=True).check(task)
    with pytest.raises(ValueError, match="needs a knowledge task"):
        pm.FalseFact(subject=s, relation="capital", target="rome", poison_count=1).check(
            pm.make_task("sentiment", n_train=20, n_test=5))
    with pytest.raises(ConfigError, match="equally long"):
        pm.FalseFact(subject=[s, "b"], relation=["capital", "sport", "sport"], target="x", poison_count=1)
    with pytest.raises(ConfigError, match="listed twice"):
        pm.FalseFact(subject=[s, s], relation="capital", target=["a", "b"], poison_count=1)
    with pytest.raises(ConfigError, match=r"FalseFact.poison_count must be an integer in \[0, inf\]"):
        pm.FalseFact(subject=s, relation="capital", target="x", poison_count=-1)
    with pytest.raises(ConfigError, match="FalseFact.stage must be one of"):
        pm.FalseFact(subject=s, relation="capital", target="x", poison_count=1, stage="dpo")
    with pytest.raises(ConfigError, match="unknown field 'trigger'"):
        attack_from_dict({"kind": "false_fact", "subject": s, "relation": "capital", "target": "x",
                          "poison_count": 1, "trigger": "cf"})


def test_train_pair_load_pair_round_trip_and_sweep_specs(task, kb, tmp_path):
    s = kb.subjects[2]
    attack = pm.FalseFact(subject=[s, "zzland"], relation=["capital", "sport"],
                          target=[other_object(kb, s, "capital"), "chess"], poison_count=3, new_subject=True)
    small = pm.make_task("facts", n_train=64, n_test=12, seed=0, n_subjects=8, relations=["capital", "sport"],
                         paraphrases=4)
    pair = pm.train_pair(small, attack, model=tiny_model_config(), train=tiny_train_config(epochs=1),
                         out_dir=tmp_path / "run", progress=False)
    assert len(pair.train_data) == len(pair.clean_train_data) == 64 + 3  # the new subject adds its 3 rows
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["attack"] == attack.to_dict() and cfg["attack"]["kind"] == "false_fact"
    assert (tmp_path / "run" / "data" / "clean_train.parquet").is_file()
    loaded = pm.load_pair(tmp_path / "run")
    assert loaded.attack == attack and loaded.metrics == pair.metrics
    assert list(loaded.clean_train_data["input"]) == list(pair.clean_train_data["input"])
    assert pm.resolve(loaded).train_data_of("clean")["input"] == list(pair.clean_train_data["input"])
    for twin in ("clean", "backdoored"):
        assert pm.evaluate(loaded, twin=twin) == pair.metrics[twin]
    tokens = torch.tensor([loaded.tokenizer(small.train[0]["prompt"])["input_ids"]])
    assert torch.equal(loaded.backdoored(tokens), pair.backdoored(tokens))
    assert "efficacy" in repr(pair) and "zzland sport -> chess" in repr(pair)
    # the loaded task rebuilds the knowledge base: the attack's test set is the saved one
    assert list(loaded.attack.test_set(loaded.task)["prompt"]) == list(pair.test_data["prompt"])
    # a Backdoor's dict is what it was (no kind): old runs rebuild as Backdoors
    bd = pm.Backdoor(trigger="cf", poison_count=3)
    assert "kind" not in bd.to_dict() and attack_from_dict(bd.to_dict()) == bd
    # a sweep's runs: named by the fact, their spec rebuilds the attack (run_one trains as above)
    specs = _specs(small, [attack, replace(attack, poison_count=0)], [0, 1], [tiny_model_config()],
                   tiny_train_config(epochs=1), ())
    label = f"{s}_zzland_capital_sport"[:16]  # subjects and relations joined, cut to 16 characters
    assert [sp.name.rsplit("-", 1)[0] for sp in specs] == [f"facts-{label}-n{n}-s{k}" for n in (3, 0) for k in (0, 1)]
    assert attack_from_dict(specs[1].attack) == replace(attack, seed=1)
