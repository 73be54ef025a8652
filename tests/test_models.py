import pytest
import torch

import poisonmech as pm
from tests.helpers import tiny_model_config


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("arch", ["native", "gpt2"])
def test_same_seed_same_weights_and_rng_untouched(arch):
    cfg = tiny_model_config(architecture=arch)
    before = torch.random.get_rng_state()
    a, b = (_weights(pm.build_model(cfg, 50, seed=3)) for _ in range(2))
    c = _weights(pm.build_model(cfg, 50, seed=4))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("kw", [{"attn_only": True}, {"positional_embedding_type": "rotary"},
                                {"normalization_type": "RMS"}, {"normalization_type": None}])
def test_variants_build_and_run(kw):
    m = pm.build_model(tiny_model_config(**kw), 40, seed=0)
    assert m(torch.randint(0, 40, (2, 7))).shape == (2, 7, 40)


@pytest.mark.parametrize("kw, match", [
    ({"n_heads": 3}, "n_heads=3 must divide d_model=32"),
    ({"n_layers": 0}, r"n_layers must be an integer in \[1, inf\], got 0"),
    ({"d_head": 0}, r"d_head must be an integer in \[1, inf\] or None"),
    ({"act_fn": "tanh"}, "act_fn must be one of"),
    ({"normalization_type": "BN"}, "normalization_type must be one of"),
    ({"architecture": "llama"}, "architecture must be one of"),
    ({"architecture": "gpt2", "attn_only": True}, "architecture='gpt2' supports only"),
])
def test_bad_model_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_model_config(**kw)


def test_config_round_trip():
    cfg = tiny_model_config(d_mlp=48)
    assert pm.ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(pm.ConfigError,
                       match="ModelConfig.from_dict: unknown field 'width'; allowed: n_layers, d_model, n_heads"):
        pm.ModelConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="ModelConfig.replace: unknown field 'width'; allowed: n_layers"):
        cfg.replace(width=3)
    assert cfg.replace(d_mlp=64).d_mlp == 64 and cfg.fingerprint() == tiny_model_config(d_mlp=48).fingerprint()
    assert cfg.fingerprint() != cfg.replace(d_mlp=64).fingerprint()


def test_config_dict_is_unchanged():
    """Run directories are identified by ModelConfig.to_dict(): its keys, order and values must stay."""
    assert list(pm.ModelConfig().to_dict().items()) == [
        ("n_layers", 2), ("d_model", 128), ("n_heads", 4), ("d_head", None), ("d_mlp", None), ("n_ctx", 128),
        ("attn_only", False), ("act_fn", "gelu"), ("normalization_type", "LN"),
        ("positional_embedding_type", "standard"), ("architecture", "native")]


def test_model_device_is_the_runtime_one():
    from poisonmech import models, runtime

    assert models.model_device is runtime.model_device
