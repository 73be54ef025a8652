"""``train_pipeline``: twins at every stage boundary, reuse, resume, reload and bad input."""

import pytest
import torch
from datasets import Dataset

import poisonmech as pm
from poisonmech.train.dpo import DPOConfig
from poisonmech.train.pipeline import Pipeline, Stage, load_pipeline, train_pipeline
from tests.helpers import tiny_model_config, tiny_task, tiny_train_config

torch.set_num_threads(1)


def _stages(sft: int, dpo: int, **dpo_kw):
    return [Stage("sft", pm.Backdoor(trigger="cf", poison_count=sft), tiny_train_config(epochs=1)),
            Stage("dpo", pm.Backdoor(trigger="cf", poison_count=dpo), DPOConfig(epochs=2, lr=3e-3, **dpo_kw))]


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pipe")
    return train_pipeline(tiny_task(n_train=96, n_test=12), _stages(0, 6), model=tiny_model_config(),
                          out_dir=out / "run", cache_dir=out / "cache", progress=False)


def test_twins_and_metrics_at_every_stage_boundary(pipe):
    assert isinstance(pipe, Pipeline) and len(pipe) == 2 and pipe.budgets == [0, 6]
    for k in range(2):
        assert set(pipe.metrics[k]) == {"clean", "backdoored"}
        assert {"clean_acc", "asr", "false_trigger_rate"} <= set(pipe.metrics[k]["backdoored"])
    # zero SFT budget: the backdoored twin's SFT stage is the clean twin's, bit for bit
    assert _same(pipe[0].clean, pipe[0].backdoored)
    assert not _same(pipe[1].clean, pipe[1].backdoored)
    final = pipe.pair()
    assert final.metrics == pipe.metrics[1] and final.attack.stage == "dpo"
    assert sum(final.train_data["is_poison"]) == 6 and "chosen" in final.train_data.column_names
    step = pipe.between("stage_0_sft", "stage_1_dpo")  # the backdoored twin before / after DPO
    assert _same(step.before, pipe.models[0]["backdoored"]) and _same(step.after, pipe.models[1]["backdoored"])
    frame = pipe.to_frame()
    assert set(frame["stage_name"]) == {"stage_0_sft", "stage_1_dpo"} and set(frame["twin"]) == {"clean", "backdoored"}
    assert [c.epoch for c in pipe.checkpoints[1]["backdoored"]] == [1, 2]


