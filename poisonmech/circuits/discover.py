"""``discover``: one call from a clean / corrupted contrast to a :class:`Circuit`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Int

from poisonmech.circuits.acdc import acdc
from poisonmech.circuits.circuit import Circuit
from poisonmech.circuits.scores import MODES, edge_attribution
from poisonmech.circuits.validation import check_choice, check_selection

Tensor = torch.Tensor

METHODS = ("eap", "eap-ig", "acdc")


def discover(model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
             metric: Callable, method: str = "eap-ig", *, top_n: int | None = None,
             threshold: float | None = None, steps: int = 5, mode: str = "noise", absolute: bool = True,
             per_example: bool | None = None, label: str | None = None, progress: bool = True) -> Circuit:
    """Find the circuit that makes ``metric`` differ between the clean and the corrupted batch.

    Args:
        model: a ``TransformerBridge`` on any device. A model in training mode is put in eval
            mode for the analysis and restored afterwards.
        clean_tokens, corrupted_tokens: token-aligned ``[batch pos]`` batches of one shape; for a
            backdoor, the triggered prompts and their controls
            (:func:`poisonmech.patching.trigger_contrast`).
        metric: maps logits ``[batch pos d_vocab]`` to ``[batch]`` (e.g. ``contrast.logit_diff()``).
        method: ``"eap"`` (attribution patching on edges), ``"eap-ig"`` (with integrated gradients
            over ``steps`` interpolations of the embeddings) or ``"acdc"`` (greedy pruning with
            exact patching: one forward per edge, for small models).
        top_n, threshold: exactly one: keep the ``top_n`` edges of highest (absolute, unless
            ``absolute=False``) score, or those scoring at least ``threshold``. ``"acdc"`` takes only
            ``threshold``: an edge is pruned when removing it moves the mean metric by less.
        steps: EAP-IG interpolation steps.
        mode: EAP only: gradient at the clean run (``"noise"``) or the corrupted run (``"denoise"``).
        per_example: keep per-example scores (default: when cheap).
        label: the circuit's name in frames and plots.

    Returns:
        A :class:`Circuit` with every edge's score; check it with ``circuit.faithfulness(...)``.
    """
    check_choice("method", method, METHODS)
    check_choice("mode", mode, MODES)
    if method == "acdc":
        if top_n is not None:
            raise ValueError("method='acdc' prunes by threshold=: pass threshold= (the largest change of the "
                             "mean metric an edge may cause and still be removed), not top_n=")
        if threshold is None:
            raise ValueError("method='acdc' needs threshold= (the largest change of the mean metric an edge "
                             "may cause and still be removed)")
        return acdc(model, clean_tokens, corrupted_tokens, metric, threshold=threshold, label=label,
                    progress=progress)
    check_selection(top_n, threshold)
    scores = edge_attribution(model, clean_tokens, corrupted_tokens, metric, method=method, steps=steps,
                              mode=mode, per_example=per_example, progress=progress)
    return scores.circuit(top_n=top_n, threshold=threshold, absolute=absolute, label=label)
