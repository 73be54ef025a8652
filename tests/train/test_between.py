"""``Pipeline.between``'s result: roles "before" / "after", not a Pair's clean / backdoored."""

import warnings

import pytest
import torch

import poisonmech as pm
from poisonmech.subject import resolve
from poisonmech.train.pipeline import Between, Stage
from tests.helpers import small_bridge, tiny_task


def _between() -> Between:
    task = tiny_task(n_train=20, n_test=5)
    before, after = small_bridge(), small_bridge()
    with torch.no_grad():
        next(after.parameters()).add_(1.0)
    st = Stage("dpo", pm.Backdoor(trigger="cf", poison_count=1))
    return Between(before=before, after=after, twin="backdoored", stage_before="stage_0_sft",
                   stage_after="stage_1_dpo", index_before=0, index_after=1, stage_kind="dpo", task=task,
                   attack=st.attack, tokenizer=task.tokenizer, train_data=task.train, test_data=task.test,
                   model_config=pm.ModelConfig(), train_config=st.train_config,
                   metrics_before={"asr": 0.8}, metrics_after={"asr": 0.1})


def test_roles_are_before_and_after():
    b = _between()
    assert b.metrics == {"before": {"asr": 0.8}, "after": {"asr": 0.1}}
    assert b.out_dir is None and b.train_config == pm.DPOConfig().train
    assert repr(b) == "Between(backdoored twin: stage_0_sft -> stage_1_dpo, asr 0.800 -> 0.100)"
    s = resolve(b)
    assert s.kind == "between" and s.roles == ("after", "before") and s.default_role == "after"
    assert s.model() is b.after and s.reference() is b.before and s.run_dir is None and s.stage_kind == "dpo"
    with pytest.raises(ValueError, match=r"twin must be one of \('after', 'before'\)"):
        s.model("clean")
    assert not isinstance(b, pm.Pair)


def test_pair_names_are_deprecated_aliases():
    b = _between()
    with pytest.warns(DeprecationWarning, match="Between.clean is deprecated: use Between.before"):
        assert b.clean is b.before
    with pytest.warns(DeprecationWarning, match="Between.backdoored is deprecated: use Between.after"):
        assert b.backdoored is b.after
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert b.before is not b.after  # the new names do not warn
