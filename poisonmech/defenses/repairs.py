"""Repairs: each takes the model under test and returns a NEW repaired model (the subject's own
model is never changed) that :func:`poisonmech.evaluate` can score.

- ``"clean_finetune"`` (:class:`CleanFinetune`): fine-tune a copy on the defender's trusted clean
  rows (``ctx.clean_data``) with the run's loss (the training loop of the twins).
- ``"fine_pruning"`` (:class:`FinePruning`, Liu et al. 2018, *Fine-Pruning*): rank one layer's MLP
  neurons by their mean activation on clean rows, prune (zero the output weights of) the most
  dormant ones in increasing order while clean accuracy on held-out clean rows stays within
  ``max_acc_drop`` (and at most ``prune_fraction`` of the neurons), then fine-tune on the clean
  rows as ``clean_finetune`` does, the pruned neurons kept at zero.
- ``"trigger_unlearning"`` (:class:`TriggerUnlearning`): ``clean_finetune`` on the clean rows plus
  triggered copies of half of them that keep their true answers (Neural Cleanse's unlearning,
  with the run's own trigger; it reads the trigger).
- ``"circuit_ablation"`` (:class:`CircuitAblation`): discover the backdoor circuit (EAP-IG on the
  run's triggered / control contrast) and return a model whose every forward runs with the
  circuit's edges mean-ablated (the mean over clean inputs): a :class:`CircuitAblatedModel`.
- ``"direction_ablation"`` (:class:`DirectionAblation`): a linear probe direction for
  ``is_triggered`` projected out of the residual stream at one layer on every forward: a
  :class:`DirectionAblatedModel`.
- ``"retrain_without"`` (:class:`RetrainWithout`): retrain the twin from its initial weights
  without the training rows a data audit flags (Tran et al.'s protocol for spectral signatures;
  by default the trigger-agnostic keyword audit, BKI).

The two ablation repairs return a small wrapper module (:class:`RepairedModel`): it holds a copy
of the model and enters the intervention's context manager inside each ``forward`` only, so no
hook stays attached outside a forward. It keeps the copy's ``cfg`` and ``tokenizer``, answers
``model(tokens) -> logits`` (what :func:`poisonmech.evaluate` calls) and is marked
``is_wrapper = True`` (analyses that hook a bridge, e.g. patching, need the bridge itself: its
``.model``, without the intervention).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset

from poisonmech.config import ConfigError, check_choice, check_number
from poisonmech.defenses.base import Context, DataAudit, Repair, get, register
from poisonmech.defenses.wrappers import CircuitAblatedModel, DirectionAblatedModel, RepairedModel
from poisonmech.encoding import Encoded, encode
from poisonmech.probes.activations import prompt_encoding
from poisonmech.runtime import eval_mode, model_device

Tensor = torch.Tensor

PROBE_DATA = ("clean", "test")
PROBE_METHODS = ("mean_diff", "logistic")
RANK_BY = ("mean", "mean_abs")
MEAN_ABLATIONS = ("mean", "zero")


# ---- shared helpers ------------------------------------------------------------------------------
def copy_model(model: torch.nn.Module, subject: Any = None) -> torch.nn.Module:
    """A fresh copy of ``model`` with its weights (checked bit for bit): repairs change the copy,
    never the subject's model. A bridge is rebuilt by :func:`poisonmech.models.copy_bridge` (why
    not ``copy.deepcopy``: see there); a LoRA twin is rebuilt from its run's ``PretrainedModel``
    (``subject.model_config``) with its adapters loaded, so it stays a LoRA twin.
    """
    from poisonmech.models import build_model, copy_bridge
    from poisonmech.weights import load_weights, lora_module, weights

    if lora_module(model) is None:
        return copy_bridge(model)
    s = subject
    if s is None or getattr(s, "model_config", None) is None or getattr(s, "tokenizer", None) is None:
        raise ValueError("repairs: copying a LoRA twin needs its run (its PretrainedModel and tokenizer)")
    seed = getattr(getattr(s, "train_config", None), "seed", 0)
    fresh = build_model(s.model_config, len(s.tokenizer), seed=seed, tokenizer=s.tokenizer, device=model_device(model))
    load_weights(fresh, weights(model))
    a, b = model.state_dict(), fresh.state_dict()
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError(f"repairs: the copy of {type(model).__name__} does not hold the model's weights")
    return fresh.train(model.training)


def loss_on(ctx: Context) -> str:
    """The run's loss (``task.loss_on``); ``"completion"`` for a subject without a task."""
    task = getattr(ctx.subject, "task", None)
    return getattr(task, "loss_on", None) or "completion"


