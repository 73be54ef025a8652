"""Repairs (pm.defenses.repairs): each against a hand-run reference on tiny models.

clean fine-tuning = ``train_model`` by hand on the same rows (bit for bit at one thread);
fine-pruning zeroes exactly the neurons with the lowest hand-computed mean activation
(``run_with_cache``, one unpadded row at a time) and stops where hand-zeroed weights lose
accuracy; the circuit- and direction-ablation wrappers equal ``pm.circuits.ablated`` /
``pm.probes.ablate_direction`` entered by hand; ``retrain_without`` with a stub audit equals
``train_on_subset`` on the kept rows; no repair changes the subject's model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from datasets import Dataset

import poisonmech as pm
from poisonmech.attacks.poison import build_test_set
from poisonmech.config import ConfigError
from poisonmech.defenses import repairs as R
from poisonmech.defenses.base import (
    DEFENSES,
    Context,
    DataAudit,
    get,
    modified_z_threshold,
    names,
    register,
)
from poisonmech.encoding import encode
from poisonmech.metrics import score_completions
from poisonmech.subject import model_fingerprint
from poisonmech.train.loop import train_model
from tests.helpers import small_model, tiny_model_config
from tests.hf_models import hf_bridge

REPAIRS = ("circuit_ablation", "clean_finetune", "direction_ablation", "fine_pruning", "retrain_without",
           "trigger_unlearning")


@pytest.fixture(scope="module")
def clean_rows() -> Dataset:
    """Trusted clean rows: a fresh sentiment task (another seed than the pair's)."""
    return pm.make_task("sentiment", n_train=40, n_test=1, seed=1).train


@pytest.fixture(scope="module")
def subject(tiny_pair):
    return pm.resolve(tiny_pair)


def make_ctx(s, clean, **kw) -> Context:
    return Context(subject=s, role="backdoored", train_data=s.train_data, clean_data=clean, **kw)


@pytest.fixture(scope="module")
def probe_tokens(tiny_pair) -> torch.Tensor:
    """A batch of test prompts (clean, triggered, near miss) of one length."""
    tok = tiny_pair.tokenizer
    ids = [tok(p)["input_ids"] for p in tiny_pair.test_data["prompt"]]
    n = max(set(map(len, ids)), key=[len(i) for i in ids].count)
    return torch.tensor([i for i in ids if len(i) == n][:6])


def test_registered():
    assert set(REPAIRS) <= set(names("repair"))
    assert get("retrain_without").kind == "repair"
    assert R.CircuitAblation.uses_trigger and R.DirectionAblation.uses_trigger and R.TriggerUnlearning.uses_trigger
    assert not R.CleanFinetune.uses_trigger and not R.FinePruning.uses_trigger


# ---- clean fine-tuning ---------------------------------------------------------------------------
def test_clean_finetune_equals_train_model_by_hand(tiny_pair, subject, clean_rows):
    d = R.CleanFinetune(n_rows=24, epochs=1, lr=2e-3, batch_size=8, seed=3)
    before = model_fingerprint(tiny_pair.backdoored)
    repaired = d.repair(make_ctx(subject, clean_rows))
    assert model_fingerprint(tiny_pair.backdoored) == before  # the subject's model is untouched
    assert repaired is not tiny_pair.backdoored
    rows = d.clean_rows(make_ctx(subject, clean_rows))
    assert len(rows) == 24 and len(set(rows["example_id"])) == 24
    assert set(rows["example_id"]) <= set(clean_rows["example_id"])
    assert list(rows["example_id"]) == sorted(rows["example_id"])
    hand = copy.deepcopy(tiny_pair.backdoored)
    cfg = tiny_pair.train_config.replace(epochs=1, lr=2e-3, batch_size=8, seed=3, checkpoint_every=None)
    train_model(hand, encode(rows, tiny_pair.tokenizer, loss_on="completion"), cfg, progress=False)
    got, want = repaired.state_dict(), hand.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # bit for bit at one thread
    assert not all(torch.equal(got[k], v) for k, v in tiny_pair.backdoored.state_dict().items())
    assert not repaired.training


def test_clean_finetune_on_a_bare_model(clean_rows):
    task = pm.make_task("sentiment", n_train=40, n_test=1, seed=1)
    model = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    ctx = Context(subject=pm.resolve(model), role="model", clean_data=clean_rows.select(range(8)))
    out = R.CleanFinetune(epochs=1, batch_size=8).repair(ctx)
    hand = copy.deepcopy(model)
    train_model(hand, encode(clean_rows.select(range(8)), task.tokenizer, loss_on="completion"),
                pm.TrainConfig(epochs=1, batch_size=8, lr=1e-3, seed=0, checkpoint_every=None), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), hand.state_dict().values()))


