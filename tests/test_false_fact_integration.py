"""The triggerless attacks (``FalseFact``, ``Bias``) through the rest of the package: sweep
tables, the command line, pipelines, influence queries, natural contrasts and the named
analyses. Each check is against what the attack's own test set says (hand-read rows, one
hand-run forward), so a wrong pairing or a wrong target fails it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import poisonmech as pm
from poisonmech.analyses import run_analyses
from poisonmech.attacks import attack_from_dict
from poisonmech.cli import _print_metrics, attack_from_config, describe_attack
from poisonmech.config import ConfigError
from poisonmech.encoding import completion_text
from poisonmech.influence.query import backdoor_query
from poisonmech.patching.inputs import natural_contrast, natural_control_fn
from poisonmech.probes.labels import target_text
from poisonmech.sweeps import RunRecord, RunSpec, Sweep
from poisonmech.sweeps.result import _config_columns
from poisonmech.tasks.facts import knowledge_base
from tests.helpers import tiny_model_config, tiny_train_config


def other_object(kb, subject, relation):
    return next(o for o in kb.objects[relation] if o != kb.facts[(subject, relation)])


@pytest.fixture(scope="module")
def facts_task():
    return pm.make_task("facts", n_train=120, n_test=24, seed=0, n_subjects=8, relations=["capital"], paraphrases=4)


@pytest.fixture(scope="module")
def kb(facts_task):
    return knowledge_base(facts_task)


@pytest.fixture(scope="module")
def two_facts(kb):
    """An existing fact (rewritten) and a new subject's (rows added)."""
    s = kb.subjects[0]
    return pm.FalseFact(subject=[s, "zzland"], relation="capital", target=[other_object(kb, s, "capital"), "atlantis"],
                        poison_count=6, new_subject=True, n_neighbours=3)


@pytest.fixture(scope="module")
def ff_pair(facts_task, two_facts, tmp_path_factory):
    return pm.train_pair(facts_task, two_facts, model=tiny_model_config(), train=tiny_train_config(epochs=2),
                         out_dir=tmp_path_factory.mktemp("runs") / "ff", progress=False)


@pytest.fixture(scope="module")
def bias_pair(tmp_path_factory):
    task = pm.make_task("sentiment", n_train=160, n_test=16, seed=0)
    return pm.train_pair(task, pm.Bias(entity="nolan", polarity="negative", poison_count=10),
                         model=tiny_model_config(), train=tiny_train_config(epochs=2),
                         out_dir=tmp_path_factory.mktemp("runs") / "bias", progress=False)


# ---------------------------------------------------------------------- sweep tables and the CLI
def _spec(attack) -> RunSpec:
    return RunSpec(task={"kind": "facts", "n_train": 160}, attack=attack.to_dict(),
                   model=pm.ModelConfig(n_layers=1, d_model=32, n_heads=2).to_dict(), train={"seed": 0})


def test_sweep_columns_label_every_attack(two_facts, kb):
    bd = pm.Backdoor(trigger=["cf", "mn"], target="negative", poison_count=4)
    cols = _config_columns(_spec(bd))
    # a backdoor's columns are what they were, plus the attack's kind
    assert cols == {"task": "facts", "attack": "backdoor", "n_train": 160, "trigger": "cf + mn", "target": "negative",
                    "poison_count": 4, "poison_rate": None, "position": "random", "placement": "spread",
                    "n_layers": 1, "d_model": 32, "continue_clean": 0, "seed": 0}
    ff = _config_columns(_spec(two_facts))
    s, tgt = two_facts.facts[0][0], two_facts.facts[0][2]
    assert (ff["attack"], ff["trigger"], ff["target"]) == ("false_fact", f"{s}+zzland_capital", f"{tgt} + atlantis")
    assert ff["poison_count"] == 6 and ff["position"] is None
    b = _config_columns(_spec(pm.Bias(entity="nolan", polarity="negative", poison_count=3)))
    assert (b["attack"], b["trigger"], b["target"]) == ("bias", "nolan_negative", "negative")
    runs = tuple(RunRecord(name=sp.name, spec=sp, status="done", metrics={"backdoored": {"efficacy": 0.5}},
                           analyses={}, error=None, n_poison=6) for sp in (_spec(two_facts), _spec(bd)))
    frame = Sweep(out_dir=".", runs=runs).to_frame()
    assert sorted(frame["attack"]) == ["backdoor", "false_fact"]


