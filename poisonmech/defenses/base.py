"""The defense protocol: one shape for data audits, input filters, model audits and repairs.

Every defense is a small frozen config class (its fields are its options, validated like every
poisonmech config) with a registered ``name`` and a ``kind``:

- ``"data_audit"``  (:class:`DataAudit`): scores every training row; ground truth ``is_poison``.
  ``score(ctx)`` -> one score per row of ``ctx.train_data`` (higher = more suspicious);
  ``threshold(scores)`` -> its own flagging rule (rows scoring >= it are flagged).
- ``"input_filter"`` (:class:`InputFilter`): scores every test input; ground truth ``is_triggered``.
  ``score(ctx, inputs)`` -> one score per input (higher = more likely triggered);
  ``calibrate(ctx, scores_on_clean)`` -> a threshold from trusted clean inputs only (by default
  the ``1 - frr`` quantile: a false-rejection rate ``frr`` on clean inputs, STRIP's rule);
  ``sanitize(ctx, inputs, threshold)`` -> the inputs as the model then sees them (ONION drops
  words), or ``None`` for a filter that only rejects.
- ``"model_audit"`` (:class:`ModelAudit`): scores a whole model (higher = more likely
  backdoored); ground truth = which twin it is. ``score_model(ctx)`` -> a float.
- ``"repair"`` (:class:`Repair`): ``repair(ctx)`` -> a repaired model (a new module; the
  subject's model is never modified).

A defense sees a :class:`Context`: the resolved subject, the role of the model under test, the
trusted clean rows a defender is assumed to hold, an optional reference language model, and a
cache shared by the defenses of one benchmark (activations, losses, a discovered circuit).
Defenses that read the trigger (influence scores against triggered queries, circuits found on
triggered-vs-control contrasts, probes trained on ``is_triggered``) say so with
``uses_trigger = True``; the benchmark table reports it beside every number.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset

from poisonmech.config import Config, ConfigError, check_number

#: the kinds of defense, in table order
KINDS = ("data_audit", "input_filter", "model_audit", "repair")

#: name -> defense class (filled by :func:`register`)
DEFENSES: dict[str, type[Defense]] = {}


@dataclass
class Context:
    """What a defense runs on (built by the benchmark, or by :func:`context` for one defense).

    Attributes:
        subject: the resolved :class:`~poisonmech.subject.Subject`.
        role: the role of the model under test (``"backdoored"`` / ``"clean"`` / ``"model"``).
        train_data: that model's training rows (``None`` for a subject without them).
        clean_data: trusted clean rows (``prompt``, ``completion``) the defender holds: disjoint
            from the poisoned rows (checked), used by repairs, by filters' calibration and by
            clean-reference statistics. ``None`` when none was given or could be drawn.
        reference_lm: a language model with the subject's tokenizer (ONION's perplexity
            model), or ``None``.
        progress: show progress bars.
        seed: the benchmark's seed (each defense also has its own ``seed`` field where it samples).
        cache: shared between the defenses of one benchmark run on one model (keys are strings
            chosen by the defenses, e.g. ``"acts/resid_post/1/last"``).
    """

    subject: Any
    role: str
    train_data: Dataset | None = None
    clean_data: Dataset | None = None
    reference_lm: torch.nn.Module | None = None
    progress: bool = False
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        """The model under test."""
        return self.subject.model(self.role)

    @property
    def tokenizer(self):
        return self.subject.tokenizer

    def need(self, what: str, defense: str) -> Any:
        """``getattr(self, what)``, or a clear error naming the defense and what it needs."""
        value = getattr(self, what)
        if value is None:
            hints = {"train_data": "a run with training rows (a Pair, a run directory) or train_data=",
                     "clean_data": "clean_data= (trusted clean rows: prompt, completion)",
                     "reference_lm": "reference_lm= (a language model with the subject's tokenizer)"}
            raise ValueError(f"defense {defense!r} needs {what}: pass {hints.get(what, what)}")
        if what == "train_data" and not len(value):
            raise ValueError(f"defense {defense!r} needs training rows; the subject's train_data is empty")
        return value

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``cache[key]``, computed once."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


@dataclass(frozen=True)
class Defense(Config):
    """Base of every defense (subclasses are frozen dataclasses whose fields all have defaults).

    Class attributes each subclass sets: ``name`` (registry key), ``kind`` (one of
    :data:`KINDS`), ``uses_trigger`` (it reads the attack's trigger or triggered inputs),
    ``summary`` (one line for tables and error messages), ``needs_reference`` (it reads
    ``ctx.reference_lm``).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    uses_trigger: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    #: it needs ``ctx.reference_lm`` (the benchmark then trains a default one when none is given)
    needs_reference: ClassVar[bool] = False

    def describe(self) -> dict[str, Any]:
        """Name, kind, trigger use and options, for tables."""
        return {"defense": self.name, "kind": self.kind, "uses_trigger": self.uses_trigger,
                "options": self.to_dict()}


def modified_z_threshold(scores: np.ndarray, z: float) -> float:
    """Iglewicz & Hoaglin's outlier rule: flag scores whose modified z-score
    ``0.6745 (x - median) / MAD`` is >= ``z`` (3.5 in their paper); the threshold on ``x``.
    With a zero MAD (over half the scores equal) the threshold is just above the median."""
    s = np.asarray(scores, dtype=float)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("inf")
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med)))
    if mad == 0.0:
        return float(np.nextafter(med, np.inf))
    return med + z * mad / 0.6745