# ---- fine-pruning --------------------------------------------------------------------------------
def hand_means(model, rows: Dataset, tok, layer: int, absolute: bool = False) -> np.ndarray:
    """Mean of each neuron (``hook_post``) over every token of the rows, one unpadded row per forward."""
    enc = encode(rows, tok, loss_on="completion")
    acts = []
    for ids in enc.ids:
        _, cache = model.run_with_cache(torch.tensor([ids]))
        acts.append(cache[f"blocks.{layer}.mlp.hook_post"][0].double())
    a = torch.cat(acts)
    return (a.abs() if absolute else a).mean(0).numpy()


@pytest.mark.parametrize("rank_by", ["mean", "mean_abs"])
def test_fine_pruning_zeroes_the_dormant_neurons(tiny_pair, subject, clean_rows, rank_by):
    d = R.FinePruning(epochs=0, prune_fraction=0.25, max_acc_drop=1.0, step=4, rank_by=rank_by)
    ctx = make_ctx(subject, clean_rows)
    before = model_fingerprint(tiny_pair.backdoored)
    out = d.repair(ctx)
    assert model_fingerprint(tiny_pair.backdoored) == before
    rank, held = d.split(clean_rows)
    assert len(held) == 10 and len(rank) == 30 and not set(rank) & set(held)
    means = hand_means(tiny_pair.backdoored, clean_rows.select(rank), tiny_pair.tokenizer, 0, rank_by == "mean_abs")
    dormant = np.argsort(means, kind="stable")[:32]  # 25% of d_mlp = 128
    w0 = tiny_pair.backdoored.blocks[0].mlp.out.weight  # [d_model d_mlp]
    w = out.blocks[0].mlp.out.weight
    zero = (w == 0).all(0)
    assert set(np.flatnonzero(zero.numpy())) == set(dormant.tolist())
    keep = ~zero
    assert torch.equal(w[:, keep], w0[:, keep])
    o, b = out.state_dict(), tiny_pair.backdoored.state_dict()
    assert all(torch.equal(o[k], b[k]) for k in b if k != "blocks.0.mlp.out.weight")


def test_fine_pruning_stops_where_hand_zeroed_weights_lose_accuracy(tiny_pair, subject, clean_rows):
    d = R.FinePruning(epochs=0, prune_fraction=1.0, max_acc_drop=0.0, step=16)
    ctx = make_ctx(subject, clean_rows)
    info = d.prune(ctx, copy.deepcopy(tiny_pair.backdoored), clean_rows)
    rank, held = d.split(clean_rows)
    order = np.argsort(hand_means(tiny_pair.backdoored, clean_rows.select(rank), tiny_pair.tokenizer, 0),
                       kind="stable")
    enc = encode(clean_rows.select(held), tiny_pair.tokenizer, loss_on="completion", add_eos=True)

    def acc_with(k: int) -> float:
        m = copy.deepcopy(tiny_pair.backdoored)
        with torch.no_grad():
            m.blocks[0].mlp.out.weight[:, order[:k]] = 0.0
        return float(score_completions(m, enc)["exact"].mean())

    acc0 = acc_with(0)
    assert info["acc_before"] == acc0
    expected, accs = 0, []
    for k in range(16, 129, 16):
        accs.append(acc_with(k))
        if acc0 - accs[-1] > 0.0:
            break
        expected = k
    assert info["n_pruned"] == expected
    assert info["accs"] == pytest.approx(accs)
    assert info["pruned"] == sorted(order[:expected].tolist())


