"""The options of the patching analyses: one frozen config per analysis, sharing one base.

``GridConfig`` names the cells (``site``, ``by_position``) and the direction (``mode``);
:class:`PatchConfig` adds the execution ``backend`` and memory budget of exact patching,
:class:`CrossModelPatchConfig` is the same for patching between two models (its default site
is ``"attn_head"``), and :class:`AttributionConfig` adds AtP*'s ``qk_fix``. Every
analysis takes the fields as keywords or ``config=``.
"""

from __future__ import annotations

from dataclasses import dataclass

from poisonmech.config import Config, check_bool, check_choice, check_number
from poisonmech.sites import SITES as _REGISTRY

#: the sites patching reads (every entry of the one site registry, :mod:`poisonmech.sites`)
SITES: tuple[str, ...] = tuple(_REGISTRY)
#: ``"denoise"``: run the corrupted input, patch in clean activations; ``"noise"``: the reverse
MODES = ("denoise", "noise")
#: ``"auto"``: the suffix engine when it reproduces the model, else hooks
BACKENDS = ("auto", "fast", "hooks")


@dataclass(frozen=True)
class GridConfig(Config):
    """The cells of a patching sweep and its direction.

    Attributes:
        site: a name from the site registry (:data:`SITES`): ``resid_pre``, ``resid_mid``,
            ``resid_post``, ``attn_out``, ``mlp_out``, ``attn_head`` (the head's ``z``),
            ``q``, ``k``, ``v`` or ``pattern`` (by destination position).
        by_position: one cell per position (``layer x pos [x head]``) or all positions at once.
        mode: ``"denoise"`` (run the corrupted input, patch in clean activations) or
            ``"noise"`` (run the clean input, patch in corrupted activations).
    """

    site: str = "resid_pre"
    by_position: bool = False
    mode: str = "denoise"

    def check(self) -> None:
        name = type(self).__name__
        check_choice(name, "site", self.site, SITES)
        check_bool(name, "by_position", self.by_position)
        check_choice(name, "mode", self.mode, MODES)


@dataclass(frozen=True)
class PatchConfig(GridConfig):
    """Options of :func:`~poisonmech.patching.activation_patch`.

    Attributes:
        backend: ``"auto"`` (the suffix engine when it reproduces the model, else stacked
            hooked forwards, with a warning), ``"fast"`` (the engine or an error) or
            ``"hooks"`` (stacked hooked forwards: exact for any bridge).
        max_rows: rows (cells x examples x positions) per stacked pass: the memory budget.
    """

    backend: str = "auto"
    max_rows: int = 8192

    def check(self) -> None:
        super().check()
        name = type(self).__name__
        check_choice(name, "backend", self.backend, BACKENDS)
        check_number(name, "max_rows", self.max_rows, lo=1, integer=True)


@dataclass(frozen=True)
class CrossModelPatchConfig(PatchConfig):
    """Options of :func:`~poisonmech.patching.cross_model_patch`: :class:`PatchConfig`'s, with
    ``site="attn_head"`` by default. ``mode="denoise"`` runs the subject's default model (the
    backdoored twin, the model after the stages) and patches in the reference model's
    activations (the clean twin, the model before); ``"noise"`` is the reverse."""

    site: str = "attn_head"


@dataclass(frozen=True)
class AttributionConfig(GridConfig):
    """Options of :func:`~poisonmech.patching.attribution_patch`.

    Attributes:
        qk_fix: for ``site="q"`` / ``"k"``, AtP*'s exact-softmax correction (Kramár et al. 2024)
            instead of the plain linear estimate through the softmax.
    """

    qk_fix: bool = True

    def check(self) -> None:
        super().check()
        check_bool(type(self).__name__, "qk_fix", self.qk_fix)


__all__ = ["AttributionConfig", "BACKENDS", "CrossModelPatchConfig", "GridConfig", "MODES", "PatchConfig", "SITES"]
