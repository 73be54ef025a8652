"""``ModelConfig`` -> a ``TransformerBridge`` (TL-native via ``boot_native``, or HF GPT-2).

Every analysis in poisonmech takes any ``TransformerBridge``; these builders are how the
twins are made, with the initial weights fixed by a seed (scoped: the global RNG is left
as it was).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from transformers import PreTrainedTokenizerBase

from poisonmech.config import Config, ConfigError, check_bool, check_choice, check_number
from poisonmech.pretrained import PretrainedModel
from poisonmech.runtime import model_device  # the one definition; kept importable from here

ARCHITECTURES = ("native", "gpt2", "neox", "llama", "qwen2")
#: architectures built as a random-initialised Hugging Face model (then wrapped as a bridge)
HF_ARCHITECTURES = ("gpt2", "neox", "llama", "qwen2")
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
        architecture: ``"native"`` (``TransformerBridge.boot_native``) or a randomly initialised
            Hugging Face model wrapped as a bridge: ``"gpt2"`` (``GPT2LMHeadModel``: learned
            positions, LayerNorm, gelu_new), ``"neox"`` (``GPTNeoXForCausalLM``, Pythia's: parallel
            residual, rotary on a quarter of each head, LayerNorm, gelu), ``"llama"``
            (``LlamaForCausalLM``: rotary, RMSNorm, SwiGLU, no biases, grouped-query attention) or
            ``"qwen2"`` (``Qwen2ForCausalLM``: Llama's block with q/k/v biases). The HF ones take
            their own norm, activation and positions: ``act_fn``, ``normalization_type`` and
            ``positional_embedding_type`` must stay at their defaults for them.
        n_kv_heads: key/value heads for grouped-query attention (``"llama"``, ``"qwen2"``);
            ``None`` means ``n_heads``; must divide ``n_heads``.
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
    architecture: Literal["native", "gpt2", "neox", "llama", "qwen2"] = "native"
    n_kv_heads: int | None = None

    #: fields added after runs were stored: left out of ``to_dict`` at their default, so a stored
    #: run's identity (its ``config.json``) is unchanged
    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"n_kv_heads": None}

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for name, default in self._LATER_FIELDS.items():
            if d.get(name) == default:
                d.pop(name, None)
        return d

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
        check_number(owner, "n_kv_heads", self.n_kv_heads, lo=1, integer=True, optional=True)
        if self.architecture in HF_ARCHITECTURES and (
            self.attn_only or self.positional_embedding_type != "standard" or self.normalization_type != "LN"
            or self.act_fn != "gelu"
        ):
            raise ConfigError(f"ModelConfig.architecture={self.architecture!r} supports only attn_only=False and the "
                              "default act_fn, normalization_type and positional_embedding_type (the Hugging Face "
                              "architecture fixes its own norm, activation and positions)")
        if self.architecture in HF_ARCHITECTURES and self.head_dim * self.n_heads != self.d_model:
            raise ConfigError(f"ModelConfig.architecture={self.architecture!r} needs d_head * n_heads == d_model "
                              f"(got d_head={self.head_dim}, n_heads={self.n_heads}, d_model={self.d_model})")
        if self.n_kv_heads is not None:
            if self.architecture not in ("llama", "qwen2"):
                raise ConfigError(f"ModelConfig.n_kv_heads is for grouped-query attention, architecture 'llama' or "
                                  f"'qwen2'; got architecture={self.architecture!r}")
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model


def build_model(config: ModelConfig, d_vocab: int, *, seed: int,
                tokenizer: PreTrainedTokenizerBase | None = None, device: str | torch.device = "cpu"):
    """A freshly initialised ``TransformerBridge`` in eval mode; same seed, same weights."""
    if isinstance(config, PretrainedModel):
        return config.load_model(d_vocab, seed=seed, tokenizer=tokenizer, device=device)
    if config.architecture in HF_ARCHITECTURES:
        with torch.random.fork_rng(devices=[]):  # scoped seeding: the caller's RNG is untouched
            torch.manual_seed(seed)
            model = hf_model_class(config.architecture)(hf_config(config, d_vocab, tokenizer))
            return wrap_hf_model(model, tokenizer=tokenizer, device=device)  # (building a bridge draws numbers)
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


def model_from_dict(d: dict[str, Any]) -> ModelConfig | PretrainedModel:
    """A stored model config: a :class:`PretrainedModel` when it names a ``path``, else a :class:`ModelConfig`."""
    if isinstance(d, (ModelConfig, PretrainedModel)):
        return d
    return PretrainedModel.from_dict(d) if "path" in (d or {}) else ModelConfig.from_dict(d or {})


def prepare_model(model: Any, task: Any, where: str):
    """``(model, task)`` ready to train: a :class:`PretrainedModel` gets its base's hash recorded
    and the task is rendered with the model's own tokenizer (a task built with the word-level
    default is re-rendered; one built with another subword tokenizer is refused)."""
    from dataclasses import replace as dc_replace

    from poisonmech.tasks.tokenizer import is_word_tokenizer

    if isinstance(model, ModelConfig):
        return model, task
    if not isinstance(model, PretrainedModel):
        raise ValueError(f"{where}: model must be a pm.ModelConfig or a pm.PretrainedModel, got {type(model).__name__}")
    model = model.with_hash()
    tok = model.tokenizer()
    if is_word_tokenizer(task.tokenizer):
        return model, dc_replace(task, tokenizer=tok)
    if task.tokenizer.get_vocab() != tok.get_vocab():
        raise ValueError(f"{where}: the task was rendered with a tokenizer whose vocabulary differs from the model's "
                         f"({len(task.tokenizer)} vs {len(tok)} tokens); build the task with "
                         "tokenizer=PretrainedModel(...).tokenizer(), or with the default word-level tokenizer "
                         "(then it is re-rendered with the model's)")
    return model, task


def context_length(config: ModelConfig | PretrainedModel) -> int:
    """The longest sequence the twins train on: ``n_ctx``, or a pretrained model's maximum positions."""
    return config.context if isinstance(config, PretrainedModel) else config.n_ctx