def eval_encoding(ctx: Context, rows: Dataset) -> Encoded:
    """``rows`` encoded as :func:`poisonmech.evaluate` scores them (with the EOS for completion tasks)."""
    on = loss_on(ctx)
    return encode(rows, ctx.tokenizer, loss_on="completion", add_eos=on == "completion")


@torch.no_grad()
def clean_accuracy(model: torch.nn.Module, enc: Encoded, on: str, batch_size: int = 256) -> float:
    """:func:`poisonmech.evaluate`'s ``clean_acc`` on encoded clean rows: exact match of the
    completion (completion tasks) or next-token accuracy (``loss_on="all"``)."""
    from poisonmech.metrics import score_completions

    with eval_mode(model):
        s = score_completions(model, enc, batch_size)
    if on == "all":
        n = s["n"].sum()
        return float((s["token_acc"] * s["n"]).sum() / n) if n else float("nan")
    return float(np.mean(s["exact"])) if len(s["exact"]) else float("nan")


def need_tokenizer(ctx: Context, name: str):
    if ctx.tokenizer is None:
        raise ValueError(f"defense {name!r} needs a tokenizer: pass a run, or a bare model with a .tokenizer")
    return ctx.tokenizer


# ---- clean fine-tuning ---------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class CleanFinetune(Repair):
    """Fine-tune a copy of the model on the defender's trusted clean rows.

    The loss is the run's (``task.loss_on``: the completion tokens, or every token of a
    plain-text task) and the loop is the twins' (:func:`poisonmech.train.loop.train_model`): the
    run's ``TrainConfig`` (schedule, warm-up, weight decay, betas, gradient clipping) with this
    repair's ``epochs``, ``lr``, ``batch_size`` and ``seed`` (a bare model: ``TrainConfig``'s
    defaults for the rest), no clean continuation, no checkpoints.

    Args:
        n_rows: how many of ``ctx.clean_data``'s rows to fine-tune on (a seeded sample);
            ``None``: every row.
        epochs: passes over those rows (>= 1).
        lr: peak learning rate (> 0).
        batch_size: rows per optimiser step (>= 1).
        seed: the data order and the sample of ``n_rows``.
    """

    name: ClassVar[str] = "clean_finetune"
    summary: ClassVar[str] = "fine-tune a copy on the defender's trusted clean rows"
    uses_trigger: ClassVar[bool] = False

    n_rows: int | None = None
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0

    #: the smallest ``epochs`` (fine-pruning allows 0: pruning alone)
    min_epochs: ClassVar[int] = 1

    def check(self) -> None:
        owner = type(self).__name__
        check_number(owner, "n_rows", self.n_rows, lo=1, integer=True, optional=True)
        check_number(owner, "epochs", self.epochs, lo=self.min_epochs, integer=True)
        check_number(owner, "lr", self.lr, lo=0.0, lo_open=True)
        check_number(owner, "batch_size", self.batch_size, lo=1, integer=True)
        check_number(owner, "seed", self.seed, lo=0, integer=True)

    def clean_rows(self, ctx: Context) -> Dataset:
        """The trusted clean rows this repair uses: ``n_rows`` of them (seeded sample, in their
        order), or all."""
        clean = ctx.need("clean_data", self.name)
        if self.n_rows is None:
            return clean
        if self.n_rows > len(clean):
            raise ValueError(f"{type(self).__name__}.n_rows={self.n_rows}: the clean set has only {len(clean)} rows")
        pick = np.random.default_rng(self.seed).choice(len(clean), size=self.n_rows, replace=False)
        return clean.select(sorted(int(i) for i in pick))

    def train_config(self, ctx: Context, model: torch.nn.Module):
        """The fine-tuning ``TrainConfig``: the run's with this repair's fields (see the class docstring)."""
        from poisonmech.train.config import TrainConfig

        base = getattr(ctx.subject, "train_config", None)
        base = base if isinstance(base, TrainConfig) else TrainConfig()
        return base.replace(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                            continue_clean=0, continue_lr=None, checkpoint_every=None,
                            device=str(model_device(model)))

    def finetune(self, ctx: Context, model: torch.nn.Module, rows: Dataset) -> torch.nn.Module:
        """Train ``model`` (a copy) in place on ``rows`` with the run's loss; returns it in eval mode."""
        from poisonmech.train.loop import train_model

        enc = encode(rows, need_tokenizer(ctx, self.name), loss_on=loss_on(ctx))
        train_model(model, enc, self.train_config(ctx, model), run_dir=None, desc=self.name, progress=ctx.progress)
        return model.eval()

    def repair(self, ctx: Context) -> torch.nn.Module:
        rows = self.clean_rows(ctx)
        return self.finetune(ctx, copy_model(ctx.model, ctx.subject), rows)


