"""TrainConfig and DPOConfig: one Config base (unknown fields and ranges named), stable dicts,
and DPOConfig composing a TrainConfig while reading the flat dicts stored in pipeline runs."""

import dataclasses
import pickle

import numpy as np
import pytest

import poisonmech as pm
from poisonmech.config import Config, ConfigError
from poisonmech.train.dpo import SHARED_FIELDS, DPOConfig
from poisonmech.train.pipeline import Stage

#: DPOConfig().to_dict() as pipeline runs store it (runs/pipe/config.json, minus "device")
STORED_DPO = {"batch_size": 32, "beta": 0.1, "betas": [0.9, 0.98], "checkpoint_every": 1, "epochs": 2,
              "grad_clip": 1.0, "lr": 0.001, "min_lr_ratio": 0.05, "schedule": "cosine", "score_eos": False,
              "seed": 0, "warmup_ratio": 0.05, "weight_decay": 0.0}
#: TrainConfig().to_dict() as pair runs store it
STORED_TRAIN = {"epochs": 8, "batch_size": 32, "lr": 0.003, "schedule": "cosine", "warmup_ratio": 0.05,
                "min_lr_ratio": 0.05, "weight_decay": 0.01, "betas": [0.9, 0.98], "grad_clip": 1.0, "seed": 0,
                "checkpoint_every": 1, "device": "cpu", "continue_clean": 0, "continue_lr": None}


def test_configs_derive_from_the_one_base():
    for cls in (pm.TrainConfig, pm.ModelConfig, DPOConfig):
        assert issubclass(cls, Config) and dataclasses.is_dataclass(cls)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls().beta = 1.0


def test_train_config_dict_is_unchanged_and_round_trips():
    """Pair runs are identified by TrainConfig.to_dict(): keys, order and values must stay."""
    assert list(pm.TrainConfig().to_dict().items()) == list(STORED_TRAIN.items())
    cfg = pm.TrainConfig(epochs=3, betas=[0.8, 0.9], seed=np.int64(4), continue_clean=10, continue_lr=1e-4)
    assert cfg.betas == (0.8, 0.9) and type(cfg.seed) is int
    assert pm.TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert pm.TrainConfig.from_dict(cfg.to_dict()).fingerprint() == cfg.fingerprint() != pm.TrainConfig().fingerprint()


def test_unknown_train_fields_are_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"TrainConfig.from_dict: unknown field 'lr_max'; allowed: epochs, "
                                          r"batch_size, lr, .*continue_lr$"):
        pm.TrainConfig.from_dict({"lr_max": 1.0})
    with pytest.raises(ConfigError, match=r"TrainConfig.replace: unknown fields 'a', 'b'"):
        pm.TrainConfig().replace(a=1, b=2)
    with pytest.raises(TypeError):
        pm.TrainConfig(lr_max=1.0)


@pytest.mark.parametrize("kw, match", [
    ({"epochs": 0}, r"TrainConfig.epochs must be an integer in \[1, inf\], got 0"),
    ({"batch_size": 2.0}, r"TrainConfig.batch_size must be an integer in \[1, inf\]"),
    ({"lr": -1.0}, r"TrainConfig.lr must be a number in \(0, inf\]"),
    ({"schedule": "step"}, r"TrainConfig.schedule must be one of \('cosine', 'linear', 'constant'\), got 'step'"),
    ({"warmup_ratio": 1.0}, r"TrainConfig.warmup_ratio must be a number in \[0, 1\), got 1.0"),
    ({"min_lr_ratio": 1.5}, r"TrainConfig.min_lr_ratio must be a number in \[0, 1\]"),
    ({"weight_decay": -0.1}, r"TrainConfig.weight_decay must be a number in \[0, inf\]"),
    ({"betas": (0.9,)}, r"TrainConfig.betas must be two numbers in \[0, 1\)"),
    ({"betas": (0.9, 1.0)}, r"TrainConfig.betas must be two numbers in \[0, 1\)"),
    ({"grad_clip": 0}, r"TrainConfig.grad_clip must be a number in \(0, inf\] or None"),
    ({"checkpoint_every": 0}, r"TrainConfig.checkpoint_every must be an integer in \[1, inf\] or None"),
    ({"seed": -1}, r"TrainConfig.seed must be an integer >= 0"),
    ({"device": 0}, r"TrainConfig.device must be a torch device name"),
    ({"continue_lr": 0.0}, r"TrainConfig.continue_lr must be a number in \(0, inf\] or None"),
])
def test_out_of_range_train_values_name_the_field_and_range(kw, match):
    with pytest.raises(ConfigError, match=match):
        pm.TrainConfig(**kw)


