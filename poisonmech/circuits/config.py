"""The options of the circuits package, and the data a run supplies when none is passed.

- :class:`CircuitConfig`: ``discover``, ``edge_attribution`` and ``acdc`` (one config: the
  three are one analysis, finding the edges that carry a clean / corrupted difference);
- :class:`FaithfulnessConfig`: ``faithfulness`` and ``faithfulness_table`` (and the
  :class:`~poisonmech.circuits.circuit.Circuit` methods of the same names).

Each analysis takes its config's fields as keywords or ``config=`` (keywords override it); an
unknown field is an error naming the allowed ones, a value out of range names the field and
the range (:mod:`poisonmech.config`).

``mode`` means what it means in :mod:`poisonmech.patching`: ``"denoise"`` (the default) runs the
corrupted input and patches clean activations in; ``"noise"`` runs the clean input and patches
corrupted activations in. Before issue 12 the circuits defaulted to ``"noise"``: pass
``mode="noise"`` for the old numbers of ``method="eap"`` and ``"acdc"`` (EAP-IG does not depend on it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poisonmech.circuits.rewire import ABLATIONS
from poisonmech.config import Config, ConfigError, check_bool, check_choice, check_number
from poisonmech.patching.config import MODES

METHODS = ("eap", "eap-ig", "acdc")
SCORE_METHODS = ("eap", "eap-ig")


def _check_str(owner: str, field: str, value: Any, what: str) -> None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{owner}.{field} must be {what} or None, got {value!r}")


@dataclass(frozen=True)
class CircuitConfig(Config):
    """Options of ``discover``, ``edge_attribution`` and ``acdc``.

    Args:
        method: ``"eap"`` (attribution patching on edges), ``"eap-ig"`` (with integrated
            gradients over ``steps`` interpolations of the embeddings) or ``"acdc"`` (greedy
            pruning with exact patching; ``acdc()`` is always this method).
        top_n, threshold: how ``discover`` keeps edges: the ``top_n`` of highest (absolute,
            unless ``absolute=False``) score, or those scoring at least ``threshold`` (exactly
            one of the two; ACDC takes ``threshold``, the largest change of the mean metric an
            edge may cause and still be removed).
        steps: EAP-IG interpolation steps (>= 1).
        mode: ``"denoise"`` (run the corrupted input, patch clean values in: EAP's gradient at
            the corrupted run; ACDC starts from every edge patched to its clean value and
            removes patches) or ``"noise"`` (run the clean input, patch corrupted values in: EAP's
            gradient at the clean run, Syed et al.'s EAP; ACDC as in Conmy et al., removing edges
            by patching them to their corrupted value). EAP-IG integrates from the corrupted to
            the clean run and does not depend on it.
        absolute: rank edges by absolute score (``False``: by signed score).
        per_example: keep ``[batch n_src n_dst]`` scores (``None``: when at most ``2**24`` numbers).
        label: the circuit's name in frames and plots.
        twin: which of the subject's models is analysed (``"backdoored"`` | ``"clean"``, or
            ``"after"`` | ``"before"``); ``None``: the subject's default (the backdoored twin).
        n_contrast: with a run and no tokens passed, the data is the run's trigger contrast
            (:func:`poisonmech.patching.trigger_contrast` of up to this many test prompts:
            triggered = clean, controls = corrupted, metric: its logit difference).
    """

    method: str = "eap-ig"
    top_n: int | None = None
    threshold: float | None = None
    steps: int = 5
    mode: str = "denoise"
    absolute: bool = True
    per_example: bool | None = None
    label: str | None = None
    twin: str | None = None
    n_contrast: int = 32

    def check(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "method", self.method, METHODS)
        check_number(owner, "top_n", self.top_n, lo=1, integer=True, optional=True)
        check_number(owner, "threshold", self.threshold, lo=0, optional=True)
        check_number(owner, "steps", self.steps, lo=1, integer=True)
        check_choice(owner, "mode", self.mode, MODES)
        check_bool(owner, "absolute", self.absolute)
        check_bool(owner, "per_example", self.per_example, optional=True)
        _check_str(owner, "label", self.label, "a string")
        _check_str(owner, "twin", self.twin, "a role name")
        check_number(owner, "n_contrast", self.n_contrast, lo=1, integer=True)


@dataclass(frozen=True)
class FaithfulnessConfig(Config):
    """Options of ``faithfulness`` and ``faithfulness_table``.

    Faithfulness is a noising measurement by definition (the clean batch runs with edges
    ablated, see :mod:`poisonmech.circuits.ablation`), so it has no ``mode``.

    Args:
        ablation: what ablated edges carry in ``faithfulness``: ``"patching"`` (the corrupted
            run), ``"mean"`` (the mean over the corrupted batch and positions) or ``"zero"``.
        ablations: the ablations of ``faithfulness_table``, side by side (each once).
        twin: which of the subject's models is measured (``None``: the subject's default).
        n_contrast: with a run and no tokens passed, the trigger contrast's size (see
            :class:`CircuitConfig`; ``faithfulness_table``'s metrics are then its logit
            difference and target log-probability).
    """

    ablation: str = "patching"
    ablations: tuple[str, ...] = ABLATIONS
    twin: str | None = None
    n_contrast: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.ablations, str):
            object.__setattr__(self, "ablations", (self.ablations,))
        elif isinstance(self.ablations, list):
            object.__setattr__(self, "ablations", tuple(self.ablations))
        super().__post_init__()

    def check(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "ablation", self.ablation, ABLATIONS)
        if not isinstance(self.ablations, tuple) or not self.ablations:
            raise ConfigError(f"{owner}.ablations must name at least one of {ABLATIONS}, got {self.ablations!r}")
        for a in self.ablations:
            check_choice(owner, "ablations", a, ABLATIONS)
        if len(set(self.ablations)) < len(self.ablations):
            raise ConfigError(f"{owner}.ablations: each ablation once, got {self.ablations}")
        _check_str(owner, "twin", self.twin, "a role name")
        check_number(owner, "n_contrast", self.n_contrast, lo=1, integer=True)


def run_contrast(s, model, n: int, where: str):
    """The run's trigger contrast (:func:`poisonmech.patching.trigger_contrast`) for ``model``;
    an error saying what to pass when the subject is not a run."""
    if not s.is_run:
        raise ValueError(f"{where} needs clean_tokens, corrupted_tokens and a metric: this subject ({s.kind}) is not "
                         "a run, so it has no trigger contrast to default to. Pass them, or pass a run (a Pair, a "
                         "pipeline stage or a run directory)")
    from poisonmech.patching import trigger_contrast  # lazily: patching is a sibling package

    return trigger_contrast(s, n, model=model)


def contrast_data(s, model, clean_tokens, corrupted_tokens, metric, *, n: int, where: str,
                  metrics: bool = False) -> tuple[Any, Any, Callable | dict | None]:
    """``(clean_tokens, corrupted_tokens, metric)`` as passed, or the run's trigger contrast
    when no tokens are passed (triggered prompts, their controls, the logit difference; with
    ``metrics=True`` a ``{name: metric}`` dict with the target log-probability too)."""
    if clean_tokens is not None:
        if metric is None:
            raise ValueError(f"{where}: metric is required when tokens are passed (a callable mapping logits "
                             "[batch pos d_vocab] to [batch], e.g. poisonmech.patching.logit_diff(...))")
        return clean_tokens, corrupted_tokens, metric
    if corrupted_tokens is not None:
        raise ValueError(f"{where}: corrupted_tokens were passed without clean_tokens; pass both (or neither, "
                         "with a run, for its trigger contrast)")
    tc = run_contrast(s, model, n, where)
    if metric is None:
        metric = ({"logit_diff": tc.logit_diff(), "target_logprob": tc.target_logprob()} if metrics
                  else tc.logit_diff())
    return tc.triggered, tc.control, metric


__all__ = ["ABLATIONS", "METHODS", "MODES", "SCORE_METHODS", "CircuitConfig", "FaithfulnessConfig", "contrast_data"]