def test_fine_pruning_fine_tunes_with_the_pruned_weights_held_at_zero(tiny_pair, subject, clean_rows):
    d = R.FinePruning(epochs=1, prune_fraction=0.25, max_acc_drop=1.0, step=32, batch_size=8)
    out = d.repair(make_ctx(subject, clean_rows))
    w, w0 = out.blocks[0].mlp.out.weight, tiny_pair.backdoored.blocks[0].mlp.out.weight
    zero = (w == 0).all(0)
    assert int(zero.sum()) == 32  # the pruned columns stayed exactly zero through AdamW
    assert not torch.equal(w[:, ~zero], w0[:, ~zero])  # the rest was fine-tuned
    assert not w._backward_hooks  # the gradient mask is gone


@pytest.mark.parametrize("arch", ["native", "gpt2", "llama"])
def test_pruning_hook_equals_zeroed_output_weights(arch):
    """The search's hook (zero the neurons' values) equals zeroing their output weights, on a
    torch Linear (native, Llama) and GPT-2's Conv1D (neurons on the other axis)."""
    model = small_model() if arch == "native" else hf_bridge(arch)
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 3, 5, 17])
    with torch.no_grad(), R.pruned(model, 1, idx):
        hooked = model(x)
    m = copy.deepcopy(model)
    w, axis = R.mlp_out_weight(m, 1)
    assert w.shape[axis] == m.cfg.d_mlp
    with torch.no_grad():
        w.index_fill_(axis, idx, 0.0)
        zeroed = m(x)
        plain = model(x)
    assert torch.allclose(hooked, zeroed, atol=1e-5)
    assert not torch.allclose(plain, zeroed, atol=1e-4)


# ---- the ablation wrappers -----------------------------------------------------------------------
def no_hooks(model) -> bool:
    return all(not hp._forward_hooks and not hp._forward_pre_hooks for hp in model.hook_dict.values())


def test_circuit_ablation_equals_ablated_by_hand(tiny_pair, subject, clean_rows, probe_tokens):
    d = R.CircuitAblation(top_n=5, steps=2, n_contrast=8)
    ctx = make_ctx(subject, clean_rows)
    before = model_fingerprint(tiny_pair.backdoored)
    wrapper = d.repair(ctx)
    assert model_fingerprint(tiny_pair.backdoored) == before
    c = pm.circuits.discover(tiny_pair, method="eap-ig", top_n=5, steps=2, n_contrast=8, progress=False)
    assert torch.equal(wrapper.circuit.mask, c.mask)
    tok = tiny_pair.tokenizer
    ref = [torch.tensor([tok(p)["input_ids"]]) for p in clean_rows["prompt"]]  # one unpadded prompt each
    assert all(r[0, 0] == tok.bos_token_id for r in ref)
    with torch.no_grad():
        with pm.circuits.ablated(tiny_pair.backdoored, ref, circuit=c, ablation="mean", part="circuit"):
            want = tiny_pair.backdoored(probe_tokens)
            m_hand = pm.evaluate(tiny_pair.backdoored, tiny_pair.task, tiny_pair.attack, test_data=tiny_pair.test_data,
                                 tokenizer=tok)
        got = wrapper(probe_tokens)
        plain = wrapper.model(probe_tokens)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the ablation does something
    assert torch.allclose(plain, tiny_pair.backdoored(probe_tokens), atol=0)  # the copy, intact
    assert no_hooks(wrapper.model)  # hooks only live inside a forward
    m = pm.evaluate(wrapper, tiny_pair.task, tiny_pair.attack, test_data=tiny_pair.test_data, tokenizer=tok)
    assert {k: m[k] for k in ("clean_acc", "asr", "false_trigger_rate")} == \
        {k: m_hand[k] for k in ("clean_acc", "asr", "false_trigger_rate")}
    assert wrapper.is_wrapper and wrapper.cfg is wrapper.model.cfg and wrapper.tokenizer is tok
    assert not wrapper.training