def test_dpo_config_composes_a_train_config():
    cfg = DPOConfig(epochs=3, lr=2e-3, beta=0.2)
    assert isinstance(cfg.train, pm.TrainConfig) and cfg.train_config() is cfg.train
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.weight_decay) == (3, 2e-3, 0.0)  # DPO's defaults elsewhere
    assert cfg.epochs == 3 and cfg.lr == 2e-3 and cfg.batch_size == 32  # the TrainConfig fields read as its own
    # no TrainConfig field is re-declared: DPOConfig's own fields are the DPO ones and the TrainConfig
    assert [f.name for f in dataclasses.fields(DPOConfig)] == ["train", "beta", "score_eos", "nll_weight"]
    assert set(SHARED_FIELDS) == set(pm.TrainConfig.field_names()) - {"continue_clean", "continue_lr"}
    given = pm.TrainConfig(epochs=5, lr=1e-4, seed=3)
    assert DPOConfig(train=given, beta=0.3).train is given
    assert DPOConfig(train=given, lr=5e-4).train == given.replace(lr=5e-4)  # keywords override train's fields
    assert DPOConfig(train={"epochs": 4}).train == DPOConfig(epochs=4).train  # a dict: DPO's defaults under it
    assert cfg.replace(lr=1e-4).lr == 1e-4 and cfg.replace(beta=0.5).beta == 0.5 and cfg.replace(beta=0.5).lr == 2e-3
    assert pickle.loads(pickle.dumps(cfg)) == cfg and hash(cfg) == hash(DPOConfig(epochs=3, lr=2e-3, beta=0.2))
    with pytest.raises(AttributeError):
        cfg.continue_clean  # noqa: B018  (not a DPO setting)


def test_dpo_config_reads_and_writes_the_flat_dicts_stored_in_pipeline_runs():
    assert {k: v for k, v in DPOConfig().to_dict().items() if k != "device"} == STORED_DPO
    assert list(DPOConfig().to_dict()) == ["beta", "epochs", "batch_size", "lr", "schedule", "warmup_ratio",
                                           "min_lr_ratio", "weight_decay", "betas", "grad_clip", "seed",
                                           "checkpoint_every", "device", "score_eos"]
    old = DPOConfig.from_dict({**STORED_DPO, "device": "cpu"})
    assert old == DPOConfig() and old.train.betas == (0.9, 0.98)
    cfg = DPOConfig(beta=0.5, lr=1e-4, betas=(0.9, 0.95), nll_weight=0.5, score_eos=True)
    assert DPOConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["nll_weight"] == 0.5
    assert "nll_weight" not in DPOConfig().to_dict()  # omitted at its default: older runs keep their key
    nested = DPOConfig.from_dict({"train": {"epochs": 3}, "beta": 0.2})
    assert nested == DPOConfig(epochs=3, beta=0.2)
    st = Stage.from_dict({"kind": "dpo", "attack": pm.Backdoor(trigger="cf", poison_count=1, stage="dpo").to_dict(),
                          "config": {**STORED_DPO, "device": "cpu"}, "mode": "flip"})
    assert st.config == DPOConfig() and st.to_dict()["config"] == {**STORED_DPO, "device": "cpu"}


@pytest.mark.parametrize("kw, match", [
    ({"gamma": 1.0}, r"DPOConfig: unknown field 'gamma'; allowed: train, beta, score_eos, nll_weight, epochs"),
    ({"continue_clean": 5}, r"DPOConfig: unknown field 'continue_clean'"),
    ({"train": pm.TrainConfig(continue_clean=5)}, r"DPOConfig.train: a DPO stage has no clean continuation"),
    ({"train": 3}, r"DPOConfig.train must be a TrainConfig"),
    ({"beta": 0.0}, r"DPOConfig.beta must be a number in \(0, inf\), got 0.0"),
    ({"nll_weight": float("inf")}, r"DPOConfig.nll_weight must be a number in \[0, inf\)"),
    ({"score_eos": 1}, r"DPOConfig.score_eos must be True or False, got 1"),
    ({"lr": 0}, r"DPOConfig.lr must be a number in \(0, inf\]"),
    ({"schedule": "step"}, r"DPOConfig.schedule must be one of"),
])
def test_bad_dpo_configs_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        DPOConfig(**kw)
    with pytest.raises(ConfigError, match=r"DPOConfig.replace: unknown field 'gamma'"):
        DPOConfig().replace(gamma=1)
