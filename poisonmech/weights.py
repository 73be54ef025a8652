"""What a twin trains, saves and loads: one place for native, fully fine-tuned and LoRA twins.

Every twin is a TransformerBridge (what the analyses read). A twin built from a
:class:`~poisonmech.pretrained.PretrainedModel` also carries, outside the bridge's module tree
(so ``bridge.state_dict()`` is unchanged):

- ``trainable(m)``: the module the training loop calls (``tokens -> logits``) and optimises;
  the bridge itself for a native or from-scratch HF twin;
- ``lora_module(m)``: the LoRA-adapted HF module (``None`` unless ``finetune="lora"``).

``weights(m)`` is what a checkpoint holds: the bridge's state dict, or only the LoRA adapter
tensors; ``load_weights(m, state)`` puts such a state back (LoRA: into the adapters, then merged
into the bridge by :func:`sync`).
"""

from __future__ import annotations

import torch

_TRAIN, _LORA = "_pm_train", "_pm_lora"


def attach(bridge, *, train: torch.nn.Module | None, lora: torch.nn.Module | None):
    """Record the twin's training module and LoRA module on ``bridge`` (not as sub-modules)."""
    object.__setattr__(bridge, _TRAIN, train)
    object.__setattr__(bridge, _LORA, lora)
    return bridge


def trainable(model: torch.nn.Module) -> torch.nn.Module:
    """The module the training loop calls and optimises."""
    return model.__dict__.get(_TRAIN) or model


def lora_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LoRA-adapted HF module of a LoRA twin, else ``None``."""
    return model.__dict__.get(_LORA)


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` holds (LoRA: the adapter tensors only)."""
    lora = lora_module(model)
    return lora_state(lora) if lora is not None else model.state_dict()


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source=None) -> None:
    """Put a checkpoint's ``state`` into ``model`` (LoRA: the adapters, merged into the bridge)."""
    lora = lora_module(model)
    if lora is None:
        model.load_state_dict(state)
        return
    want = set(lora_state(lora))
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        where = f"{source}: " if source is not None else ""
        raise ValueError(f"{where}the LoRA adapter tensors do not match the run's PretrainedModel (lora_rank / "
                         f"lora_targets): missing {missing}, unexpected {extra}")
    result = lora.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    sync(model)


@torch.no_grad()
def sync(model: torch.nn.Module) -> None:
    """Merge a LoRA twin's adapters into its bridge: each adapted weight becomes ``W + ΔW``.

    The merged module comes from peft's ``merge_and_unload`` on a copy of the adapted module; it
    is wrapped as a bridge and its state copied into the twin's bridge through the bridge's own
    ``state_dict`` / ``load_state_dict`` (some bridges keep split q/k/v copies of a fused
    projection, e.g. GPT-NeoX's ``query_key_value``; writing the fused HF tensor alone would
    leave them stale).
    """
    lora = lora_module(model)
    if lora is None:
        return
    import copy
    import warnings

    from poisonmech.models import wrap_hf_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notices about merging fan_in_fan_out layers
        merged = _merge(copy.deepcopy(lora))
    fresh = wrap_hf_model(merged, device=next(model.parameters()).device)
    model.load_state_dict(fresh.state_dict())


def _merge(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (a copy of the adapted HF module) with every LoRA layer replaced by its base
    layer holding the merged weight (what peft's ``merge_and_unload`` does on a ``PeftModel``)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if not isinstance(layer, LoraLayer):
            continue
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return module


__all__ = ["attach", "load_weights", "lora_module", "lora_state", "sync", "trainable", "weights"]