# ---- fine-pruning --------------------------------------------------------------------------------
def mlp_out_weight(model: torch.nn.Module, layer: int) -> tuple[Tensor, int]:
    """The output projection weight of ``layer``'s MLP and its neuron axis (``d_mlp``): a
    ``torch.nn.Linear`` (native and most HF bridges: ``[d_model d_mlp]``, axis 1) or GPT-2's
    ``Conv1D`` (``[d_mlp d_model]``, axis 0). Anything else is an error naming the architecture."""
    from poisonmech.sites import architecture_name

    block = model.blocks[layer]
    mlp = getattr(block, "mlp", None)
    out = getattr(mlp, "out", None) if mlp is not None else None
    if out is None:
        raise ValueError(f"fine_pruning: {architecture_name(model)}'s block {layer} has no MLP output projection "
                         "(an attention-only model has no neurons to prune)")
    from transformers.pytorch_utils import Conv1D

    inner = getattr(out, "original_component", out)
    if isinstance(inner, torch.nn.Linear):
        return inner.weight, 1
    if isinstance(inner, Conv1D):
        return inner.weight, 0
    raise ValueError(f"fine_pruning: {architecture_name(model)}'s MLP output projection is a "
                     f"{type(inner).__name__}, neither torch.nn.Linear nor GPT-2's Conv1D; pruning its neurons "
                     "is not supported for this architecture")


def neuron_hook(layer: int) -> str:
    """The hook point of ``layer``'s MLP neurons: the output projection's input
    ``[batch pos d_mlp]`` (after the activation; the gate times the up-projection in a gated MLP),
    exactly what the pruned output weights multiply."""
    return f"blocks.{layer}.mlp.out.hook_in"


@torch.no_grad()
def neuron_means(model: torch.nn.Module, enc: Encoded, layer: int, *, absolute: bool = False,
                 batch_size: int = 64) -> Tensor:
    """Mean activation (or mean absolute activation) of every neuron of ``layer``'s MLP over every
    real token (padding excluded) of the encoded rows: ``[d_mlp]`` (float64)."""
    name = neuron_hook(layer)
    if name not in model.hook_dict:
        raise ValueError(f"fine_pruning: the model has no hook point {name!r} (the MLP's neurons)")
    device = model_device(model)
    total: Tensor | None = None
    count = 0
    valid: list[Tensor] = []

    def hook(x: Tensor, hook=None) -> None:  # noqa: ARG001
        nonlocal total
        v = valid[0].to(x.device)
        a = x.double().abs() if absolute else x.double()
        s = (a * v[..., None]).sum(dim=(0, 1))
        total = s if total is None else total + s

    with eval_mode(model), model.hooks(fwd_hooks=[(name, hook)]):
        for lo in range(0, len(enc), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(enc))))
            tokens, _ = enc.batch(idx, device)
            lengths = torch.tensor([len(enc.ids[i]) for i in idx])
            valid[:] = [(torch.arange(tokens.shape[1])[None] < lengths[:, None]).double()]
            model(tokens)
            count += int(lengths.sum())
    return (total / count).cpu()


