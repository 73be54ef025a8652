"""The options of the probes package, one frozen config per family of analyses.

- :class:`ActivationConfig`: which activations are read (``collect_activations``);
- :class:`ProbeConfig` (extends it): ``probe_layers``, ``probe_twins`` and ``probe_transfer``;
- :class:`DetectConfig`: ``detect_poison`` and ``detect_poison_methods``;
- :class:`CausalCheckConfig`: ``causal_check``.

Each analysis takes its config's fields as keywords or ``config=`` (keywords override it); an
unknown field is an error naming the allowed ones, a value out of range names the field and
the range (:mod:`poisonmech.config`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from poisonmech.config import Config, ConfigError, check_choice, check_number
from poisonmech.sites import RESIDUAL_SITES

PROBE_METHODS = ("logistic", "mean_diff")
#: which rows a probe sees: every row, or only triggered and near-miss rows
CONTRASTS = ("untriggered", "near_miss")
DETECTORS = ("spectral", "activation_clustering")
REDUCTIONS = ("ica", "pca")
INTERVENTIONS = ("ablate", "steer")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _ints(owner: str, field: str, value: Any, *, lo: int | None, what: str) -> Any:
    """``value`` as an int or a tuple of ints (lists and arrays become tuples), each >= ``lo``."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if _is_int(value):
        items, out = [value], int(value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
        out = tuple(int(v) if _is_int(v) else v for v in items)
        if not items:
            raise ConfigError(f"{owner}.{field} must be {what}, got an empty sequence")
    else:
        raise ConfigError(f"{owner}.{field} must be {what}, got {value!r}")
    for v in items:
        if not _is_int(v) or (lo is not None and v < lo):
            raise ConfigError(f"{owner}.{field} must be {what}, got {value!r}")
    return out


def _check_bool(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{owner}.{field} must be True or False, got {value!r}")


@dataclass(frozen=True)
class ActivationConfig(Config):
    """Which activations are read.

    Args:
        site: a residual-basis site of :mod:`poisonmech.sites` (``"resid_pre"``,
            ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``, ``"mlp_out"``).
        layers: a layer number or a sequence of them; ``None``: every layer.
        positions: ``"last"`` (each row's last prompt token), ``"all"`` (every absolute
            position up to the longest prompt) or ints (negative ones count from the end of
            each prompt; see :mod:`poisonmech.probes.activations`).
        batch_size: rows per forward pass.
    """

    site: str = "resid_post"
    layers: int | tuple[int, ...] | None = None
    positions: Literal["last", "all"] | int | tuple[int, ...] = "last"
    batch_size: int = 64

    def __post_init__(self) -> None:
        # sequences given as lists are stored as tuples (hashable, and what from_dict rebuilds)
        if self.layers is not None:
            object.__setattr__(self, "layers", _ints(type(self).__name__, "layers", self.layers, lo=0,
                                                     what="a layer number >= 0, a sequence of them, or None (all)"))
        if not isinstance(self.positions, str):
            object.__setattr__(self, "positions", _ints(type(self).__name__, "positions", self.positions, lo=None,
                                                        what="'last', 'all', an int or a non-empty sequence of ints"))
        super().__post_init__()

    def check(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "site", self.site, RESIDUAL_SITES)
        if isinstance(self.positions, str):
            check_choice(owner, "positions", self.positions, ("last", "all"))
        check_number(owner, "batch_size", self.batch_size, lo=1, integer=True)


@dataclass(frozen=True)
class ProbeConfig(ActivationConfig):
    """Options of ``probe_layers``, ``probe_twins`` and ``probe_transfer`` (plus
    :class:`ActivationConfig`'s ``site``, ``layers``, ``positions``, ``batch_size``).

    Args:
        method: ``"logistic"`` (L2, strength ``1/C``) or ``"mean_diff"`` (difference of the
            class means).
        C: inverse L2 strength of the logistic probe, > 0.
        standardize: fit the logistic probe on standardised activations (see ``LinearProbe``).
        test_size: fraction of *examples* held out, in (0, 1) (rows sharing ``group_by``
            stay on one side).
        n_random: random unit directions per cell for the baseline (0: none).
        seed: seeds the split, the random directions and length balancing (nothing global).
        group_by: the column naming each row's example; ``None``: ``base_id`` when present.
        contrast: which rows are probed: ``"untriggered"`` (every row) or ``"near_miss"``
            (triggered and near-miss rows only, which have the same length).
        balance_length: subsample each side of the split so that both classes have the same
            prompt-length distribution.
    """

    method: str = "logistic"
    C: float = 1.0
    standardize: bool = False
    test_size: float = 0.3
    n_random: int = 100
    seed: int = 0
    group_by: str | None = None
    contrast: str = "untriggered"
    balance_length: bool = False

    def check(self) -> None:
        super().check()
        owner = type(self).__name__
        check_choice(owner, "method", self.method, PROBE_METHODS)
        check_number(owner, "C", self.C, lo=0, lo_open=True)
        _check_bool(owner, "standardize", self.standardize)
        check_number(owner, "test_size", self.test_size, lo=0, hi=1, lo_open=True, hi_open=True)
        check_number(owner, "n_random", self.n_random, lo=0, integer=True)
        check_number(owner, "seed", self.seed, lo=0, integer=True)
        if self.group_by is not None and not isinstance(self.group_by, str):
            raise ConfigError(f"{owner}.group_by must be a column name or None, got {self.group_by!r}")
        check_choice(owner, "contrast", self.contrast, CONTRASTS)
        _check_bool(owner, "balance_length", self.balance_length)


@dataclass(frozen=True)
class DetectConfig(Config):
    """Options of ``detect_poison`` and ``detect_poison_methods``.

    Args:
        method: ``"spectral"`` (Tran et al. 2018) or ``"activation_clustering"`` (Chen et
            al. 2018); ``detect_poison_methods`` runs its ``methods`` argument instead.
        layer: the layer read; ``None``: the last.
        site: a residual-basis site of :mod:`poisonmech.sites`.
        position: ``"last"`` prompt token, ``"mean"`` over the prompt's tokens, or an
            absolute position (int >= 0).
        by: the column defining the classes (default ``"completion"``); ``None``: one class.
        n_components, reduce: activation clustering's reduction (``"ica"`` or ``"pca"`` to
            ``n_components`` dims).
        batch_size: rows per forward pass (the loss baseline uses at least 256).
        seed: seeds ICA / PCA and 2-means.
    """

    method: str = "spectral"
    layer: int | None = None
    site: str = "resid_post"
    position: str | int = "last"
    by: str | None = "completion"
    n_components: int = 10
    reduce: str = "ica"
    batch_size: int = 128
    seed: int = 0

    def check(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "method", self.method, DETECTORS)
        check_number(owner, "layer", self.layer, lo=0, integer=True, optional=True)
        check_choice(owner, "site", self.site, RESIDUAL_SITES)
        if isinstance(self.position, str):
            check_choice(owner, "position", self.position, ("last", "mean"))
        elif not _is_int(self.position):
            raise ConfigError(f"{owner}.position must be 'last', 'mean' or an int, got {self.position!r}")
        if self.by is not None and not isinstance(self.by, str):
            raise ConfigError(f"{owner}.by must be a column name or None, got {self.by!r}")
        check_number(owner, "n_components", self.n_components, lo=1, integer=True)
        check_choice(owner, "reduce", self.reduce, REDUCTIONS)
        check_number(owner, "batch_size", self.batch_size, lo=1, integer=True)
        check_number(owner, "seed", self.seed, lo=0, integer=True)


@dataclass(frozen=True)
class CausalCheckConfig(Config):
    """Options of ``causal_check``.

    Args:
        intervention: ``"ablate"`` (the component along the direction set to ``value``) or
            ``"steer"`` (add ``alpha`` times the unit direction).
        alpha: the steering strength in activation units, or several (one setting each).
        site: a residual-basis site of :mod:`poisonmech.sites`.
        value: what ablation sets the component to (0: projected out; a class mean:
            mean-ablation).
        batch_size, seed: ``pm.evaluate``'s.
    """

    intervention: str = "ablate"
    alpha: float | tuple[float, ...] = 0.0
    site: str = "resid_post"
    value: float = 0.0
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.alpha, Sequence) and not isinstance(self.alpha, str):
            object.__setattr__(self, "alpha", tuple(self.alpha))
        super().__post_init__()

    def check(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "intervention", self.intervention, INTERVENTIONS)
        alphas = self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)
        if not alphas or any(isinstance(a, bool) or not isinstance(a, (int, float, np.number)) or not math.isfinite(a)
                             for a in alphas):
            raise ConfigError(f"{owner}.alpha must be a finite number or a non-empty sequence of them, "
                              f"got {self.alpha!r}")
        check_choice(owner, "site", self.site, RESIDUAL_SITES)
        check_number(owner, "value", self.value)
        check_number(owner, "batch_size", self.batch_size, lo=1, integer=True)
        check_number(owner, "seed", self.seed, lo=0, integer=True)

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(float(a) for a in (self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)))


__all__ = ["CONTRASTS", "DETECTORS", "PROBE_METHODS", "ActivationConfig", "CausalCheckConfig", "DetectConfig",
           "ProbeConfig"]
