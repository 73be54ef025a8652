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
    cfg.write_text(PIPELINE_TOML.format(out=tmp_path / "bad", dpo_kind="ppo"))
    result = CliRunner().invoke(app, ["pipeline", str(cfg)])
    assert result.exit_code == 2 and "stages[1].kind must be 'sft' or 'dpo'" in result.output
