"""``run_analyses``: each analysis' config and the subject's fingerprints are the cache key."""

from __future__ import annotations

import pytest

from poisonmech.analyses import CONFIGS, PatchingAnalysis, run_analyses
from poisonmech.config import ConfigError
from poisonmech.storage import read_json


def test_cached_on_config_weights_and_data(tiny_pair, tmp_path, monkeypatch):
    import poisonmech.analyses as an

    calls = []
    real = an.ANALYSES["patching"]
    monkeypatch.setitem(an.ANALYSES, "patching", lambda s, out, cfg: calls.append(cfg) or real(s, out, cfg))
    first = run_analyses(tiny_pair, ["patching"], tmp_path)
    assert len(calls) == 1 and (tmp_path / "analyses/patching/key.json").is_file()
    assert run_analyses(str(tiny_pair.out_dir), ["patching"], tmp_path) == first and len(calls) == 1  # cached
    key = read_json(tmp_path / "analyses/patching/key.json")
    assert key["config"] == {"n": 32} and set(key["weights"]) == {"backdoored", "clean"}
    # another config: recomputed, never the cached summary
    other = run_analyses(tiny_pair, {"patching": PatchingAnalysis(n=4)}, tmp_path)
    assert len(calls) == 2 and calls[-1] == PatchingAnalysis(n=4)
    assert other["patching"]["patching_n_examples"] <= 4 < first["patching"]["patching_n_examples"]
    # the config as a dict (what TOML and sweeps pass); same key: cached
    assert run_analyses(tiny_pair, {"patching": {"n": 4}}, tmp_path) == other and len(calls) == 2
    # a summary written before keys existed (no key.json) is recomputed
    (tmp_path / "analyses/patching/key.json").unlink()
    run_analyses(tiny_pair, {"patching": {"n": 4}}, tmp_path)
    assert len(calls) == 3


def test_bad_names_and_options(tiny_pair, tmp_path):
    assert set(CONFIGS) == {"patching", "circuits", "probes", "influence", "defenses"}
    with pytest.raises(ValueError, match="unknown analysis 'patchin'; allowed"):
        run_analyses(tiny_pair, ["patchin"], tmp_path)
    with pytest.raises(ConfigError, match="unknown field 'top'; allowed: n, top_n"):
        run_analyses(tiny_pair, {"circuits": {"top": 3}}, tmp_path)
    with pytest.raises(ConfigError, match="CircuitsAnalysis.mode must be one of"):
        run_analyses(tiny_pair, {"circuits": {"mode": "both"}}, tmp_path)
    with pytest.raises(ValueError, match="no run directory; pass run_dir="):
        run_analyses(tiny_pair.backdoored, ["patching"])
