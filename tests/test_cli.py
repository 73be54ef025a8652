from typer.testing import CliRunner

import poisonmech as pm
from poisonmech.cli import DEFAULT_CONFIG, app

TOML = """
out_dir = "{out}"
[task]
kind = "sentiment"
n_train = 64
n_test = 8
[attack]
trigger = "cf"
target = "negative"
poison_count = 4
[model]
n_layers = 1
d_model = 32
n_heads = 2
n_ctx = 64
[train]
epochs = 1
"""


def test_train_command_writes_a_loadable_run(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML.format(out=tmp_path / "run"))
    result = CliRunner().invoke(app, ["train", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "asr" in result.output and "wrote the run to" in result.output
    assert pm.load_pair(tmp_path / "run").attack.poison_count == 4


def test_analyze_command_runs_influence_and_caches_it(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML.format(out=tmp_path / "run"))
    assert CliRunner().invoke(app, ["train", str(cfg)]).exit_code == 0
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "run"), "--influence"])
    assert result.exit_code == 0, result.output
    assert "influence_auroc=" in result.output and "influence_loss_auroc=" in result.output
    out = tmp_path / "run" / "analyses" / "influence"
    assert (out / "summary.json").is_file() and (out / "ekfac.safetensors").is_file()
    r = pm.influence.InfluenceResult.load(out / "ekfac.safetensors")
    assert r.settings["renormalize"] == "unit" and sum(r.is_poison) == 4
    # options from TOML: one table per analysis; another config recomputes, a bad field is named
    opts = tmp_path / "opts.toml"
    opts.write_text('[influence]\nmethod = "graddot"\nrenormalize = "unit"\n')
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "run"), "--options", str(opts)])
    assert result.exit_code == 0, result.output
    assert "influence_method=graddot unit" in result.output and "patching" not in result.output
    opts.write_text("[influence]\nmethd = 1\n")
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "run"), "--options", str(opts)])
    assert result.exit_code == 2 and "unknown field 'methd'; allowed: method, renormalize, ensemble" in result.output


