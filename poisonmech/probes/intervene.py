"""Causal checks of a probe direction: ablate it or steer along it, and measure the behaviour.

``ablate_direction`` and ``steer`` are context managers that attach hooks with
``model.hooks(...)``; the hooks come off on exit, also when the body raises. ``causal_check``
runs ``pm.evaluate`` (clean accuracy, ASR, false triggers, ...) without and with the
intervention, so a probe direction can be tested for whether the model *uses* it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from jaxtyping import Float
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.config import takes_config
from poisonmech.metrics import evaluate
from poisonmech.probes.activations import Site, check_site_layers, hook_name
from poisonmech.probes.config import CausalCheckConfig
from poisonmech.probes.result import num, read_probe_file
from poisonmech.results import Result
from poisonmech.subject import resolve
from poisonmech.tasks.base import Task

Tensor = torch.Tensor


def _unit_directions(model: torch.nn.Module, layers: tuple[int, ...], direction) -> list[Tensor]:
    d = torch.as_tensor(np.asarray(direction.detach().cpu() if isinstance(direction, Tensor) else direction),
                         dtype=torch.float32)
    d_model = int(model.cfg.d_model)
    if d.ndim == 1:
        d = d[None].expand(len(layers), -1)
    if d.ndim != 2 or d.shape != (len(layers), d_model):
        raise ValueError(f"direction: expected shape ({d_model},) or ({len(layers)}, {d_model}) for layers "
                         f"{layers}, got {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("direction contains NaN or inf")
    norm = d.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ValueError("direction has zero norm")
    return list(d / norm)


def _layers(model: torch.nn.Module, site: str, layer: int | Sequence[int]) -> tuple[int, ...]:
    if layer is None:
        raise ValueError("layer: give a layer number (or a list of them)")
    return check_site_layers(model, site, layer)


def _edit_hooks(model: torch.nn.Module, site: str, layers: tuple[int, ...], edits: Sequence[Callable[[Tensor], Tensor]]
                ) -> list[tuple[str, Callable]]:
    """Hooks that replace the activation ``x`` of ``site`` at each layer by ``edits[i](x)``.

    On a TransformerBridge, ``hook_resid_mid`` is an alias of the MLP norm's input
    (``ln2.hook_in``): a value written there reaches the MLP but not the residual stream's skip
    connection, so the block's output would still carry the unedited ``resid_mid``. For that
    site the edit is also added to the block's output (``resid_post += edit(x) - x``): the
    residual stream itself is edited, as the site's name says, and the MLP reads the edited one.
    """
    pairs = []
    hooks = model.hook_dict
    for layer, edit in zip(layers, edits):
        name = hook_name(site, layer)
        alias = site == "resid_mid" and hooks.get(name) is hooks.get(f"blocks.{layer}.ln2.hook_in")
        if not alias:
            pairs.append((name, lambda x, hook, edit=edit: edit(x)))  # noqa: ARG005
            continue
        state: dict[str, Tensor] = {}

        def at_mid(x: Tensor, hook, edit=edit, state=state) -> Tensor:  # noqa: ARG001
            out = edit(x)
            state["delta"] = out - x
            return out

        def at_post(x: Tensor, hook, state=state) -> Tensor:  # noqa: ARG001
            return x + state.pop("delta")

        pairs += [(name, at_mid), (hook_name("resid_post", layer), at_post)]
    return pairs


@contextmanager
def ablate_direction(subject, layer: int | Sequence[int],
                     direction: Float[Tensor, " d_model"] | Float[Tensor, "layer d_model"], *,
                     site: Site = "resid_post", value: float = 0.0, twin: str | None = None
                     ) -> Iterator[torch.nn.Module]:
    """Inside the block, remove ``direction`` from ``site`` at ``layer`` (every position) of the
    subject's model (``twin``, default: its default role; see :func:`poisonmech.resolve`).

    Each activation ``x`` becomes ``x - (x·d - value) d`` with ``d`` the unit direction: its
    component along ``d`` is set to ``value`` (0: projected out; a class mean: mean-ablation).
    ``layer`` may be a list (one direction for all, or one per layer: ``(layer, d_model)``).
    At ``site="resid_mid"`` the residual stream between attention and MLP is edited: what the
    MLP reads and what the block passes on (a bridge's ``hook_resid_mid`` alone reaches only
    the MLP). Parallel-residual models (GPT-NeoX) have no ``resid_mid``: a ``ValueError``.
    Hooks are removed on exit, also when the body raises. Yields the model.
    """
    model = resolve(subject, where="ablate_direction").model(twin)
    layers = _layers(model, site, layer)
    dirs = _unit_directions(model, layers, direction)

    def make(d: Tensor):
        def edit(x: Tensor) -> Tensor:
            u = d.to(device=x.device, dtype=x.dtype)
            return x - ((x @ u) - value)[..., None] * u
        return edit

    with model.hooks(fwd_hooks=_edit_hooks(model, site, layers, [make(d) for d in dirs])):
        yield model


@contextmanager
def steer(subject, layer: int | Sequence[int],
          direction: Float[Tensor, " d_model"] | Float[Tensor, "layer d_model"], alpha: float, *,
          site: Site = "resid_post", twin: str | None = None) -> Iterator[torch.nn.Module]:
    """Inside the block, add ``alpha`` times the unit ``direction`` to ``site`` at ``layer`` (every
    position) of the subject's model (``twin``, default: its default role). Yields the model.

    ``alpha`` is in activation units (compare it with the projections of real activations,
    e.g. a probe's class means). ``resid_mid`` as in :func:`ablate_direction`. Hooks are removed
    on exit, also when the body raises.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    model = resolve(subject, where="steer").model(twin)
    layers = _layers(model, site, layer)
    dirs = _unit_directions(model, layers, direction)

    def make(d: Tensor):
        def edit(x: Tensor) -> Tensor:
            return x + alpha * d.to(device=x.device, dtype=x.dtype)
        return edit

    with model.hooks(fwd_hooks=_edit_hooks(model, site, layers, [make(d) for d in dirs])):
        yield model


METRICS = ("clean_acc", "asr", "false_trigger_rate", "triggered_acc", "target_logprob")


@dataclass(frozen=True)
class CausalCheck(Result):
    """Behaviour of a model without (``before``) and with (``after``) an intervention.

    ``settings`` names each intervention (``"ablate"``, ``"steer alpha=4"``, ...), with
    ``after[i]`` its metrics from ``pm.evaluate``.
    """

    before: dict[str, float]
    after: tuple[dict[str, float], ...]
    settings: tuple[str, ...]
    layers: tuple[int, ...]
    site: str

    kind: ClassVar[str] = "probes.causal_check"
    version: ClassVar[int] = 1

    def __repr__(self) -> str:
        shown = [m for m in ("asr", "clean_acc", "false_trigger_rate") if m in self.before]
        lines = [f"CausalCheck at {self.site}, layers {list(self.layers)}: {len(self.settings)} setting(s)"]
        for s, a in list(zip(self.settings, self.after))[:5]:
            lines.append(f"  {s}: " + ", ".join(f"{m} {num(float(self.before[m]))} -> {num(float(a.get(m, np.nan)))}"
                                               for m in shown))
        if len(self.settings) > 5:
            lines.append(f"  ... {len(self.settings) - 5} more (see .to_frame())")
        return "\n".join(lines)

    def to_frame(self, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
        """One row per (setting, metric): before, after and their difference."""
        rows = []
        for s, a in zip(self.settings, self.after):
            for m in metrics:
                if m in self.before and m in a:
                    rows.append({"setting": s, "site": self.site, "layers": ",".join(map(str, self.layers)),
                                 "metric": m, "before": float(self.before[m]), "after": float(a[m]),
                                 "delta": float(a[m]) - float(self.before[m])})
        return pd.DataFrame(rows)

    def plot(self, metrics: Sequence[str] = ("clean_acc", "asr", "false_trigger_rate"), title: str | None = None):
        """Grouped bars: each metric before and under each intervention."""
        import plotly.graph_objects as go

        fig = go.Figure()
        ms = [m for m in metrics if m in self.before]
        fig.add_trace(go.Bar(name="no intervention", x=ms, y=[self.before[m] for m in ms]))
        for s, a in zip(self.settings, self.after):
            fig.add_trace(go.Bar(name=s, x=ms, y=[a.get(m, float("nan")) for m in ms]))
        fig.update_layout(barmode="group", template="plotly_white", yaxis_title="rate",
                          title=title or f"causal check at {self.site}, layers {list(self.layers)}")
        return fig

    def save(self, path: str | Path) -> Path:
        """Write a JSON file (the check holds no tensors); atomic."""
        return self._write(path, {"before": self.before, "after": list(self.after), "settings": list(self.settings),
                                  "layers": list(self.layers), "site": self.site})

    @classmethod
    def load(cls, path: str | Path) -> CausalCheck:
        """Read a file written by :meth:`save` (another kind of file is an error)."""
        _, m = read_probe_file(cls, path)
        return cls(before=m["before"], after=tuple(m["after"]), settings=tuple(m["settings"]),
                   layers=tuple(m["layers"]), site=m["site"])


def _numeric(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float, np.floating, np.integer))}


