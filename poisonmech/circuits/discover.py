"""``discover``: one call from a clean / corrupted contrast to a :class:`Circuit`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Int

from poisonmech.circuits.acdc import THRESHOLD_NEEDED, _acdc
from poisonmech.circuits.circuit import Circuit
from poisonmech.circuits.config import METHODS, CircuitConfig, contrast_data
from poisonmech.circuits.scores import _edge_scores
from poisonmech.circuits.validation import check_selection
from poisonmech.config import takes_config
from poisonmech.subject import resolve

Tensor = torch.Tensor

__all__ = ["METHODS", "discover"]


@takes_config(CircuitConfig)
def discover(subject, clean_tokens: Int[Tensor, "batch pos"] | None = None,
             corrupted_tokens: Int[Tensor, "batch pos"] | None = None, metric: Callable | None = None,
             method: str | None = None, *, progress: bool = True, config: CircuitConfig) -> Circuit:
    """Find the circuit that makes ``metric`` differ between the clean and the corrupted batch.

    Args:
        subject: any subject (:func:`poisonmech.resolve`): a Pair, a pipeline stage, a run
            directory, a bare ``TransformerBridge`` on any device, ...; ``twin`` picks the
            model (default: the backdoored twin). A model in training mode is analysed in
            eval mode and restored afterwards.
        clean_tokens, corrupted_tokens: token-aligned ``[batch pos]`` batches of one shape; for a
            backdoor, the triggered prompts and their controls
            (:func:`poisonmech.patching.trigger_contrast`). With a run and no tokens, that
            contrast (``n_contrast`` prompts) and its logit difference are the data.
        metric: maps logits ``[batch pos d_vocab]`` to ``[batch]`` (e.g. ``contrast.logit_diff()``).
        method: ``"eap"`` (attribution patching on edges), ``"eap-ig"`` (with integrated gradients
            over ``steps`` interpolations of the embeddings) or ``"acdc"`` (greedy pruning with
            exact patching: one forward per edge, for small models).

    Options (:class:`~poisonmech.circuits.config.CircuitConfig`):
        top_n, threshold: exactly one: keep the ``top_n`` edges of highest (absolute, unless
            ``absolute=False``) score, or those scoring at least ``threshold``. ``"acdc"`` takes only
            ``threshold``: an edge is pruned when removing it moves the mean metric by less.
        steps: EAP-IG interpolation steps.
        mode: ``"denoise"`` (default: run the corrupted input, patch clean values in; EAP's
            gradient at the corrupted run) or ``"noise"`` (run the clean input, patch corrupted
            values in; EAP's gradient at the clean run). EAP-IG does not depend on it. The
            default was ``"noise"`` before issue 12: pass ``mode="noise"`` for the old EAP / ACDC circuits.
        per_example: keep per-example scores (default: when cheap).
        label: the circuit's name in frames and plots.
        twin, n_contrast: the model analysed; the default contrast's size.

    Returns:
        A :class:`Circuit` with every edge's score; check it with ``circuit.faithfulness(...)``.
    """
    s = resolve(subject, where="discover")
    model = s.model(config.twin)
    if config.method == "acdc":
        if config.top_n is not None:
            raise ValueError(f"{THRESHOLD_NEEDED}, not top_n=")
        if config.threshold is None:
            raise ValueError(f"method='acdc' needs threshold=: {THRESHOLD_NEEDED}")
    else:
        check_selection(config.top_n, config.threshold)
    clean_tokens, corrupted_tokens, metric = contrast_data(s, model, clean_tokens, corrupted_tokens, metric,
                                                           n=config.n_contrast, where="discover")
    if config.method == "acdc":
        return _acdc(model, clean_tokens, corrupted_tokens, metric, threshold=config.threshold, mode=config.mode,
                     graph=None, label=config.label, progress=progress)
    scores = _edge_scores(model, clean_tokens, corrupted_tokens, metric, method=config.method, steps=config.steps,
                          mode=config.mode, per_example=config.per_example, graph=None, progress=progress)
    return scores.circuit(top_n=config.top_n, threshold=config.threshold, absolute=config.absolute,
                          label=config.label)
