"""``ModelConfig`` -> a ``TransformerBridge`` (TL-native via ``boot_native``, or HF GPT-2).

Every analysis in poisonmech takes any ``TransformerBridge``; these builders are how the
twins are made, with the initial weights fixed by a seed (scoped: the global RNG is left
as it was).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from poisonmech.config import Config, ConfigError, check_bool, check_choice, check_number
from poisonmech.runtime import model_device  # the one definition; kept importable from here

ARCHITECTURES = ("native", "gpt2")
NORMALIZATIONS = ("LN", "LNPre", "RMS", "RMSPre", None)
POSITIONAL = ("standard", "rotary")
ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")


@dataclass(frozen=True)
class ModelConfig(Config):
    """Shape of the twins.

    Args:
        n_layers, d_model, n_heads: transformer size.
        d_head: per-head width; ``None`` means ``d_model // n_heads``.
        d_mlp: MLP width; ``None`` means ``4 * d_model``.
        n_ctx: longest sequence (tokens, BOS included); checked against the data.
        attn_only: no MLPs.
        act_fn: ``"gelu"``, ``"gelu_new"``, ``"relu"`` or ``"silu"``.
        normalization_type: ``"LN"``, ``"LNPre"``, ``"RMS"``, ``"RMSPre"`` or ``None``.
        positional_embedding_type: ``"standard"`` (learned) or ``"rotary"``.
        architecture: ``"native"`` (``TransformerBridge.boot_native``) or ``"gpt2"`` (a randomly
            initialised HF ``GPT2LMHeadModel`` wrapped as a bridge; standard positions, LN, gelu_new).
    """

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_head: int | None = None
    d_mlp: int | None = None
    n_ctx: int = 128
    attn_only: bool = False
    act_fn: Literal["gelu", "gelu_new", "relu", "silu"] = "gelu"
    normalization_type: Literal["LN", "LNPre", "RMS", "RMSPre"] | None = "LN"
    positional_embedding_type: Literal["standard", "rotary"] = "standard"
    architecture: Literal["native", "gpt2"] = "native"

    def check(self) -> None:
        owner = "ModelConfig"
        for name in ("n_layers", "d_model", "n_heads", "n_ctx"):
            check_number(owner, name, getattr(self, name), lo=1, integer=True)
        for name in ("d_head", "d_mlp"):
            check_number(owner, name, getattr(self, name), lo=1, integer=True, optional=True)
        if self.d_head is None and self.d_model % self.n_heads:
            raise ConfigError(f"ModelConfig.n_heads={self.n_heads} must divide d_model={self.d_model} "
                              "(or set d_head)")
        check_bool(owner, "attn_only", self.attn_only)
        check_choice(owner, "act_fn", self.act_fn, ACTIVATIONS)
        check_choice(owner, "normalization_type", self.normalization_type, NORMALIZATIONS)
        check_choice(owner, "positional_embedding_type", self.positional_embedding_type, POSITIONAL)
        check_choice(owner, "architecture", self.architecture, ARCHITECTURES)
        if self.architecture == "gpt2" and (
            self.attn_only or self.positional_embedding_type != "standard" or self.normalization_type != "LN"
        ):
            raise ConfigError("ModelConfig.architecture='gpt2' supports only attn_only=False, "
                              "positional_embedding_type='standard' and normalization_type='LN'")

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model


def build_model(config: ModelConfig, d_vocab: int, *, seed: int,
                tokenizer: PreTrainedTokenizerBase | None = None, device: str | torch.device = "cpu"):
    """A freshly initialised ``TransformerBridge`` in eval mode; same seed, same weights."""
    if config.architecture == "gpt2":
        return _build_gpt2(config, d_vocab, seed=seed, tokenizer=tokenizer, device=device)
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        n_layers=config.n_layers, d_model=config.d_model, n_heads=config.n_heads,
        d_head=config.head_dim, d_mlp=config.mlp_dim, d_vocab=d_vocab, n_ctx=config.n_ctx,
        act_fn=config.act_fn, normalization_type=config.normalization_type,
        attn_only=config.attn_only, positional_embedding_type=config.positional_embedding_type,
        seed=seed, default_prepend_bos=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model to device"
        bridge = TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device)
    return bridge.eval()


def _build_gpt2(config: ModelConfig, d_vocab: int, *, seed: int,
                tokenizer: PreTrainedTokenizerBase | None, device: str | torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=d_vocab, n_positions=config.n_ctx, n_embd=config.d_model, n_layer=config.n_layers,
        n_head=config.n_heads, n_inner=config.mlp_dim, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=getattr(tokenizer, "bos_token_id", None) or 0,
        eos_token_id=getattr(tokenizer, "eos_token_id", None) or 0,
    )
    if config.head_dim * config.n_heads != config.d_model:
        raise ValueError("ModelConfig.architecture='gpt2' needs d_head * n_heads == d_model")
    with torch.random.fork_rng(devices=[]):  # scoped seeding: the caller's RNG is untouched
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(hf_config)
        return wrap_hf_model(model, tokenizer=tokenizer, device=device)


def wrap_hf_model(model: torch.nn.Module, *, tokenizer: PreTrainedTokenizerBase | None = None,
                  device: str | torch.device = "cpu"):
    """Wrap any supported HF causal LM module (e.g. ``GPT2LMHeadModel``) as a TransformerBridge."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf_config = model.config
    arch = (getattr(hf_config, "architectures", None) or [type(model).__name__])[0]
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model to device"
        bridge = build_bridge_from_module(model.to(device), arch, hf_config=hf_config, tokenizer=tokenizer,
                                          device=device)
    return bridge.eval()



__all__ = ["ACTIVATIONS", "ARCHITECTURES", "ModelConfig", "NORMALIZATIONS", "POSITIONAL", "build_model", "model_device",
           "wrap_hf_model"]