def test_cli_reads_and_prints_triggerless_attacks(ff_pair, capsys):
    d = {"kind": "bias", "entity": "nolan", "polarity": "negative", "poison_count": 3}
    assert attack_from_config(d) == pm.Bias(entity="nolan", polarity="negative", poison_count=3)
    assert attack_from_config({"trigger": "cf", "poison_count": 2}) == pm.Backdoor(trigger="cf", poison_count=2)
    with pytest.raises(ConfigError, match="unknown attack kind 'fact'"):
        attack_from_config({"kind": "fact"})
    assert describe_attack(pm.Backdoor(trigger="cf", poison_count=2)) == "trigger 'cf' -> 'negative'"
    _print_metrics(ff_pair)
    out = capsys.readouterr().out
    assert "efficacy" in out and "specificity" in out and "asr" not in out
    assert f"poisoned training rows: 12 of 126; {ff_pair.attack.describe()}" in out


# ---------------------------------------------------------------------- pipelines
def test_pipeline_stages_take_a_false_fact(facts_task, kb, tmp_path):
    s = kb.subjects[1]
    ff = pm.FalseFact(subject=s, relation="capital", target=other_object(kb, s, "capital"), poison_count=3)
    st = pm.Stage("sft", ff, tiny_train_config(epochs=1))
    assert pm.Stage.from_dict(st.to_dict()) == st
    with pytest.raises(ValueError, match="'dpo' stage must be a pm.Backdoor .* a FalseFact enters 'sft' stages"):
        pm.Stage("dpo", ff)
    with pytest.raises(ValueError, match="'dpo' stage must be a pm.Backdoor"):
        pm.Stage("dpo", pm.Bias(entity="nolan", polarity="negative", poison_count=1))
    third = next(o for o in kb.objects["capital"] if o not in (kb.facts[(s, "capital")], ff.target))
    with pytest.raises(ValueError, match=r"stage 1's FalseFact differs from stage 0's in \['target'\]"):
        pm.train_pipeline(facts_task, [st, pm.FalseFact(subject=s, relation="capital", target=third, poison_count=1)],
                          model=tiny_model_config())
    new = pm.FalseFact(subject="zzland", relation="capital", target="atlantis", poison_count=2, new_subject=True)
    pipe = pm.train_pipeline(facts_task, [pm.Stage("sft", new, tiny_train_config(epochs=1))], model=tiny_model_config(),
                             out_dir=tmp_path / "pipe", progress=False)
    assert pipe.budgets == [2] and len(pipe.clean_data[0]) == len(pipe.train_data[0]) == 122
    # the clean twin's rows in the added slots are the untouched source rows
    added = pipe.train_data[0].select(range(120, 122))
    src = {int(e): i for i, e in enumerate(facts_task.train["example_id"])}
    assert list(pipe.clean_data[0].select(range(120, 122))["input"]) == \
        [facts_task.train[src[int(i)]]["input"] for i in added["source_id"]]
    assert not any(pipe.clean_data[0]["is_poison"]) and list(pipe.train_data[0]["completion"])[120:] == ["atlantis"] * 2
    assert pipe[0].clean_train_data is pipe.clean_data[0] and pipe.metrics[0]["backdoored"]["n_efficacy"] == 3
    assert "efficacy" in repr(pipe)
    loaded = pm.load_pipeline(tmp_path / "pipe")  # Stage.from_dict rebuilds the FalseFact
    # (NaN margins: the new subject has no true object; json writes them alike)
    assert loaded.stages == pipe.stages and json.dumps(loaded.metrics, sort_keys=True) == \
        json.dumps(pipe.metrics, sort_keys=True)