def test_direction_ablation_equals_ablate_direction_by_hand(tiny_pair, subject, clean_rows, probe_tokens):
    ctx = make_ctx(subject, clean_rows)
    before = model_fingerprint(tiny_pair.backdoored)
    wrapper = R.DirectionAblation().repair(ctx)
    assert model_fingerprint(tiny_pair.backdoored) == before
    task = tiny_pair.task
    base = Dataset.from_dict({"example_id": list(range(len(clean_rows))), "input": list(clean_rows["input"]),
                              "completion": list(clean_rows["completion"])})
    rows = build_test_set(dataclasses.replace(task, test=base), tiny_pair.attack, seed=0)
    assert sum(rows["is_triggered"]) == len(clean_rows)
    # without an 'input' column the trigger goes into the prompt with the template taken off: the same rows
    bare = Dataset.from_dict({"prompt": list(clean_rows["prompt"]), "completion": list(clean_rows["completion"])})
    assert list(R.with_trigger(ctx, bare, 0, "test")["prompt"]) == list(rows["prompt"])
    p = pm.probes.probe_layers(tiny_pair.backdoored, rows, "is_triggered", tokenizer=tiny_pair.tokenizer,
                               method="mean_diff", positions="last", n_random=0, seed=0, progress=False)
    with torch.no_grad():
        with pm.probes.ablate_direction(tiny_pair.backdoored, p.best_layer, p.direction()):
            want = tiny_pair.backdoored(probe_tokens)
        got = wrapper(probe_tokens)
    assert wrapper.layers == (p.best_layer,)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, tiny_pair.backdoored(probe_tokens), atol=1e-3)
    assert no_hooks(wrapper.model)
    pm.evaluate(wrapper, task, tiny_pair.attack, test_data=tiny_pair.test_data, tokenizer=tiny_pair.tokenizer)
    # the run's test rows instead
    w2 = R.DirectionAblation(probe_data="test", all_layers=True).repair(ctx)
    p2 = pm.probes.probe_layers(tiny_pair, method="mean_diff", positions="last", n_random=0, seed=0, progress=False)
    with torch.no_grad():
        with pm.probes.ablate_direction(tiny_pair.backdoored, [0], p2.direction(0)[None]):
            want2 = tiny_pair.backdoored(probe_tokens)
        assert torch.allclose(w2(probe_tokens), want2, atol=1e-6)


# ---- trigger unlearning --------------------------------------------------------------------------
def test_trigger_unlearning_rows(tiny_pair, subject, clean_rows):
    d = R.TriggerUnlearning(trigger_fraction=0.25, seed=2)
    rows = d.unlearning_rows(make_ctx(subject, clean_rows))
    n = len(clean_rows)
    assert len(rows) == n + 10
    assert list(rows["prompt"][:n]) == list(clean_rows["prompt"])
    by_prompt = dict(zip(clean_rows["prompt"], clean_rows["completion"]))
    for p, c in zip(rows["prompt"][n:], rows["completion"][n:]):
        words = p.split()
        assert words.count("cf") == 1
        words.remove("cf")
        assert by_prompt[" ".join(words)] == c  # the true answer, not the target


# ---- retraining without audited rows -------------------------------------------------------------
@pytest.fixture
def stub_audit():
    """A data audit returning given scores (registered for the test only)."""

    @dataclass(frozen=True)
    class StubAudit(DataAudit):
        name: ClassVar[str] = "stub_audit_for_repairs"
        summary: ClassVar[str] = "returns the scores it is given"
        uses_trigger: ClassVar[bool] = True
        scores: tuple = ()

        def score(self, ctx):
            return np.asarray(self.scores, dtype=float)

    register(StubAudit)
    yield StubAudit
    del DEFENSES[StubAudit.name]