@dataclass(frozen=True)
class DataAudit(Defense):
    """Scores every training row (higher = more suspicious).

    Args:
        flag_z: the default flagging rule, :func:`modified_z_threshold` at this modified
            z-score (> 0); audits with a rule of their own override :meth:`threshold`.
    """

    kind: ClassVar[str] = "data_audit"
    flag_z: float = 3.5

    def check(self) -> None:
        check_number(type(self).__name__, "flag_z", self.flag_z, lo=0.0, lo_open=True)

    def score(self, ctx: Context) -> np.ndarray:
        raise NotImplementedError

    def threshold(self, scores: np.ndarray) -> float:
        return modified_z_threshold(scores, self.flag_z)


@dataclass(frozen=True)
class InputFilter(Defense):
    """Scores every test input (higher = more likely triggered).

    Args:
        frr: the false-rejection rate on trusted clean inputs the threshold is set to, in
            [0, 1) (STRIP's rule; 0: the largest clean score).
    """

    kind: ClassVar[str] = "input_filter"
    frr: float = 0.01

    def check(self) -> None:
        check_number(type(self).__name__, "frr", self.frr, lo=0.0, hi=1.0, hi_open=True)

    def score(self, ctx: Context, inputs: Dataset) -> np.ndarray:
        raise NotImplementedError

    def calibrate(self, ctx: Context, clean_scores: np.ndarray) -> float:
        """The threshold: the ``1 - frr`` quantile of the scores of trusted clean inputs
        (inputs scoring strictly above it are rejected)."""
        s = np.asarray(clean_scores, dtype=float)
        if not len(s):
            raise ValueError(f"defense {self.name!r}: no clean inputs to calibrate the threshold on")
        return float(np.quantile(s, 1.0 - self.frr, method="higher"))

    def sanitize(self, ctx: Context, inputs: Dataset, threshold: float) -> Dataset | None:
        """The inputs as the model sees them after the filter; ``None``: it only rejects."""
        return None


@dataclass(frozen=True)
class ModelAudit(Defense):
    """Scores a whole model (higher = more likely backdoored)."""

    kind: ClassVar[str] = "model_audit"

    def score_model(self, ctx: Context) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Repair(Defense):
    """Returns a repaired copy of the model under test."""

    kind: ClassVar[str] = "repair"

    def repair(self, ctx: Context) -> torch.nn.Module:
        raise NotImplementedError


def register(cls: type[Defense]) -> type[Defense]:
    """Class decorator: add a defense to :data:`DEFENSES` under its ``name``."""
    if not cls.name or cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__}: a defense needs a name and a kind in {KINDS}")
    if cls.name in DEFENSES and DEFENSES[cls.name] is not cls:
        raise TypeError(f"defense name {cls.name!r} is taken by {DEFENSES[cls.name].__name__}")
    DEFENSES[cls.name] = cls
    return cls


def get(defense: str | Defense | dict, **options: Any) -> Defense:
    """A defense instance from its name (with ``options``), a ``{"name": ..., **options}``
    dict, or an instance (returned as is). An unknown name is an error listing the names."""
    if isinstance(defense, Defense):
        if options:
            return defense.replace(**options)
        return defense
    if isinstance(defense, dict):
        d = dict(defense)
        name = d.pop("name", None)
        return get(name, **d, **options)
    if not isinstance(defense, str) or defense not in DEFENSES:
        close = difflib.get_close_matches(str(defense), list(DEFENSES), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"defenses: unknown defense {defense!r}{hint}; the defenses are: "
                          f"{', '.join(sorted(DEFENSES))}")
    cls = DEFENSES[defense]
    cls.check_fields(options, where=f"defense {defense!r}")
    return cls(**options)


def names(kind: str | None = None) -> tuple[str, ...]:
    """Registered defense names (of one ``kind``), sorted."""
    return tuple(sorted(n for n, c in DEFENSES.items() if kind is None or c.kind == kind))


def options_of(defense: Defense) -> dict[str, Any]:
    """A defense's fields and values (for tables and cache keys)."""
    return {f.name: getattr(defense, f.name) for f in dataclasses.fields(defense)}


__all__ = ["DEFENSES", "KINDS", "Context", "DataAudit", "Defense", "InputFilter", "ModelAudit", "Repair", "get",
           "modified_z_threshold", "names", "options_of", "register"]