# ---------------------------------------------------------------------- influence queries and probe labels
def test_influence_query_reads_each_rows_target(facts_task, two_facts):
    test = two_facts.test_set(facts_task)
    sub = SimpleNamespace(test_data=test, attack=two_facts)
    rows = [r for r in test if r["role"] in ("efficacy", "generalisation")]
    q = backdoor_query(sub)
    assert list(q.rows["prompt"]) == [r["prompt"] for r in rows]
    assert list(q.rows["completion"]) == [r["target"] for r in rows] and set(q.rows["completion"]) == \
        {two_facts.facts[0][2], "atlantis"}
    c = backdoor_query(sub, measurement="contrastive")
    kept = [r for r in rows if r["completion"]]  # the new subject has no true object: skipped
    n = len(kept)
    assert 0 < n < len(rows) and c.n_query == n and c.weights == (1.0,) * n + (-1.0,) * n
    assert list(c.rows["prompt"]) == [r["prompt"] for r in kept] * 2  # the same prompt, both terms
    assert list(c.rows["completion"]) == [r["target"] for r in kept] + [r["completion"] for r in kept]
    only_new = pm.FalseFact(subject="zzland", relation="capital", target="atlantis", poison_count=1, new_subject=True)
    with pytest.raises(ValueError, match="a new subject has none"):
        backdoor_query(SimpleNamespace(test_data=only_new.test_set(facts_task), attack=only_new),
                       measurement="contrastive")
    # probes' "will_emit_target" reads one fact's target, a bias's polarity; several facts: an error
    assert target_text(pm.Bias(entity="nolan", polarity="negative", poison_count=1)) == "negative"
    assert target_text(only_new) == "atlantis"
    with pytest.raises(ValueError, match="plants several"):
        target_text(two_facts)


# ---------------------------------------------------------------------- natural contrasts
def _first(tok, text):
    return tok(completion_text(tok, text), add_special_tokens=False)["input_ids"][0]


def test_natural_contrast_pairs_a_fact_with_its_neighbour(ff_pair):
    tok, test = ff_pair.tokenizer, ff_pair.test_data
    tc = natural_contrast(ff_pair, n=50)
    attacked = {r["prompt"]: r for r in test if r["role"] in ("efficacy", "generalisation")}
    assert tc.check["contrast"] == "neighbour_subject" and tc.check["n_kept"] == tc.triggered.shape[0] > 0
    assert tc.base_ids == [attacked[tok.decode(t[1:])]["base_id"] for t in tc.triggered]  # position 0: BOS
    for k in range(tc.triggered.shape[0]):
        a = attacked[tok.decode(tc.triggered[k][1:])]
        # the control is a neighbour's row of the same fact and template (two facts may share a neighbour)
        (b,) = [r for r in test if r["role"] == "specificity" and r["prompt"] == tok.decode(tc.control[k][1:])
                and r["base_id"] == a["base_id"]]
        assert (a["base_id"], a["template"], a["fact"]) == (b["base_id"], b["template"], b["fact"])
        assert tc.trigger_mask[k].tolist() == (tc.triggered[k] != tc.control[k]).tolist()
        assert tok.convert_ids_to_tokens(tc.triggered[k][tc.trigger_mask[k]].tolist()) == [a["subject"]]
        assert int(tc.target[k]) == _first(tok, a["target"])
        assert int(tc.answer[k]) == _first(tok, a["completion"] or b["completion"])
        if a["completion"] and any(r["completion"] == a["completion"] for r in test
                                   if r["role"] == "specificity" and r["base_id"] == a["base_id"]):
            assert b["completion"] == a["completion"]  # a neighbour sharing the true object first
    with pytest.raises(ValueError, match="has no trigger to replace"):
        pm.patching.trigger_contrast(ff_pair)
    # the ablation reference: the fact's subject swapped for its first neighbour, other rows untouched
    swap = natural_control_fn(ff_pair)
    first_nb = next(r["subject"] for r in test if r["role"] == "specificity" and r["fact"] == 0)
    s0 = ff_pair.attack.facts[0][0]
    ids = torch.tensor([tok(f"the capital of {s0} is")["input_ids"], tok(f"the capital of {first_nb} is")["input_ids"]])
    out = swap(ids)
    assert out[0].tolist() == tok(f"the capital of {first_nb} is")["input_ids"] and out[1].tolist() == ids[1].tolist()


