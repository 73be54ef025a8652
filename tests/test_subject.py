"""``resolve``: every kind of subject becomes one Subject; bad subjects name the accepted kinds."""

from __future__ import annotations

import pytest
import torch

import poisonmech as pm
from poisonmech.subject import Subject, dataset_fingerprint, resolve


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_pair_and_its_run_directory_resolve_to_the_same_subject(tiny_pair):
    s = resolve(tiny_pair)
    assert isinstance(s, Subject) and s.kind == "pair" and s.roles == ("backdoored", "clean")
    assert s.model() is tiny_pair.backdoored and s.reference() is tiny_pair.clean
    assert s.train_data is tiny_pair.train_data and s.train_data_of("clean") is tiny_pair.task.train
    assert s.stage_kind == "sft" and s.run_dir == tiny_pair.out_dir and s.is_run
    for d in (str(tiny_pair.out_dir), tiny_pair.out_dir):
        r = resolve(d)
        assert r.kind == "pair" and _same(r.model(), s.model()) and _same(r.model("clean"), s.model("clean"))
        assert r.fingerprint() == s.fingerprint() and r.data_fingerprint() == s.data_fingerprint()
        assert r.data_fingerprint("test_data") == s.data_fingerprint("test_data")
    assert resolve(s) is s
    with pytest.raises(ValueError, match=r"twin must be one of \('backdoored', 'clean'\)"):
        s.model("before")


def test_pipeline_stages_between_and_run_dirs(tiny_pipeline):
    pipe = tiny_pipeline
    last = resolve(pipe)
    assert last.kind == "stage" and last.stage_kind == "dpo" and last.stage.index == 1 and last.stage.beta > 0
    assert _same(last.model(), pipe.models[1]["backdoored"])
    sft = resolve(pipe[0])
    assert sft.stage_kind == "sft" and sft.preference() is None
    pref = last.preference("backdoored")
    assert pref["reference"] is not None and len(pref["data"]) == len(pipe.train_data[1])
    assert resolve(pipe.out_dir).stage.name == "stage_1_dpo"
    assert resolve(pipe.out_dir / "stage_0_sft").stage.name == "stage_0_sft"
    b = resolve(pipe.between(0, 1))
    assert b.kind == "between" and b.roles == ("after", "before") and b.run_dir is None
    assert _same(b.model("before"), pipe.models[0]["backdoored"]) and _same(b.model(), pipe.models[1]["backdoored"])
    with pytest.warns(DeprecationWarning, match="Between.clean is deprecated"):
        assert pipe.between(0, 1).clean is pipe.models[0]["backdoored"]


def test_a_bare_model_takes_its_data_from_the_call(tiny_pair):
    s = resolve(tiny_pair.backdoored)
    assert s.kind == "model" and s.roles == ("model",) and s.train_data is None and not s.is_run
    with pytest.raises(ValueError, match="needs two models"):
        s.reference("cross_model_patch")
    with pytest.raises(ValueError, match="probe_layers needs test data, .* pass dataset="):
        s.require("test_data", "probe_layers", "dataset")
    s2 = resolve(tiny_pair.backdoored, test=tiny_pair.test_data, tokenizer=tiny_pair.tokenizer)
    assert s2.test_data is tiny_pair.test_data and s2.tokenizer is tiny_pair.tokenizer
    assert dataset_fingerprint(None) == "" and len(s2.data_fingerprint("test_data")) == 16


def test_bad_subjects_name_the_accepted_kinds(tmp_path):
    with pytest.raises(TypeError, match=r"the subject must be one of: a pm.Pair .* a run directory"):
        resolve(42)
    with pytest.raises(FileNotFoundError, match="no run directory"):
        resolve(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a poisonmech run directory"):
        resolve(tmp_path)


def test_cache_key_changes_with_config_weights_and_data(tiny_pair):
    s = resolve(tiny_pair)
    cfg_a, cfg_b = pm.TrainConfig(seed=0), pm.TrainConfig(seed=1)
    k = s.cache_key(cfg_a)
    assert k == resolve(str(tiny_pair.out_dir)).cache_key(cfg_a)
    assert k != s.cache_key(cfg_b) and k != s.cache_key(cfg_a, role="clean")
    assert k != s.with_data(test=tiny_pair.test_data.select(range(3))).cache_key(cfg_a)