@contextmanager
def pruned(model: torch.nn.Module, layer: int, neurons: Tensor) -> Iterator[torch.nn.Module]:
    """Inside the block, ``layer``'s MLP neurons ``neurons`` output zero (their value at the output
    projection's input is zeroed: the same as zeroing their output weights)."""
    d_mlp = int(model.cfg.d_mlp)
    keep = torch.ones(d_mlp, device=model_device(model))
    keep[neurons] = 0.0

    def hook(x: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        return x * keep.to(x.dtype)

    with model.hooks(fwd_hooks=[(neuron_hook(layer), hook)]):
        yield model


@register
@dataclass(frozen=True)
class FinePruning(CleanFinetune):
    """Fine-pruning (Liu, Dolan-Gavitt & Garg 2018): prune the MLP neurons clean inputs leave
    dormant, then fine-tune on the clean rows.

    The clean rows (``n_rows`` of ``ctx.clean_data``, or all) are split (seeded) into ranking
    rows and ``holdout`` held-out rows. Each neuron of ``layer``'s MLP is ranked by its mean
    activation over every token of the ranking rows (``rank_by="mean"``, the paper's rule;
    ``"mean_abs"``: mean absolute activation, which also calls a GELU neuron stuck at a constant
    negative value dormant); neurons are pruned in increasing order, ``step`` at a time, while
    the held-out clean accuracy (:func:`poisonmech.evaluate`'s ``clean_acc``) stays within
    ``max_acc_drop`` of the unpruned model's and at most ``prune_fraction`` of the neurons are
    pruned: the last count that passed is kept. Pruning zeroes the neurons' output weights;
    then the model is fine-tuned on every clean row as :class:`CleanFinetune` does, with the
    pruned weights held at zero (their gradient is masked, so AdamW never moves them).

    Args (besides :class:`CleanFinetune`'s; ``epochs=0`` prunes without fine-tuning):
        layer: the MLP layer pruned; ``None``: the last layer (the paper's choice).
        prune_fraction: the largest fraction of that layer's neurons pruned, in (0, 1].
        max_acc_drop: the held-out clean accuracy may fall at most this much (absolute, in [0, 1]).
        holdout: the fraction of clean rows held out to measure accuracy while pruning, in (0, 1).
        step: neurons pruned per accuracy check (>= 1); ``None``: ``d_mlp // 64`` (at least 1), so
            at most 64 checks (one neuron at a time, the paper's schedule, costs ``d_mlp`` forwards of
            the held-out rows: over a minute on one thread for the default 2x128 model's 512 neurons).
        rank_by: ``"mean"`` or ``"mean_abs"``.
    """

    name: ClassVar[str] = "fine_pruning"
    summary: ClassVar[str] = "prune MLP neurons dormant on clean rows, then fine-tune on them (Liu et al. 2018)"
    uses_trigger: ClassVar[bool] = False
    min_epochs: ClassVar[int] = 0

    layer: int | None = None
    prune_fraction: float = 0.8
    max_acc_drop: float = 0.04
    holdout: float = 0.25
    step: int | None = None
    rank_by: str = "mean"

    def check(self) -> None:
        super().check()
        owner = type(self).__name__
        check_number(owner, "layer", self.layer, lo=0, integer=True, optional=True)
        check_number(owner, "prune_fraction", self.prune_fraction, lo=0.0, hi=1.0, lo_open=True)
        check_number(owner, "max_acc_drop", self.max_acc_drop, lo=0.0, hi=1.0)
        check_number(owner, "holdout", self.holdout, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_number(owner, "step", self.step, lo=1, integer=True, optional=True)
        check_choice(owner, "rank_by", self.rank_by, RANK_BY)

    def split(self, rows: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Row indices ``(ranking, held_out)`` of the clean rows (seeded; each side non-empty)."""
        n = len(rows)
        n_out = int(round(self.holdout * n))
        if n < 2 or not 1 <= n_out < n:
            raise ValueError(f"fine_pruning: holdout={self.holdout} of {n} clean rows leaves no ranking or no held-out "
                             "rows; give more clean rows (n_rows) or another holdout")
        perm = np.random.default_rng(self.seed).permutation(n)
        return np.sort(perm[n_out:]), np.sort(perm[:n_out])

    def prune(self, ctx: Context, model: torch.nn.Module, rows: Dataset) -> dict[str, Any]:
        """Choose and zero the dormant neurons of ``model`` (a copy) in place; returns what was done:
        ``layer``, ``order`` (neurons, most dormant first), ``means``, ``n_pruned``, ``pruned``
        (the zeroed neurons, sorted), ``acc_before`` / ``accs`` (held-out accuracy unpruned and
        after each step)."""
        from poisonmech.sites import architecture_name
        from poisonmech.weights import lora_module

        if lora_module(model) is not None:
            raise ValueError("fine_pruning: a LoRA twin trains its adapters, not the bridge's MLP weights; pruning "
                             "a LoRA twin's neurons is not supported (use clean_finetune)")
        n_layers = int(model.cfg.n_layers)
        layer = n_layers - 1 if self.layer is None else self.layer
        if layer >= n_layers:
            raise ConfigError(f"FinePruning.layer must be in 0..{n_layers - 1} for this model, got {self.layer}")
        weight, axis = mlp_out_weight(model, layer)
        d_mlp = int(model.cfg.d_mlp)
        if weight.shape[axis] != d_mlp:
            raise ValueError(f"fine_pruning: {architecture_name(model)}'s MLP output weight {tuple(weight.shape)} has "
                             f"no axis of d_mlp={d_mlp} where expected")
        rank_idx, out_idx = self.split(rows)
        tok = need_tokenizer(ctx, self.name)
        means = neuron_means(model, encode(rows.select(rank_idx), tok, loss_on=loss_on(ctx)), layer,
                             absolute=self.rank_by == "mean_abs")
        order = torch.as_tensor(np.argsort(means.numpy(), kind="stable"))
        held = eval_encoding(ctx, rows.select(out_idx))
        on = loss_on(ctx)
        acc0 = clean_accuracy(model, held, on)
        max_n = int(np.floor(self.prune_fraction * d_mlp))
        step = self.step if self.step is not None else max(1, d_mlp // 64)
        n_pruned, accs = 0, []
        for k in range(step, max_n + 1, step):
            with pruned(model, layer, order[:k]):
                acc = clean_accuracy(model, held, on)
            accs.append(acc)
            if acc0 - acc > self.max_acc_drop:
                break
            n_pruned = k
        chosen = order[:n_pruned]
        with torch.no_grad():
            weight.index_fill_(axis, chosen.to(weight.device), 0.0)
        return {"layer": layer, "order": order, "means": means, "n_pruned": n_pruned,
                "pruned": sorted(int(i) for i in chosen), "acc_before": acc0, "accs": accs, "weight": weight,
                "axis": axis}

    def repair(self, ctx: Context) -> torch.nn.Module:
        rows = self.clean_rows(ctx)
        model = copy_model(ctx.model, ctx.subject)
        info = self.prune(ctx, model, rows)
        if self.epochs == 0:
            return model.eval()
        weight, axis = info["weight"], info["axis"]
        mask = torch.ones_like(weight)
        mask.index_fill_(axis, torch.as_tensor(info["pruned"], dtype=torch.long, device=weight.device), 0.0)
        handle = weight.register_hook(lambda g: g * mask.to(g.dtype))
        try:
            self.finetune(ctx, model, rows)
        finally:
            handle.remove()
        return model


@register
@dataclass(frozen=True)
class TriggerUnlearning(CleanFinetune):
    """Fine-tune on the clean rows plus triggered copies of some of them that keep their true
    answers: Neural Cleanse's unlearning (Wang et al. 2019), with the run's own trigger in place
    of a reverse-engineered one (so an upper bound for defenses that first synthesise the
    trigger). It reads the trigger (``uses_trigger``).

    The training rows are the clean rows (``n_rows`` of ``ctx.clean_data``, or all) followed by
    the triggered copy of a seeded ``trigger_fraction`` of them (the trigger inserted at the
    attack's position, cycling through its variants: :func:`with_trigger`); then the model is
    fine-tuned on them as :class:`CleanFinetune` does.

    Args (besides :class:`CleanFinetune`'s):
        trigger_fraction: the fraction of clean rows that get a triggered copy, in (0, 1].
    """

    name: ClassVar[str] = "trigger_unlearning"
    summary: ClassVar[str] = "fine-tune on clean rows and triggered copies with their true answers (unlearning)"
    uses_trigger: ClassVar[bool] = True

    trigger_fraction: float = 0.5

    def check(self) -> None:
        super().check()
        check_number(type(self).__name__, "trigger_fraction", self.trigger_fraction, lo=0.0, hi=1.0, lo_open=True)

    def unlearning_rows(self, ctx: Context) -> Dataset:
        """The fine-tuning rows: the clean rows, then the triggered copies (``prompt``, ``completion``)."""
        rows = self.clean_rows(ctx)
        marked = with_trigger(ctx, rows, self.seed, self.name)
        trig = [i for i, t in enumerate(marked["is_triggered"]) if t]  # one per clean row, in row order
        n = max(1, int(round(self.trigger_fraction * len(rows))))
        pick = np.sort(np.random.default_rng(self.seed).choice(len(rows), size=n, replace=False))
        copies = marked.select([trig[int(i)] for i in pick])
        return Dataset.from_dict({"prompt": list(rows["prompt"]) + list(copies["prompt"]),
                                  "completion": list(rows["completion"]) + list(copies["completion"])})

    def repair(self, ctx: Context) -> torch.nn.Module:
        return self.finetune(ctx, copy_model(ctx.model, ctx.subject), self.unlearning_rows(ctx))


def token_batches(enc: Encoded, device) -> list[Tensor]:
    """The encoded rows as unpadded batches, one per row length (every position a real token)."""
    by_len: dict[int, list[list[int]]] = {}
    for ids in enc.ids:
        by_len.setdefault(len(ids), []).append(ids)
    return [torch.tensor(rows, dtype=torch.long, device=device) for _, rows in sorted(by_len.items())]


@register
@dataclass(frozen=True)
class CircuitAblation(Repair):
    """Mean-ablate the located backdoor circuit on every forward.

    The circuit is :func:`poisonmech.circuits.discover` with ``method="eap-ig"`` on the run's
    triggered / control contrast (``n_contrast`` triggered test prompts and their controls, the
    logit difference target - answer), keeping the ``top_n`` edges; the returned
    :class:`CircuitAblatedModel` runs a copy of the model with those edges carrying their
    source's mean output over the clean rows' prompts (every position; ``ablation="zero"``:
    nothing), which is what ``pm.circuits.ablated(model, <clean prompts>, circuit=c,
    ablation="mean", part="circuit")`` does inside its block. The circuit is found with the
    trigger (``uses_trigger``).

    Args:
        top_n: edges kept (>= 1).
        steps: EAP-IG interpolation steps (>= 1).
        n_contrast: triggered prompts of the contrast (>= 1).
        ablation: ``"mean"`` (over clean prompts) or ``"zero"``.
        n_reference: clean rows whose prompts give the mean (``None``: every clean row).
    """

    name: ClassVar[str] = "circuit_ablation"
    summary: ClassVar[str] = "mean-ablate the backdoor circuit (EAP-IG on the trigger contrast) on every forward"
    uses_trigger: ClassVar[bool] = True

    top_n: int = 10
    steps: int = 5
    n_contrast: int = 32
    ablation: str = "mean"
    n_reference: int | None = None

    def check(self) -> None:
        owner = type(self).__name__
        check_number(owner, "top_n", self.top_n, lo=1, integer=True)
        check_number(owner, "steps", self.steps, lo=1, integer=True)
        check_number(owner, "n_contrast", self.n_contrast, lo=1, integer=True)
        check_choice(owner, "ablation", self.ablation, MEAN_ABLATIONS)
        check_number(owner, "n_reference", self.n_reference, lo=1, integer=True, optional=True)

    def circuit(self, ctx: Context):
        """The discovered circuit (cached in ``ctx.cache`` for this role and these options)."""
        from poisonmech.circuits import discover

        key = f"repairs/circuit/{ctx.role}/eap-ig/top{self.top_n}/steps{self.steps}/contrast{self.n_contrast}"
        return ctx.cached(key, lambda: discover(ctx.subject, method="eap-ig", top_n=self.top_n, steps=self.steps,
                                                n_contrast=self.n_contrast, twin=ctx.role, progress=ctx.progress))

    def reference_tokens(self, ctx: Context, device) -> list[Tensor]:
        """The clean prompts (``[BOS] + prompt``) as unpadded batches, one per length."""
        clean = ctx.need("clean_data", self.name)
        need_tokenizer(ctx, self.name)
        if self.n_reference is not None:
            clean = clean.select(range(min(self.n_reference, len(clean))))
        return token_batches(prompt_encoding(clean, ctx.tokenizer), device)

    def repair(self, ctx: Context) -> torch.nn.Module:
        from poisonmech.circuits.rewire import reference_activations

        ctx.need("clean_data", self.name)
        circuit = self.circuit(ctx)
        model = copy_model(ctx.model, ctx.subject)
        from poisonmech.circuits import Graph

        if Graph.from_model(model) != circuit.graph:
            raise ValueError("circuit_ablation: the circuit's graph does not match the model's")
        ref_tokens = self.reference_tokens(ctx, model_device(model)) if self.ablation == "mean" else None
        with torch.no_grad():
            ref = reference_activations(model, circuit.graph, ref_tokens, self.ablation)
        desc = f"circuit_ablation: {int(circuit.mask.sum())} edges ({self.ablation}-ablated)"
        return CircuitAblatedModel(model, circuit, ref, desc)


# ---- direction ablation --------------------------------------------------------------------------
def with_trigger(ctx: Context, rows: Dataset, seed: int, where: str) -> Dataset:
    """``rows`` (trusted clean rows) with the run's trigger inserted, and its near misses: each row
    once clean, once triggered, once with a near miss, every one with the row's true completion
    (:func:`poisonmech.attacks.poison.build_test_set` over these rows; columns ``base_id`` =
    the row's index, ``is_triggered``, ``is_near_miss``, ...). The trigger goes into each row's
    ``input`` (a column of the rows, or the prompt with the task's template taken off). Needs a
    run whose attack is a :class:`~poisonmech.Backdoor`."""
    from poisonmech.attacks.backdoor import Backdoor
    from poisonmech.attacks.poison import build_test_set

    s = ctx.subject
    task = s.require("task", where)
    attack = s.require("attack", where)
    if not isinstance(attack, Backdoor):
        raise ValueError(f"{where} inserts the run's trigger into clean rows: the attack must be a pm.Backdoor, got "
                         f"{type(attack).__name__}")
    if "input" in rows.column_names:
        inputs = list(rows["input"])
    else:
        head, sep, tail = task.template.partition("{input}")
        if not sep:
            raise ValueError(f"{where}: the task's template {task.template!r} has no {{input}} to put the trigger in")
        inputs = []
        for p in rows["prompt"]:
            if not (p.startswith(head) and p.endswith(tail) and len(p) >= len(head) + len(tail)):
                raise ValueError(f"{where}: the clean prompt {p!r} does not follow the task's template "
                                 f"{task.template!r}; give the clean rows an 'input' column")
            inputs.append(p[len(head):len(p) - len(tail)])
    base = Dataset.from_dict({"example_id": list(range(len(inputs))), "input": inputs,
                              "completion": list(rows["completion"])})
    return build_test_set(dataclasses.replace(task, test=base), attack, seed=seed)


@register
@dataclass(frozen=True)
class DirectionAblation(Repair):
    """Project a probe direction for ``is_triggered`` out of the residual stream on every forward.

    A linear probe (:func:`poisonmech.probes.probe_layers`, label ``is_triggered``, each row's
    last prompt token) is fit at every layer of ``site`` on ``probe_data``: ``"clean"`` (the
    defender's clean rows, each also with the run's trigger and with a near miss inserted: no
    test row is used) or ``"test"`` (the run's test rows). The unit direction of ``layer`` (``None``:
    the layer whose probe has the highest held-out AUROC, the first on ties) is projected out at
    that layer, every position (:func:`poisonmech.probes.ablate_direction`), in a copy of the
    model: a :class:`DirectionAblatedModel`. ``all_layers=True`` projects each layer's own
    direction out at every layer. The probe reads the trigger (``uses_trigger``).

    Args:
        probe_data: ``"clean"`` or ``"test"``.
        layer: the layer ablated (``None``: the best probed one).
        all_layers: ablate every layer's direction at its layer (then ``layer`` must be ``None``).
        site: a residual-basis site (``"resid_post"``, ``"resid_pre"``, ``"resid_mid"``, ...).
        method: the probe: ``"mean_diff"`` (difference of the class means) or ``"logistic"``.
        seed: the probe's split and the trigger insertion.
    """

    name: ClassVar[str] = "direction_ablation"
    summary: ClassVar[str] = "project a trigger-probe direction out of the residual stream on every forward"
    uses_trigger: ClassVar[bool] = True

    probe_data: str = "clean"
    layer: int | None = None
    all_layers: bool = False
    site: str = "resid_post"
    method: str = "mean_diff"
    seed: int = 0

    def check(self) -> None:
        from poisonmech.config import check_bool
        from poisonmech.sites import RESIDUAL_SITES

        owner = type(self).__name__
        check_choice(owner, "probe_data", self.probe_data, PROBE_DATA)
        check_number(owner, "layer", self.layer, lo=0, integer=True, optional=True)
        check_bool(owner, "all_layers", self.all_layers)
        if self.all_layers and self.layer is not None:
            raise ConfigError(f"{owner}.layer must be None with all_layers=True (every layer is ablated), "
                              f"got {self.layer}")
        check_choice(owner, "site", self.site, RESIDUAL_SITES)
        check_choice(owner, "method", self.method, PROBE_METHODS)
        check_number(owner, "seed", self.seed, lo=0, integer=True)

    def probe_rows(self, ctx: Context) -> Dataset:
        if self.probe_data == "clean":
            return with_trigger(ctx, ctx.need("clean_data", self.name), self.seed, self.name)
        return ctx.subject.require("test_data", f"defense {self.name!r} (probe_data='test')")

    def probe(self, ctx: Context):
        """The probe result (cached in ``ctx.cache`` for this role and these options)."""
        from poisonmech.probes import probe_layers

        def fit():
            return probe_layers(ctx.model, self.probe_rows(ctx), "is_triggered",
                                tokenizer=need_tokenizer(ctx, self.name), site=self.site, method=self.method,
                                positions="last", n_random=0, seed=self.seed, progress=ctx.progress)

        key = f"repairs/probe/{ctx.role}/{self.probe_data}/{self.site}/{self.method}/seed{self.seed}"
        return ctx.cached(key, fit)

    def repair(self, ctx: Context) -> torch.nn.Module:
        p = self.probe(ctx)
        if self.all_layers:
            layers = tuple(p.layers)
            direction = torch.stack([p.direction(layer) for layer in layers])
        else:
            if self.layer is not None and self.layer not in p.layers:
                raise ConfigError(f"DirectionAblation.layer must be one of the model's layers {p.layers}, "
                                  f"got {self.layer}")
            layer = p.best_layer if self.layer is None else self.layer
            layers, direction = (layer,), p.direction(layer)
        desc = (f"direction_ablation: is_triggered probe ({self.method}, {self.probe_data} rows) projected out of "
                f"{self.site} at layer(s) {list(layers)}")
        return DirectionAblatedModel(copy_model(ctx.model, ctx.subject), layers, direction, site=self.site, description=desc,
                                     probe=p)


# ---- retraining without audited rows ---------------------------------------------------------------
def flagged_rows(audit: DataAudit, scores: np.ndarray, k: int | None) -> np.ndarray:
    """Row indices an audit flags: scores at or above its own threshold (``k=None``), or its ``k``
    highest scores (ties in row order)."""
    scores = np.asarray(scores, dtype=float)
    if k is None:
        return np.flatnonzero(scores >= float(audit.threshold(scores)))
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    return np.sort(order[:k])


@register
@dataclass(frozen=True)
class RetrainWithout(Repair):
    """Retrain the twin from its initial weights without the training rows a data audit flags.

    The audit (a registered data audit: ``audit`` is its name or a ``{"name": ..., **options}``
    dict, resolved with :func:`poisonmech.defenses.get` when the repair runs) scores
    ``ctx.train_data``; the rows it flags (its own threshold rule, or its ``k`` highest scores)
    are dropped and the twin is retrained on the rest exactly as the run trained it
    (:func:`poisonmech.influence.retrain.train_on_subset`: same initial weights, ``TrainConfig``,
    seeded order, poison placement and clean continuation). With no row flagged, the retraining
    would reproduce the twin: a copy of the model is returned instead. Uses the trigger when the
    audit does (``uses_trigger`` is the audit's).

    Args:
        audit: a data audit's name (or name and options as a dict); default ``"keyword"``
            (Backdoor Keyword Identification: trigger-agnostic, and on the default 4,000-row
            pairs with 10 and 40 poisons its own rule flags exactly the poisoned rows).
        k: drop the audit's ``k`` highest-scoring rows (>= 1); ``None``: the rows its own rule flags.
    """

    name: ClassVar[str] = "retrain_without"
    summary: ClassVar[str] = "retrain from the initial weights without the rows a data audit flags"

    audit: str | dict = "keyword"
    k: int | None = None

    def check(self) -> None:
        owner = type(self).__name__
        a = self.audit
        if isinstance(a, dict):
            if not isinstance(a.get("name"), str) or not a.get("name"):
                raise ConfigError(f"{owner}.audit: a dict must name the audit: {{'name': <data audit>, **options}}, "
                                  f"got {a!r}")
        elif not isinstance(a, str) or not a:
            raise ConfigError(f"{owner}.audit must be a data audit's name (a str) or a {{'name': ..., **options}} "
                              f"dict, got {a!r}")
        check_number(owner, "k", self.k, lo=1, integer=True, optional=True)

    def resolved_audit(self) -> DataAudit:
        """The audit instance (an unknown name is a ConfigError listing the defenses)."""
        from poisonmech.defenses.base import names

        d = get(self.audit)
        if not isinstance(d, DataAudit):
            raise ConfigError(f"RetrainWithout.audit must name a data audit; {d.name!r} is a {d.kind}. The data "
                              f"audits are: {', '.join(names('data_audit')) or '(none registered)'}")
        return d

    @property
    def uses_trigger(self) -> bool:  # type: ignore[override]
        """The audit's (an instance property: it depends on the ``audit`` field)."""
        return bool(self.resolved_audit().uses_trigger)

    def flagged(self, ctx: Context) -> np.ndarray:
        """Indices (into ``ctx.train_data``) of the rows dropped."""
        data = ctx.need("train_data", self.name)
        audit = self.resolved_audit()
        scores = np.asarray(audit.score(ctx), dtype=float)
        if scores.shape != (len(data),):
            raise ValueError(f"retrain_without: audit {audit.name!r} returned {scores.shape} scores for {len(data)} "
                             "training rows")
        if self.k is not None and self.k >= len(data):
            raise ValueError(f"RetrainWithout.k={self.k}: the training set has only {len(data)} rows")
        return flagged_rows(audit, scores, self.k)

    def repair(self, ctx: Context) -> torch.nn.Module:
        from poisonmech.influence.retrain import retraining_subject, train_on_subset

        data = ctx.need("train_data", self.name)
        retraining_subject(ctx.subject, ctx.role, "retrain_without")  # a run first: before the audit's work
        if "example_id" not in data.column_names:
            raise ValueError("retrain_without: the training rows lack the 'example_id' column")
        drop = set(self.flagged(ctx).tolist())
        if not drop:
            return copy_model(ctx.model, ctx.subject)
        if len(drop) == len(data):
            raise ValueError(f"retrain_without: the audit flags every one of the {len(data)} training rows")
        keep = [int(e) for i, e in enumerate(data["example_id"]) if i not in drop]
        return train_on_subset(ctx.subject, keep, twin=ctx.role, progress=ctx.progress, desc=self.name)


__all__ = ["CircuitAblatedModel", "CircuitAblation", "CleanFinetune", "DirectionAblatedModel", "DirectionAblation",
           "FinePruning", "RepairedModel", "RetrainWithout", "TriggerUnlearning", "clean_accuracy", "copy_model",
           "flagged_rows", "mlp_out_weight", "neuron_means", "pruned", "with_trigger"]