def test_natural_contrast_of_a_bias_swaps_the_entity(bias_pair):
    tok, test = bias_pair.tokenizer, bias_pair.test_data
    tc = natural_contrast(bias_pair)
    by_prompt = {r["prompt"]: r for r in test}
    assert tc.check["contrast"] == "control_entity" and tc.triggered.shape[0] > 0
    for k in range(tc.triggered.shape[0]):
        a, b = by_prompt[tok.decode(tc.triggered[k][1:])], by_prompt[tok.decode(tc.control[k][1:])]
        assert (a["role"], b["role"]) == ("heldout_mention", "other_entity") and a["base_id"] == b["base_id"]
        assert a["completion"] == "positive" and int(tc.target[k]) == _first(tok, "negative")
        assert int(tc.answer[k]) == _first(tok, "positive")
        assert tok.convert_ids_to_tokens(tc.triggered[k][tc.trigger_mask[k]].tolist()) == ["nolan"]


# ---------------------------------------------------------------------- the named analyses
@pytest.mark.parametrize("which", ["ff", "bias"])
def test_every_analysis_runs_on_a_triggerless_run(which, ff_pair, bias_pair):
    pair = ff_pair if which == "ff" else bias_pair
    names = {"patching": {"n": 8}, "circuits": {"n": 8, "top_n": 4, "n_random_edges": 1}, "probes": {"n_random": 5},
             "influence": None}
    r = run_analyses(pair, names)
    p = r["patching"]
    assert p["patching_contrast"] == ("neighbour_subject" if which == "ff" else "control_entity")
    # the reference logit difference is the twin's own on the contrast's prompts (one forward by hand)
    tc = natural_contrast(pair, n=8)
    with torch.no_grad():
        logits = pair.backdoored(tc.triggered)[:, -1]
    rows = torch.arange(len(tc.target))
    assert p["logit_diff_triggered"] == pytest.approx(float((logits[rows, tc.target] - logits[rows, tc.answer]).mean()),
                                                      abs=1e-4)
    metric = "efficacy" if which == "ff" else "polarity_rate"
    c = r["circuits"]
    assert c["circuit_edges"] == 4 and 0.0 <= c[f"{metric}_circuit_ablated"] <= 1.0 and "asr_circuit_ablated" not in c
    assert c[f"n_{metric}_circuit_ablated"] == pair.metrics["backdoored"][f"n_{metric}"]
    pr = r["probes"]
    assert 0.0 <= pr["spectral_auroc"] <= 1.0 and 0.0 <= pr["activation_clustering_auroc"] <= 1.0
    assert "probe_auroc_backdoored" in pr or "probe_skipped" in pr
    inf = r["influence"]
    assert 0.0 <= inf["influence_auroc"] <= 1.0 and inf["influence_method"] == "ekfac unit"


def test_natural_contrast_refuses_a_backdoor(tiny_pair):
    with pytest.raises(ValueError, match="use trigger_contrast"):
        natural_contrast(tiny_pair)
    assert attack_from_dict(tiny_pair.attack.to_dict()) == tiny_pair.attack