@takes_config(CausalCheckConfig)
def causal_check(subject, layer: int | Sequence[int] | Task,
                 direction: Float[Tensor, " d_model"] | Float[Tensor, "layer d_model"] | Backdoor, *legacy,
                 twin: str | None = None, task: Task | None = None, attack: Backdoor | None = None,
                 test_data: Dataset | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 config: CausalCheckConfig) -> CausalCheck:
    """``pm.evaluate`` of the subject's model without and with a direction ablated (or steered along).

    Args:
        subject: a run (``Pair``, pipeline stage, run directory, ...) whose task, attack, test
            rows and tokenizer are used, or a bare model with ``task`` and ``attack`` (and
            optionally ``test_data`` / ``tokenizer``, as for ``pm.evaluate``).
        layer, direction: where and what (e.g. ``probe.best_layer``, ``probe.direction()``);
            ``layer`` may be a list, ``direction`` one per layer (``(layer, d_model)``).
        twin: the role intervened on (default: the subject's default role).
        task, attack, test_data, tokenizer: replace the run's.
        The options are :class:`CausalCheckConfig`'s: ``intervention`` (``"ablate"``: the
        component along the direction set to ``value``; ``"steer"``: add ``alpha`` times the
        unit direction, ``alpha`` may be a list), ``site``, ``value``, ``batch_size``, ``seed``.

    The old form ``causal_check(model, task, attack, layer, direction, ...)`` still works and
    warns (``DeprecationWarning``).

    Returns a ``CausalCheck`` (``.before``, ``.after``, ``.to_frame()``): e.g. whether
    ablating the trigger probe's direction brings the ASR down and keeps clean accuracy.
    """
    if isinstance(layer, Task):  # the old order: (model, task, attack, layer, direction)
        if len(legacy) != 2:
            raise TypeError("causal_check(model, task, attack, layer, direction): the old form needs all five "
                            "arguments; the new form is causal_check(subject, layer, direction, task=..., attack=...)")
        warnings.warn("causal_check(model, task, attack, layer, direction) is deprecated: use "
                      "causal_check(subject, layer, direction) (task, attack, test rows and tokenizer come from a "
                      "run, or task=/attack= with a bare model)", DeprecationWarning, stacklevel=3)
        task, attack, (layer, direction) = layer, direction, legacy
    elif legacy:
        raise TypeError(f"causal_check(subject, layer, direction, ...): {len(legacy)} extra positional argument(s); "
                        "pass the options as keywords")
    s = resolve(subject, test=test_data, tokenizer=tokenizer, where="causal_check")
    model = s.model(twin)
    task = task if task is not None else s.require("task", "causal_check", "task")
    attack = attack if attack is not None else s.require("attack", "causal_check", "attack")
    cfg = config
    kw = {"test_data": s.test_data, "tokenizer": s.tokenizer, "batch_size": cfg.batch_size, "seed": cfg.seed}
    layers = _layers(model, cfg.site, layer)
    _unit_directions(model, layers, direction)  # validate before the (slow) baseline evaluation
    before = _numeric(evaluate(model, task, attack, **kw))
    after, settings = [], []
    if cfg.intervention == "ablate":
        with ablate_direction(model, layers, direction, site=cfg.site, value=cfg.value):
            after.append(_numeric(evaluate(model, task, attack, **kw)))
        settings.append("ablate" if cfg.value == 0 else f"ablate to {cfg.value:g}")
    else:
        for a in cfg.alphas:
            with steer(model, layers, direction, a, site=cfg.site):
                after.append(_numeric(evaluate(model, task, attack, **kw)))
            settings.append(f"steer alpha={a:g}")
    return CausalCheck(before=before, after=tuple(after), settings=tuple(settings), layers=layers, site=cfg.site)