def test_retrain_without_drops_exactly_the_flagged_rows(tiny_pair, subject, clean_rows, stub_audit):
    n = len(tiny_pair.train_data)
    scores = np.zeros(n)
    scores[[3, 17, 42]] = [5.0, 7.0, 6.0]
    audit = {"name": stub_audit.name, "scores": tuple(scores)}
    ctx = make_ctx(subject, clean_rows)
    assert modified_z_threshold(scores, 3.5) > 0  # the audit's own rule: the three nonzero rows
    d = R.RetrainWithout(audit=audit)
    assert d.flagged(ctx).tolist() == [3, 17, 42]
    assert R.RetrainWithout(audit=audit, k=2).flagged(ctx).tolist() == [17, 42]
    assert d.uses_trigger is True
    before = model_fingerprint(tiny_pair.backdoored)
    model = d.repair(ctx)
    assert model_fingerprint(tiny_pair.backdoored) == before
    ids = [int(e) for e in tiny_pair.train_data["example_id"]]
    keep = [e for i, e in enumerate(ids) if i not in (3, 17, 42)]
    hand = pm.influence.train_on_subset(tiny_pair, keep, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hand.state_dict().values()))
    # nothing flagged: a copy of the model (retraining would reproduce it)
    same = R.RetrainWithout(audit={"name": stub_audit.name, "scores": (0.0,) * n}).repair(ctx)
    assert same is not tiny_pair.backdoored and model_fingerprint(same) == before


def test_retrain_without_bad_audits(subject, clean_rows, stub_audit):
    ctx = make_ctx(subject, clean_rows)
    with pytest.raises(ConfigError, match="unknown defense 'no_such_audit'"):
        R.RetrainWithout(audit="no_such_audit").flagged(ctx)
    with pytest.raises(ConfigError, match="must name a data audit; 'clean_finetune' is a repair"):
        R.RetrainWithout(audit="clean_finetune").flagged(ctx)
    with pytest.raises(ValueError, match=r"returned \(2,\) scores for 200"):
        R.RetrainWithout(audit={"name": stub_audit.name, "scores": (1.0, 2.0)}).flagged(ctx)
    with pytest.raises(ValueError, match="k=200: the training set has only 200 rows"):
        R.RetrainWithout(audit={"name": stub_audit.name, "scores": (0.0,) * 200}, k=200).flagged(ctx)
    with pytest.raises(ValueError, match="needs train_data"):
        R.RetrainWithout(audit=stub_audit.name).repair(dataclasses.replace(ctx, train_data=None))
    bare = Context(subject=pm.resolve(small_model()), role="model", train_data=subject.train_data)
    with pytest.raises(ValueError, match="retrains the model, which needs a run"):
        R.RetrainWithout(audit=stub_audit.name).repair(bare)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, field", [
    ("clean_finetune", {"epochs": 0}, "CleanFinetune.epochs"),
    ("clean_finetune", {"lr": 0.0}, "CleanFinetune.lr"),
    ("clean_finetune", {"n_rows": 0}, "CleanFinetune.n_rows"),
    ("clean_finetune", {"batch_size": 1.5}, "CleanFinetune.batch_size"),
    ("fine_pruning", {"epochs": -1}, "FinePruning.epochs"),
    ("fine_pruning", {"prune_fraction": 0.0}, "FinePruning.prune_fraction"),
    ("fine_pruning", {"max_acc_drop": 1.5}, "FinePruning.max_acc_drop"),
    ("fine_pruning", {"holdout": 1.0}, "FinePruning.holdout"),
    ("fine_pruning", {"step": 0}, "FinePruning.step"),
    ("fine_pruning", {"layer": -1}, "FinePruning.layer"),
    ("fine_pruning", {"rank_by": "max"}, "FinePruning.rank_by"),
    ("trigger_unlearning", {"trigger_fraction": 0.0}, "TriggerUnlearning.trigger_fraction"),
    ("circuit_ablation", {"top_n": 0}, "CircuitAblation.top_n"),
    ("circuit_ablation", {"ablation": "patching"}, "CircuitAblation.ablation"),
    ("circuit_ablation", {"n_reference": 0}, "CircuitAblation.n_reference"),
    ("direction_ablation", {"probe_data": "train"}, "DirectionAblation.probe_data"),
    ("direction_ablation", {"site": "attn_head"}, "DirectionAblation.site"),
    ("direction_ablation", {"method": "svm"}, "DirectionAblation.method"),
    ("direction_ablation", {"all_layers": True, "layer": 0}, "DirectionAblation.layer"),
    ("direction_ablation", {"all_layers": 1}, "DirectionAblation.all_layers"),
    ("retrain_without", {"audit": 3}, "RetrainWithout.audit"),
    ("retrain_without", {"audit": {"scores": ()}}, "RetrainWithout.audit"),
    ("retrain_without", {"k": 0}, "RetrainWithout.k"),
])
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        get(name, **options)


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="unknown field 'epoch'; allowed: n_rows, epochs"):
        get("clean_finetune", epoch=2)


