"""The ablation repairs' models: a copy of a model that runs under an intervention (a circuit's
edges ablated, a direction projected out) on every forward and only then, so no hook stays
attached outside a forward (see :mod:`poisonmech.defenses.repairs`)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch

Tensor = torch.Tensor


class RepairedModel(torch.nn.Module):
    """A copy of a model that runs under an intervention on every forward.

    ``forward(tokens, ...)`` enters :meth:`intervene` (a context manager attaching the
    intervention's hooks to :attr:`model`) and calls the model inside it, so the hooks exist
    only during a forward. ``cfg`` and ``tokenizer`` are the copy's (where it has them).
    """

    #: marks a wrapper: analyses that hook a bridge need ``.model`` (without the intervention)
    is_wrapper: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module, description: str):
        super().__init__()
        self.model = model
        self.description = description
        for attr in ("cfg", "tokenizer"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))
        self.train(False)

    def intervene(self) -> AbstractContextManager:
        raise NotImplementedError

    def forward(self, tokens: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with self.intervene():
            return self.model(tokens, *args, **kwargs)

    def extra_repr(self) -> str:
        return self.description


class CircuitAblatedModel(RepairedModel):
    """A model whose forwards run with a circuit's edges ablated (the
    :func:`poisonmech.circuits.rewired` pass of :func:`poisonmech.circuits.ablated` with
    ``part="circuit"``): each ablated edge carries the reference activation of its source, here
    a mean (over clean inputs) or zero, so inputs of any shape work.

    Attributes: ``circuit`` (the :class:`~poisonmech.circuits.Circuit`), ``graph``,
    ``ablated_edges`` (``[n_src n_dst]``) and ``reference`` (``[n_src d_model]``) buffers.
    """

    def __init__(self, model: torch.nn.Module, circuit, reference: Tensor, description: str):
        super().__init__(model, description)
        self.circuit = circuit
        self.graph = circuit.graph
        self.register_buffer("ablated_edges", circuit.mask.bool() & circuit.graph.edge_mask)
        self.register_buffer("reference", reference.detach())

    def intervene(self) -> AbstractContextManager:
        from poisonmech.circuits import rewired

        # what pm.circuits.ablated(model, <clean prompts>, circuit=..., ablation="mean", part="circuit")
        # enters, with the mean computed once here (ablated recomputes it, a forward over every
        # clean prompt, each time it is entered)
        return rewired(self.model, self.graph, ablate=self.ablated_edges, reference=self.reference)


class DirectionAblatedModel(RepairedModel):
    """A model whose forwards run with a unit direction projected out of ``site`` at ``layers``
    (every position): :func:`poisonmech.probes.ablate_direction`.

    Attributes: ``layers``, ``site``, ``direction`` buffer (``[d_model]`` or ``[layer d_model]``),
    ``probe`` (the :class:`~poisonmech.probes.ProbeResult` it came from, or ``None``).
    """

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...], direction: Tensor, *, site: str,
                 description: str, probe=None):
        super().__init__(model, description)
        self.layers = tuple(layers)
        self.site = site
        self.probe = probe
        self.register_buffer("direction", direction.detach().float())

    def intervene(self) -> AbstractContextManager:
        from poisonmech.probes.intervene import ablate_direction

        return ablate_direction(self.model, list(self.layers), self.direction, site=self.site)