def hf_model_class(architecture: str):
    """The ``transformers`` causal-LM class of one of :data:`HF_ARCHITECTURES`."""
    import transformers

    names = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
             "qwen2": "Qwen2ForCausalLM"}
    return getattr(transformers, names[architecture])


def hf_config(config: ModelConfig, d_vocab: int, tokenizer: PreTrainedTokenizerBase | None = None):
    """The ``transformers`` config of a :class:`ModelConfig` with an HF architecture (no dropout)."""
    import transformers

    special = {"bos_token_id": getattr(tokenizer, "bos_token_id", None) or 0,
               "eos_token_id": getattr(tokenizer, "eos_token_id", None) or 0,
               "pad_token_id": getattr(tokenizer, "pad_token_id", None)}
    arch, d, L, H = config.architecture, config.d_model, config.n_layers, config.n_heads
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=d_vocab, n_positions=config.n_ctx, n_embd=d, n_layer=L, n_head=H, n_inner=config.mlp_dim,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
    if arch == "neox":
        return transformers.GPTNeoXConfig(
            vocab_size=d_vocab, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
            intermediate_size=config.mlp_dim, max_position_embeddings=config.n_ctx, rotary_pct=0.25,
            use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
            **special)
    cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    return cls(vocab_size=d_vocab, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
               num_key_value_heads=config.n_kv_heads or H, intermediate_size=config.mlp_dim,
               max_position_embeddings=config.n_ctx, tie_word_embeddings=False, **special)


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



def set_head(model: torch.nn.Module, head: torch.nn.Linear) -> None:
    """Replace a bridge's unembedding module (the bridge's own setter rewires its hooks)."""
    if hasattr(model.unembed, "set_original_component"):
        model.unembed.set_original_component(head)
    else:
        model.unembed.original_component = head


def copy_bridge(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh, independent copy of a bridge holding its weights (checked bit for bit).

    A bridge is rebuilt rather than deep-copied: a ``TransformerBridge`` that has run a forward
    holds hooks whose closures point at its own modules (TransformerLens' capture hooks, through
    weak proxies), and ``copy.deepcopy`` shares functions, so a deep copy's forwards would write
    into the original's modules and read the original's hook points. A native bridge is booted
    again from a copy of its ``cfg``; a bridge over a Hugging Face module gets a new module of the
    same class and config (initialised under a forked RNG: the caller's random state is left
    alone) wrapped as a bridge. An unembedding of another shape than the config's (a reward
    model's one-output score head) is rebuilt in that shape. The copy is a plain bridge: a LoRA
    twin's copy holds its merged weights and trains fully. Any other module is deep-copied.
    """
    import copy

    device = model_device(model)
    inner = getattr(model, "original_model", None)
    if inner is not None and type(inner).__name__ == "NativeModel":
        import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
        from transformer_lens.model_bridge import TransformerBridge

        with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng(devices=[]):
            fresh = TransformerBridge.boot_native(copy.deepcopy(model.cfg), tokenizer=getattr(model, "tokenizer", None),
                                                  device=device)
    elif inner is not None and hasattr(inner, "config"):
        dtype = next(inner.parameters()).dtype
        with torch.random.fork_rng(devices=[]):
            module = type(inner)(copy.deepcopy(inner.config)).to(dtype=dtype)
        fresh = wrap_hf_model(module, tokenizer=getattr(model, "tokenizer", None), device=device)
    else:
        fresh = copy.deepcopy(model)
    head = getattr(getattr(model, "unembed", None), "original_component", None)
    fresh_head = getattr(getattr(fresh, "unembed", None), "original_component", None)
    if isinstance(head, torch.nn.Linear) and isinstance(fresh_head, torch.nn.Linear) and \
            head.weight.shape != fresh_head.weight.shape:
        set_head(fresh, torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None).to(head.weight))
    if fresh is not model:
        fresh.load_state_dict(model.state_dict())
    a, b = model.state_dict(), fresh.state_dict()
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError(f"copy_bridge: the copy of {type(model).__name__} does not hold the model's weights")
    return fresh.train(model.training)


__all__ = ["ACTIVATIONS", "ARCHITECTURES", "HF_ARCHITECTURES", "ModelConfig", "PretrainedModel", "context_length", "copy_bridge",
           "hf_config", "hf_model_class", "model_from_dict", "prepare_model", "NORMALIZATIONS", "POSITIONAL", "build_model", "model_device",
           "wrap_hf_model"]