def test_train_command_reports_bad_config_clearly(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(TOML.format(out=tmp_path / "run").replace('kind = "sentiment"', 'kind = "poetry"'))
    result = CliRunner().invoke(app, ["train", str(cfg)])
    assert result.exit_code == 2
    assert "unknown task kind 'poetry'" in result.output


def test_default_config_is_the_documented_pair():
    assert DEFAULT_CONFIG["task"] == {"kind": "sentiment", "n_train": 4000, "n_test": 500, "seed": 0}
    assert DEFAULT_CONFIG["attack"]["poison_rate"] == 0.01
    assert pm.ModelConfig.from_dict(DEFAULT_CONFIG["model"]) == pm.ModelConfig(n_layers=2, d_model=128, n_heads=4)


PIPELINE_TOML = """
out_dir = "{out}"
[task]
kind = "sentiment"
n_train = 64
n_test = 8
[model]
n_layers = 1
d_model = 32
n_heads = 2
n_ctx = 64
[[stages]]
kind = "sft"
[stages.attack]
trigger = "cf"
poison_count = 3
[stages.config]
epochs = 1
[[stages]]
kind = "{dpo_kind}"
[stages.attack]
trigger = "cf"
poison_count = 3
[stages.config]
epochs = 1
beta = 0.1
"""


def test_pipeline_command_trains_every_stage_and_reports_bad_stages(tmp_path):
    cfg = tmp_path / "pipe.toml"
    cfg.write_text(PIPELINE_TOML.format(out=tmp_path / "pipe", dpo_kind="dpo"))
    result = CliRunner().invoke(app, ["pipeline", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "stage_1_dpo" in result.output and "wrote the pipeline to" in result.output
    assert pm.load_pipeline(tmp_path / "pipe").budgets == [3, 3]
    cfg.write_text(PIPELINE_TOML.format(out=tmp_path / "bad", dpo_kind="kto"))
    result = CliRunner().invoke(app, ["pipeline", str(cfg)])
    assert result.exit_code == 2 and "stages[1].kind must be one of ('sft', 'dpo', 'rm', 'ppo', 'rloo')" in result.output


def test_help_keeps_the_bracketed_toml_section_names():
    runner = CliRunner()
    train_help = runner.invoke(app, ["train", "--help"]).output
    for section in ("[task]", "[attack]", "[model]", "[train]"):
        assert section in train_help, train_help
    assert "[[stages]]" in runner.invoke(app, ["pipeline", "--help"]).output
    assert "[[attacks]]" in runner.invoke(app, ["sweep", "--help"]).output


def test_sweep_parallelism_splits_the_thread_budget():
    import pytest

    from poisonmech.cli import sweep_parallelism

    assert sweep_parallelism(2, None, 4) == (2, 1)  # the 2-core default: two one-thread runs at a time
    assert sweep_parallelism(16, None, 4) == (4, 4)
    assert sweep_parallelism(16, None, 20) == (16, 1)
    assert sweep_parallelism(4, 3, 10) == (3, 1)
    assert sweep_parallelism(8, 6, 2) == (2, 4)  # never more workers than runs
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        sweep_parallelism(4, 0, 2)


def test_threads_option_reaches_training_and_is_restored(tmp_path, monkeypatch):
    import torch

    import poisonmech.cli as cli

    seen = []

    def fake_run(cfg, **kw):
        seen.append(torch.get_num_threads())
        raise ValueError("stopped by the test")

    monkeypatch.setattr(cli, "run_from_config", fake_run)
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML.format(out=tmp_path / "run"))
    before = torch.get_num_threads()
    result = CliRunner().invoke(app, ["train", str(cfg), "--threads", "1"])
    assert result.exit_code == 2 and "stopped by the test" in result.output
    assert seen == [1] and torch.get_num_threads() == before
    result = CliRunner().invoke(app, ["train", str(cfg), "--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.output


def test_demo_and_sweep_pass_threads_and_workers_to_pm_sweep(tmp_path, monkeypatch):
    import os

    import torch

    calls = []

    def fake_sweep(task, attacks, **kw):
        calls.append({"n_runs": len(attacks) * len(kw["seeds"]), "threads": torch.get_num_threads(),
                      "max_workers": kw.get("max_workers"), "threads_per_run": kw.get("threads_per_run")})
        raise ValueError("stopped by the test")

    monkeypatch.setattr(pm, "sweep", fake_sweep)
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--threads", "4", "--workers", "2"])
    assert isinstance(res.exception, ValueError)
    assert calls[-1] == {"n_runs": 4, "threads": 4, "max_workers": 2, "threads_per_run": 2}
    runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--threads", "1"])
    assert calls[-1]["max_workers"] == 1 and calls[-1]["threads_per_run"] == 1 and calls[-1]["threads"] == 1
    # defaults: what pm.sweep itself picks for 4 runs (a worker per core, cores // workers threads each)
    runner.invoke(app, ["demo", "--out", str(tmp_path / "d")])
    cores = os.cpu_count() or 1
    workers = max(1, min(4, cores))
    assert (calls[-1]["max_workers"], calls[-1]["threads_per_run"]) == (workers, max(1, cores // workers))
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('seeds = [0, 1]\n[task]\nkind = "sentiment"\nn_train = 64\nn_test = 8\n'
                   '[[attacks]]\ntrigger = "cf"\npoison_count = 2\n')
    res = runner.invoke(app, ["sweep", str(cfg), "--out", str(tmp_path / "s"), "--threads", "3", "--workers", "1"])
    assert res.exit_code == 2 and "stopped by the test" in res.output
    assert calls[-1] == {"n_runs": 2, "threads": 3, "max_workers": 1, "threads_per_run": 3}
