"""The options of the patching analyses: one frozen config per analysis, sharing one base.

``GridConfig`` names the cells (``site``, ``by_position``) and the direction (``mode``);
:class:`PatchConfig` adds the execution ``backend`` and memory budget of exact patching,
:class:`CrossModelPatchConfig` is the same for patching between two models (its default site
is ``"attn_head"``), and :class:`AttributionConfig` adds AtP*'s ``qk_fix``.
:class:`CausalTraceConfig` holds causal tracing's options (noise, samples, windows, severing);
it is not a grid config: its cells are always layer x position. Every analysis takes the
fields as keywords or ``config=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from poisonmech.config import Config, ConfigError, check_bool, check_choice, check_number
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


#: what causal tracing restores: one hidden state, or a window of MLP / attention outputs
CAUSAL_TRACE_SITES = ("resid_post", "mlp_out", "attn_out")
#: what the severed variant freezes at its corrupted values (``None``: nothing)
SEVER = (None, "mlp", "attn")


@dataclass(frozen=True)
class CausalTraceConfig(Config):
    """Options of :func:`~poisonmech.patching.causal_trace` (Meng et al. 2022, ROME).

    Attributes:
        site: what is restored at one (layer, position): ``"resid_post"`` (the hidden state
            leaving the block), ``"mlp_out"`` or ``"attn_out"`` (the MLP / attention outputs of
            a window of layers around the layer, ROME's windowed restoration).
        noise: the noise scale in standard deviations of the embedding matrix: the subject's
            token embeddings get Gaussian noise of std ``noise * W_E.std()`` (ROME's 3 sigma).
        samples: noise draws per prompt; effects are averaged over them and their spread kept.
        window: layers restored per cell for ``mlp_out`` / ``attn_out``: layers
            ``max(0, L - window // 2) .. min(n_layers, L + ceil(window / 2)) - 1`` for cell layer
            ``L``, as ROME's ``trace_important_window``; ``resid_post`` restores one layer.
        sever: ``None``, ``"mlp"`` or ``"attn"``: ROME's severed variant (Figure 3): while a
            state is restored, the MLP (attention) outputs of every layer at the restored
            position are frozen at their values in the run being patched into (the corrupted
            run for ``mode="denoise"``), so the restored state cannot act through them.
        mode: ``"denoise"`` (ROME: run with the subject corrupted, restore clean states) or
            ``"noise"`` (run clean, put in the corrupted run's states).
        batch_size: forward rows per pass (one row = one cell of one prompt under one noise
            draw): the memory budget.
        seed: seeds the noise generator (the same seed draws the same noise).
    """

    site: str = "resid_post"
    noise: float = 3.0
    samples: int = 10
    window: int = 10
    sever: str | None = None
    mode: str = "denoise"
    batch_size: int = 256
    seed: int = 0

    def check(self) -> None:
        name = type(self).__name__
        check_choice(name, "site", self.site, CAUSAL_TRACE_SITES)
        check_number(name, "noise", self.noise, lo=0, lo_open=True)
        if isinstance(self.noise, float) and math.isinf(self.noise):
            raise ConfigError(f"{name}.noise must be a finite number > 0, got {self.noise!r}")
        check_number(name, "samples", self.samples, lo=1, integer=True)
        check_number(name, "window", self.window, lo=1, integer=True)
        check_choice(name, "sever", self.sever, SEVER)
        check_choice(name, "mode", self.mode, MODES)
        check_number(name, "batch_size", self.batch_size, lo=1, integer=True)
        check_number(name, "seed", self.seed, lo=0, integer=True)
        if self.sever is not None and self.site == f"{self.sever}_out":
            raise ConfigError(f"{name}.sever={self.sever!r} freezes the {self.site} outputs that site={self.site!r} "
                              f"restores; sever the other kind or restore site='resid_post'")


__all__ = ["AttributionConfig", "BACKENDS", "CAUSAL_TRACE_SITES", "CausalTraceConfig", "CrossModelPatchConfig",
           "GridConfig", "MODES", "PatchConfig", "SEVER", "SITES"]