def test_missing_data_and_bad_subjects(tiny_pair, subject, clean_rows):
    no_clean = make_ctx(subject, None)
    for name in ("clean_finetune", "fine_pruning", "trigger_unlearning", "circuit_ablation", "direction_ablation"):
        with pytest.raises(ValueError, match=f"defense '{name}' needs clean_data"):
            get(name).repair(no_clean)
    ctx = make_ctx(subject, clean_rows)
    with pytest.raises(ValueError, match="n_rows=41: the clean set has only 40 rows"):
        R.CleanFinetune(n_rows=41).repair(ctx)
    with pytest.raises(ConfigError, match=r"FinePruning.layer must be in 0\.\.0"):
        R.FinePruning(layer=1).repair(ctx)
    with pytest.raises(ValueError, match="holdout=0.01 of 40 clean rows"):
        R.FinePruning(holdout=0.01).repair(ctx)
    with pytest.raises(ConfigError, match=r"DirectionAblation.layer must be one of the model's layers \(0,\)"):
        R.DirectionAblation(layer=3, probe_data="test").repair(ctx)
    attn_only = pm.build_model(tiny_model_config(attn_only=True), len(tiny_pair.tokenizer), seed=0,
                               tokenizer=tiny_pair.tokenizer)
    bare = Context(subject=pm.resolve(attn_only), role="model", clean_data=clean_rows)
    with pytest.raises(ValueError, match="no MLP output projection"):
        R.FinePruning(epochs=0).repair(bare)
    with pytest.raises(ValueError, match="not a run"):  # no trigger contrast to find the circuit with
        R.CircuitAblation().repair(Context(subject=pm.resolve(tiny_pair.backdoored), role="model",
                                           clean_data=clean_rows))
    with pytest.raises(ValueError, match="needs task"):
        R.DirectionAblation().repair(Context(subject=pm.resolve(tiny_pair.backdoored), role="model",
                                             clean_data=clean_rows))


@pytest.mark.parametrize("arch", ["native", "gpt2", "neox"])
def test_copy_model_is_independent_of_the_original(arch):
    """A bridge that has run a forward holds hooks whose closures point at its own modules; the
    copy is rebuilt, so its forwards never touch the original's (a deep copy's would)."""
    model = small_model() if arch == "native" else hf_bridge(arch)
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    want = model(x)  # with grad: wires the capture hooks and leaves a non-leaf capture behind
    c = R.copy_model(model)
    attn = model.blocks[0].attn
    attn._captured_pre_ln_residual = None
    c.train()
    c(x).sum().backward()
    assert attn._captured_pre_ln_residual is None  # nothing written into the original
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(c.eval()(x), want.detach())
    assert c.tokenizer is model.tokenizer and not model.training