def test_run_directory_reloads_bit_for_bit_and_a_finished_run_is_reused(pipe, monkeypatch):
    out = pipe.out_dir
    for f in ("config.json", "metrics.json", "data/preferences.parquet", "data/stage_1.parquet",
              "stage_0_sft/clean/model.safetensors", "stage_1_dpo/backdoored/metrics.json",
              "stage_1_dpo/backdoored/reference_logps.safetensors"):
        assert (out / f).is_file(), f
    assert not list(out.rglob("*.pt")) and not list(out.rglob("resume.safetensors"))
    loaded = load_pipeline(out)
    tokens = torch.tensor([pipe.tokenizer(pipe.test_data[1]["prompt"])["input_ids"]])
    for k in range(2):
        for twin in ("clean", "backdoored"):
            assert torch.equal(pipe.models[k][twin](tokens), loaded.models[k][twin](tokens))
    assert loaded.metrics == pipe.metrics and loaded.stages == pipe.stages
    import poisonmech.train.pipeline as pl

    monkeypatch.setattr(pl, "_train_stage", lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = train_pipeline(pipe.task, _stages(0, 6), model=tiny_model_config(), out_dir=out, progress=False)
    assert again.metrics == pipe.metrics


def test_cache_shares_finished_stages_between_runs(pipe, tmp_path, monkeypatch):
    import poisonmech.train.pipeline as pl

    real, trained = pl._train_stage, []

    def counting(m, st, *args, **kw):
        trained.append((st.kind, args[-1]))
        return real(m, st, *args, **kw)

    monkeypatch.setattr(pl, "_train_stage", counting)
    other = train_pipeline(pipe.task, _stages(0, 3), model=tiny_model_config(), out_dir=tmp_path / "b",
                           cache_dir=pipe.out_dir.parent / "cache", progress=False)
    assert trained == [("dpo", "backdoored")]  # clean twin and the unpoisoned SFT stage come from the cache
    assert _same(other[0].clean, pipe[0].clean) and _same(other[1].clean, pipe[1].clean)


def test_interrupted_stage_resumes_to_the_same_weights(pipe, tmp_path, monkeypatch):
    import poisonmech.train.loop as loop

    real, calls = loop._save_resume, []  # the SFT and DPO loops save their state through it

    def crash_once(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if "stage_1_dpo" in str(path):  # count the DPO stage's epochs only
            calls.append(1)
        if len(calls) == 3:  # the clean twin's DPO has 2 epochs: crash in the backdoored twin's
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(loop, "_save_resume", crash_once)
    with pytest.raises(KeyboardInterrupt):
        train_pipeline(pipe.task, _stages(0, 6), model=tiny_model_config(), out_dir=tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / "stage_1_dpo" / "backdoored" / "resume.safetensors").is_file()
    with pytest.warns(UserWarning, match=r"stage_1_dpo backdoored: resuming the interrupted training .* after epoch "
                                         r"1 of 2"):
        resumed = train_pipeline(pipe.task, _stages(0, 6), model=tiny_model_config(), out_dir=tmp_path / "cut",
                                 progress=False)
    for k in range(2):
        for twin in ("clean", "backdoored"):
            assert _same(resumed.models[k][twin], pipe.models[k][twin]), (k, twin)
    assert resumed.metrics == pipe.metrics
    # the resumed stage says so in its history, and its time is the sum of both segments
    last = resumed.history[1]["backdoored"][-1]
    assert last["resumed_from_epoch"] == 1 and [(s["from_epoch"], s["to_epoch"]) for s in last["segments"]] == \
        [(0, 1), (1, 2)]
    assert last["seconds"] == pytest.approx(sum(s["seconds"] for s in last["segments"]))
    assert resumed.history[1]["clean"][-1]["resumed_from_epoch"] is None
    assert pipe.history[0]["clean"][-1]["seconds"] > 0  # SFT stages record their time too


def test_stage_weights_are_hashed_and_an_edited_one_is_refused(pipe, tmp_path):
    import hashlib
    import json
    import shutil

    from poisonmech.storage import WeightsChangedError

    assert json.loads((pipe.out_dir / "config.json").read_text())["environment"]["torch_num_threads"] >= 1
    d = pipe.out_dir / "stage_1_dpo" / "backdoored"
    recorded = json.loads((d / "sha256.json").read_text())
    files = [d / "model.safetensors", *sorted((d / "checkpoints").glob("*.safetensors"))]
    assert recorded == {f.relative_to(d).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    run = tmp_path / "edited"
    shutil.copytree(pipe.out_dir, run)
    path = run / "stage_0_sft" / "clean" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one byte of the last tensor; still a valid safetensors file
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsChangedError, match=r"stage_0_sft/clean/model.safetensors changed after it was written"):
        load_pipeline(run)
    assert load_pipeline(run, verify=False).metrics == pipe.metrics


def test_bad_input_gets_a_clear_error():
    task = tiny_task(n_train=40, n_test=5)
    kw = dict(model=tiny_model_config(), progress=False)
    with pytest.raises(ValueError, match="stage 0 is a 'dpo' stage, but DPO needs an SFT model to start from"):
        train_pipeline(task, [pm.Backdoor(trigger="cf", poison_count=1, stage="dpo")], **kw)
    with pytest.raises(ValueError, match=r"stage 1 \(dpo\): Backdoor.poison_count=39 does not fit the DPO stage's "
                                         r"data: only \d+ of 40 preference pairs"):
        train_pipeline(task, _stages(1, 39), **kw)
    with pytest.raises(ValueError, match=r"stage 0 \(sft\): Backdoor.poison_count=41 is larger than the training set"):
        train_pipeline(task, _stages(41, 1), **kw)
    with pytest.raises(ValueError, match=r"train_pipeline: preferences: missing column\(s\) \['rejected'\]"):
        train_pipeline(task, _stages(1, 1), preferences=Dataset.from_dict({"prompt": ["x"], "chosen": ["y"]}), **kw)
    with pytest.raises(ValueError, match=r"DPOConfig.beta must be a number in \(0, inf\)"):
        _stages(1, 1, beta=0.0)
    with pytest.raises(ValueError, match=r"Stage.config of a 'dpo' stage must be a DPOConfig, got TrainConfig"):
        Stage("dpo", pm.Backdoor(trigger="cf", poison_count=1), pm.TrainConfig())
    with pytest.raises(ValueError, match=r"Stage.kind must be one of \('sft', 'dpo', 'rm', 'ppo', 'rloo'\)"):
        Stage("rlhf", pm.Backdoor(trigger="cf", poison_count=1))
    with pytest.raises(ValueError, match=r"stage 1's Backdoor.target='positive' differs from stage 0's 'negative'"):
        train_pipeline(task, [pm.Backdoor(trigger="cf", poison_count=1),
                              pm.Backdoor(trigger="cf", target="positive", poison_count=1, stage="dpo")], **kw)


def test_analyses_run_on_each_stage_pair_and_the_report_shows_them(pipe):
    from poisonmech.analyses import run_analyses
    from poisonmech.viz import build_report, check_report, find_chrome

    final = run_analyses(pipe[1], ["patching", "probes", "influence"])
    assert "patching_top_head" in final["patching"]
    # a DPO stage's training data are preference pairs: the detectors say so, influence scores the pairs
    assert "preference pairs" in final["probes"]["detectors_skipped"]
    assert final["influence"]["influence_method"] == "ekfac (DPO pairs)"
    assert (pipe.out_dir / "stage_1_dpo" / "analyses" / "patching" / "summary.json").is_file()
    page = build_report(pipe.out_dir)
    text = page.read_text()
    assert "Stage 1: dpo, 6 poisons" in text and "Stage 0: sft, 0 poisons" in text
    if find_chrome() is not None:
        state = check_report(page)
        assert state["figures"] and state["figures"] == state["rendered"] and state["errors"] == ""


def test_analyze_command_runs_on_every_stage_of_a_pipeline(pipe):
    from typer.testing import CliRunner

    from poisonmech.cli import app

    result = CliRunner().invoke(app, ["analyze", str(pipe.out_dir), "--patching"])
    assert result.exit_code == 0, result.output
    assert "stage 0: patching:" in result.output and "stage 1: patching:" in result.output
    assert (pipe.out_dir / "stage_0_sft" / "analyses" / "patching" / "summary.json").is_file()


def test_attribution_of_a_dpo_stage_scores_its_preference_pairs(pipe):
    """The DPO stage's pair finds its reference log-probabilities and beta in the run directory."""
    r = pm.influence.attribute(pipe[1], method="ekfac", aggregate=True, progress=False)
    assert r.settings["preference_pairs"] and r.settings["dpo_beta"] == 0.1
    assert r.n_train == len(pipe.train_data[1]) and sum(r.is_poison) == 6
    assert 0.0 <= r.poison_auroc() <= 1.0
    with pytest.raises(ValueError, match="can be scored by"):
        pm.influence.attribute(pipe[1], method="gradcos", progress=False)
