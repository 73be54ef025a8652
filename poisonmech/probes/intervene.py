"""Causal checks of a probe direction: ablate it or steer along it, and measure the behaviour.

``ablate_direction`` and ``steer`` are context managers that attach hooks with
``model.hooks(...)``; the hooks come off on exit, also when the body raises. ``causal_check``
runs ``pm.evaluate`` (clean accuracy, ASR, false triggers, ...) without and with the
intervention, so a probe direction can be tested for whether the model *uses* it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from jaxtyping import Float
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.metrics import evaluate
from poisonmech.probes.activations import Site, check_site_layers, hook_name
from poisonmech.probes.result import FORMAT, num
from poisonmech.storage import read_json, write_json
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


@contextmanager
def ablate_direction(model: torch.nn.Module, layer: int | Sequence[int],
                     direction: Float[Tensor, " d_model"] | Float[Tensor, "layer d_model"], *,
                     site: Site = "resid_post", value: float = 0.0) -> Iterator[torch.nn.Module]:
    """Inside the block, remove ``direction`` from ``site`` at ``layer`` (every position).

    Each activation ``x`` becomes ``x - (x·d - value) d`` with ``d`` the unit direction: its
    component along ``d`` is set to ``value`` (0: projected out; a class mean: mean-ablation).
    ``layer`` may be a list (one direction for all, or one per layer: ``(layer, d_model)``).
    Hooks are removed on exit, also when the body raises. Yields the model.
    """
    layers = _layers(model, site, layer)
    dirs = _unit_directions(model, layers, direction)

    def make(d: Tensor):
        def hook(x: Tensor, hook) -> Tensor:  # noqa: ARG001
            u = d.to(device=x.device, dtype=x.dtype)
            return x - ((x @ u) - value)[..., None] * u
        return hook

    with model.hooks(fwd_hooks=[(hook_name(site, lay), make(d)) for lay, d in zip(layers, dirs)]):
        yield model


@contextmanager
def steer(model: torch.nn.Module, layer: int | Sequence[int],
          direction: Float[Tensor, " d_model"] | Float[Tensor, "layer d_model"], alpha: float, *,
          site: Site = "resid_post") -> Iterator[torch.nn.Module]:
    """Inside the block, add ``alpha`` times the unit ``direction`` to ``site`` at ``layer`` (every position).

    ``alpha`` is in activation units (compare it with the projections of real activations,
    e.g. a probe's class means). Hooks are removed on exit, also when the body raises.
    """
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    layers = _layers(model, site, layer)
    dirs = _unit_directions(model, layers, direction)

    def make(d: Tensor):
        def hook(x: Tensor, hook) -> Tensor:  # noqa: ARG001
            return x + alpha * d.to(device=x.device, dtype=x.dtype)
        return hook

    with model.hooks(fwd_hooks=[(hook_name(site, lay), make(d)) for lay, d in zip(layers, dirs)]):
        yield model


METRICS = ("clean_acc", "asr", "false_trigger_rate", "triggered_acc", "target_logprob")


@dataclass(frozen=True)
class CausalCheck:
    """Behaviour of a model without (``before``) and with (``after``) an intervention.

    ``settings`` names each intervention (``"ablate"``, ``"steer alpha=4"``, ...), with
    ``after[i]`` its metrics from ``pm.evaluate``.
    """

    before: dict[str, float]
    after: tuple[dict[str, float], ...]
    settings: tuple[str, ...]
    layers: tuple[int, ...]
    site: str

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

    def save(self, path: str | Path) -> None:
        """Write a JSON file (the check holds no tensors); atomic."""
        write_json(Path(path), {"format": FORMAT, "kind": "CausalCheck", "before": self.before,
                                "after": list(self.after), "settings": list(self.settings),
                                "layers": list(self.layers), "site": self.site})

    @classmethod
    def load(cls, path: str | Path) -> CausalCheck:
        m = read_json(Path(path))
        if m.get("format") != FORMAT or m.get("kind") != "CausalCheck":
            raise ValueError(f"{path} does not hold a CausalCheck (format {m.get('format')!r})")
        return cls(before=m["before"], after=tuple(m["after"]), settings=tuple(m["settings"]),
                   layers=tuple(m["layers"]), site=m["site"])


def _numeric(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float, np.floating, np.integer))}


def causal_check(model: torch.nn.Module, task: Task, attack: Backdoor, layer: int | Sequence[int],
                 direction: Float[Tensor, " d_model"] | Float[Tensor, "layer d_model"], *,
                 intervention: Literal["ablate", "steer"] = "ablate", alpha: float | Sequence[float] = 0.0,
                 site: Site = "resid_post", value: float = 0.0, test_data: Dataset | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 256,
                 seed: int = 0) -> CausalCheck:
    """``pm.evaluate`` of ``model`` without and with a direction ablated (or steered along).

    Args:
        model, task, attack, test_data, tokenizer: as for ``pm.evaluate`` (pass
            ``test_data=pair.test_data, tokenizer=pair.tokenizer`` for a pair).
        layer, direction, site: where and what (e.g. ``probe.best_layer``,
            ``probe.direction()``).
        intervention: ``"ablate"`` (component along the direction set to ``value``) or
            ``"steer"`` (add ``alpha`` times the unit direction; ``alpha`` may be a list).

    Returns a ``CausalCheck`` (``.before``, ``.after``, ``.to_frame()``): e.g. whether
    ablating the trigger probe's direction brings the ASR down and keeps clean accuracy.
    """
    if intervention not in ("ablate", "steer"):
        raise ValueError(f"intervention must be 'ablate' or 'steer', got {intervention!r}")
    kw = {"test_data": test_data, "tokenizer": tokenizer, "batch_size": batch_size, "seed": seed}
    layers = _layers(model, site, layer)
    _unit_directions(model, layers, direction)  # validate before the (slow) baseline evaluation
    before = _numeric(evaluate(model, task, attack, **kw))
    after, settings = [], []
    if intervention == "ablate":
        with ablate_direction(model, layers, direction, site=site, value=value):
            after.append(_numeric(evaluate(model, task, attack, **kw)))
        settings.append("ablate" if value == 0 else f"ablate to {value:g}")
    else:
        for a in ([alpha] if isinstance(alpha, (int, float)) else list(alpha)):
            with steer(model, layers, direction, float(a), site=site):
                after.append(_numeric(evaluate(model, task, attack, **kw)))
            settings.append(f"steer alpha={float(a):g}")
    return CausalCheck(before=before, after=tuple(after), settings=tuple(settings), layers=layers, site=site)
