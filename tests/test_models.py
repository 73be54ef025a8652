import pytest
import torch

import poisonmech as pm
from tests.helpers import tiny_model_config


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("arch", ["native", "gpt2", "neox", "llama", "qwen2"])
def test_same_seed_same_weights_and_rng_untouched(arch):
    cfg = tiny_model_config(architecture=arch, n_kv_heads=1 if arch in ("llama", "qwen2") else None)
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
    ({"architecture": "mamba"}, "architecture must be one of"),
    ({"architecture": "gpt2", "attn_only": True}, "architecture=.gpt2. supports only"),
    ({"architecture": "neox", "n_kv_heads": 2}, "n_kv_heads is for grouped-query attention"),
    ({"architecture": "llama", "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3 must divide n_heads=4"),
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


@pytest.mark.parametrize("arch, cls", [("neox", "GPTNeoXForCausalLM"), ("llama", "LlamaForCausalLM"),
                                       ("qwen2", "Qwen2ForCausalLM")])
def test_hf_architectures_build_the_hf_class_and_match_its_forward(arch, cls):
    m = pm.build_model(tiny_model_config(architecture=arch, n_heads=4, n_kv_heads=2 if arch != "neox" else None), 40,
                       seed=0)
    assert type(m.original_model).__name__ == cls
    tokens = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.allclose(m(tokens), m.original_model(tokens).logits, atol=1e-5)
    if arch != "neox":
        assert m.original_model.config.num_key_value_heads == 2


def test_new_model_fields_leave_stored_identities_unchanged():
    assert "n_kv_heads" not in pm.ModelConfig().to_dict()
    assert pm.ModelConfig(architecture="llama", n_kv_heads=1).to_dict()["n_kv_heads"] == 1
    assert pm.ModelConfig.from_dict(pm.ModelConfig(architecture="llama", n_kv_heads=1).to_dict()).n_kv_heads == 1
