"""``PretrainedModel``: a Hugging Face causal LM as the twins' shared start, fully or LoRA fine-tuned.

``pm.PretrainedModel(path)`` goes wherever a ``ModelConfig`` is accepted (``train_pair``,
``train_pipeline``, ``sweep``, TOML). It loads with ``transformers`` (``AutoModelForCausalLM`` /
``AutoTokenizer``, ``local_files_only=True``: a local folder or a model already in the local
Hugging Face cache, by the same code path; nothing is downloaded) and wraps the module as a
TransformerLens ``TransformerBridge``, so every architecture TransformerLens 4 bridges works.

A twin built from it carries, besides the bridge every analysis reads:

- the module the training loop optimises (:func:`poisonmech.weights.trainable`): the HF module
  itself for ``finetune="full"`` (the bridge shares its parameters; training it directly skips
  the bridge's hook dispatch), or the LoRA-adapted copy for ``finetune="lora"``;
- with LoRA, the adapter module (``peft``; the base frozen): what is saved (only the adapter
  tensors, in safetensors), what LoRA-space influence differentiates, and what is merged into
  the bridge's weights after training (:func:`poisonmech.weights.sync`).

Both twins start from the same weights: the base's hash (sha256 over its tensors) is recorded in
the run's ``config.json`` and checked whenever the run is loaded; LoRA adapters are initialised
under the run's seed, so both twins get the same adapter initialisation. Dropout is switched off
(both the base's and LoRA's): the twins must see the same computation, and dropout would draw
from the global random stream.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from poisonmech.config import Config, ConfigError, check_choice, check_number

FINETUNES = ("full", "lora")
DTYPES = ("float32", "bfloat16")
#: files a saved model's weights may be in (safetensors only: a pickle is code execution)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class BaseChangedError(ValueError):
    """The pretrained base's weights differ from the ones a run was trained from."""


@dataclass(frozen=True)
class PretrainedModel(Config):
    """A pretrained Hugging Face causal LM to fine-tune the twins from.

    Args:
        path: a local folder written by ``save_pretrained`` (``config.json``, ``model.safetensors``,
            a tokenizer) or a hub name already in the local Hugging Face cache. Nothing is downloaded.
        finetune: ``"full"`` (every weight trains) or ``"lora"`` (low-rank adapters via ``peft``;
            the base stays frozen).
        lora_rank, lora_alpha: LoRA's ``r`` and ``alpha`` (the update is ``alpha / r * B A``).
        lora_targets: module names (suffixes, e.g. ``("q_proj", "v_proj")``) that get adapters;
            ``None``: peft's default for the architecture.
        lora_dropout: dropout on the adapters' input (default 0: the twins see the same computation).
        dtype: ``"float32"``, or ``"bfloat16"``: training runs under bf16 autocast (weights and
            optimiser state stay float32).
        revision: a git revision of a hub model in the cache (``None``: the cached default).
        n_ctx: longest sequence to train on; ``None``: the model's maximum positions. Checked
            against the model's maximum.
        sha256: the base's recorded hash; when set, loading a base with other weights is refused
            (``train_pair`` records it in ``config.json``; you rarely set it yourself).
    """

    path: str
    finetune: Literal["full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    revision: str | None = None
    n_ctx: int | None = None
    sha256: str | None = None

    def check(self) -> None:
        owner = "PretrainedModel"
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"{owner}.path must be a folder or a model name (a non-empty str), got {self.path!r}")
        check_choice(owner, "finetune", self.finetune, FINETUNES)
        check_number(owner, "lora_rank", self.lora_rank, lo=1, integer=True)
        check_number(owner, "lora_alpha", self.lora_alpha, lo=0, lo_open=True)
        check_number(owner, "lora_dropout", self.lora_dropout, lo=0, hi=1, hi_open=True)
        if self.lora_targets is not None:
            targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(f"{owner}.lora_targets must be module names (non-empty strs) or None, "
                                  f"got {self.lora_targets!r}")
            object.__setattr__(self, "lora_targets", targets)
        check_choice(owner, "dtype", self.dtype, DTYPES)
        if self.revision is not None and not isinstance(self.revision, str):
            raise ConfigError(f"{owner}.revision must be a str or None, got {self.revision!r}")
        check_number(owner, "n_ctx", self.n_ctx, lo=1, integer=True, optional=True)
        if self.sha256 is not None and not isinstance(self.sha256, str):
            raise ConfigError(f"{owner}.sha256 must be a hex str or None, got {self.sha256!r}")

    # ------------------------------------------------------------------ what the run code reads
    @property
    def max_positions(self) -> int:
        return max_positions(load_config(self))

    @property
    def context(self) -> int:
        """The context length used: ``n_ctx``, or the model's maximum positions."""
        return self.n_ctx if self.n_ctx is not None else self.max_positions

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's own tokenizer (a fast one), with a pad token when it has none."""
        return load_tokenizer(self)

    def with_hash(self) -> PretrainedModel:
        """This config with ``sha256`` set to the base's hash (computed when not yet set)."""
        if self.sha256 is not None:
            return self
        return self.replace(sha256=base_hash(load_base(self)))

    def load_model(self, d_vocab: int | None = None, *, seed: int = 0,
                   tokenizer: PreTrainedTokenizerBase | None = None, device: str | torch.device = "cpu"):
        """A twin: the bridge over the base (LoRA: with freshly initialised adapters, seeded by
        ``seed``), ready to train and to analyse."""
        return build_twin(self, seed=seed, tokenizer=tokenizer, device=device, d_vocab=d_vocab)


# ---------------------------------------------------------------------- loading
def _source(cfg: PretrainedModel) -> str:
    """The folder (or cached hub name) to load, after checking a local folder holds a model."""
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"PretrainedModel.path: {path} has no config.json (not a save_pretrained folder)")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            pickles = [f.name for f in path.glob("*.bin")] + [f.name for f in path.glob("*.pt")]
            extra = (f"; it has {', '.join(sorted(pickles))}, a pickle, which poisonmech does not load (loading a "
                     "pickle is code execution): re-save it with save_pretrained(safe_serialization=True)"
                     if pickles else "")
            raise FileNotFoundError(f"PretrainedModel.path: {path} has no model.safetensors{extra}")
        return str(path)
    if cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") > 1:  # a path, not "org/name"
        raise FileNotFoundError(f"PretrainedModel.path: no folder {path}")
    return cfg.path  # a hub name: must be in the local cache (local_files_only below)


def load_config(cfg: PretrainedModel):
    from transformers import AutoConfig

    src = _source(cfg)
    try:
        hf = AutoConfig.from_pretrained(src, revision=cfg.revision, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"PretrainedModel.path: {cfg.path!r} is neither a local model folder nor a model in "
                                f"the local Hugging Face cache (nothing is downloaded): {exc}") from None
    for name in [n for n in vars(hf) if "dropout" in n or n.endswith("pdrop")]:
        if isinstance(getattr(hf, name), float):
            setattr(hf, name, 0.0)  # the twins must see the same computation (see the module docstring)
    return hf


def max_positions(hf_config) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def load_base(cfg: PretrainedModel):
    """The base HF causal LM (float32, eval mode, dropout off)."""
    from transformers import AutoModelForCausalLM

    hf = load_config(cfg)
    arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" per twin
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(_source(cfg), config=hf, revision=cfg.revision,
                                                         local_files_only=True, use_safetensors=True,
                                                         dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(f"PretrainedModel.path: cannot load {cfg.path!r} ({arch}) as a causal LM: {exc}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if cfg.n_ctx is not None and cfg.n_ctx > max_positions(hf):
        raise ConfigError(f"PretrainedModel.n_ctx={cfg.n_ctx} is above the model's maximum positions "
                          f"({max_positions(hf)})")
    return model.eval()


def load_tokenizer(cfg: PretrainedModel) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        # add_bos_token=True: ``tokenizer(text)`` starts with BOS, as TransformerLens expects (it would
        # otherwise reload the tokenizer by name to set it)
        tok = AutoTokenizer.from_pretrained(_source(cfg), revision=cfg.revision, local_files_only=True,
                                            add_bos_token=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"PretrainedModel.path: {cfg.path!r} has no tokenizer (tokenizer.json / "
                                f"tokenizer_config.json): {exc}") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"PretrainedModel.path: {cfg.path!r}'s tokenizer is not a fast tokenizer "
                         f"({type(tok).__name__}); poisonmech needs a PreTrainedTokenizerFast (tokenizer.json)")
    if tok.pad_token_id is None:  # padding is masked out; any id works, EOS is the convention
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def base_hash(model: torch.nn.Module) -> str:
    """sha256 over the base's tensors (names, dtypes, shapes and bytes), independent of file layout.

    Not :func:`poisonmech.subject.model_fingerprint` (names and bytes only): this hash is recorded
    in run configs, and it also tells a base whose tensors were re-typed or reshaped apart.
    """
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_bf16(device: str | torch.device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"PretrainedModel.dtype='bfloat16': the device {dev} does not support bfloat16; "
                          "use dtype='float32'")
    if dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"PretrainedModel.dtype='bfloat16' is supported on 'cuda' and 'cpu' devices, not {dev.type!r}")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear maps (``nn.Linear`` and GPT-2's ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    return list(dict.fromkeys(names))


def add_lora(cfg: PretrainedModel, model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with LoRA adapters injected (in place; base frozen), initialised under ``seed``."""
    from peft import LoraConfig, get_peft_model

    if cfg.lora_targets is not None:
        available = linear_module_names(model)
        missing = [t for t in cfg.lora_targets if t.rsplit(".", 1)[-1] not in available]
        if missing:
            raise ConfigError(f"PretrainedModel.lora_targets: {missing} are not linear modules of the model; its "
                              f"linear modules are: {', '.join(available)}")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets) if cfg.lora_targets is not None else None,
                      fan_in_fan_out=_is_conv1d_model(model), bias="none")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notices
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, lora)
        except ValueError as exc:
            raise ConfigError(f"PretrainedModel.lora_targets: peft cannot add adapters ({exc}); the model's linear "
                              f"modules are: {', '.join(linear_module_names(model))}") from None
    return peft_model.base_model.model


def _is_conv1d_model(model: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def supported_architectures() -> list[str]:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(SUPPORTED_ARCHITECTURES)


def bridge_of(model: torch.nn.Module, tokenizer, device):
    """``model`` wrapped as a TransformerBridge; an architecture TransformerLens cannot bridge is
    named with the list of those it can."""
    from poisonmech.models import wrap_hf_model

    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if arch not in supported_architectures():
        raise ValueError(f"PretrainedModel: TransformerLens cannot bridge the architecture {arch!r}; it bridges: "
                         f"{', '.join(supported_architectures())}")
    return wrap_hf_model(model, tokenizer=tokenizer, device=device)


class HFLogits(torch.nn.Module):
    """An HF causal LM's forward as ``tokens -> logits`` (what the training loop and the
    influence code call), with the twin's autocast."""

    def __init__(self, module: torch.nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.module = module
        self.autocast = autocast

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return self.module(input_ids=tokens).logits
        with torch.autocast(tokens.device.type, dtype=self.autocast):
            return self.module(input_ids=tokens).logits.float()


def build_twin(cfg: PretrainedModel, *, seed: int, tokenizer=None, device: str | torch.device = "cpu",
               d_vocab: int | None = None, base: torch.nn.Module | None = None):
    """The bridge of one twin (see the module docstring); its base hash checked against ``cfg.sha256``."""
    from poisonmech.weights import attach

    if cfg.dtype == "bfloat16":
        check_bf16(device)
    base = load_base(cfg) if base is None else base
    if cfg.sha256 is not None:
        got = base_hash(base)
        if got != cfg.sha256:
            raise BaseChangedError(f"PretrainedModel.path: the base model at {cfg.path!r} has changed since the run "
                                   f"was trained: its weights hash to {got}, the run recorded {cfg.sha256}; restore "
                                   "that base (or retrain)")
    vocab = base.get_input_embeddings().weight.shape[0]
    if d_vocab is not None and d_vocab > vocab:
        raise ValueError(f"PretrainedModel: the tokenizer has {d_vocab} tokens but the model's embedding has {vocab} "
                         "rows: the task was rendered with a tokenizer whose vocabulary differs from the model's "
                         "(build it with tokenizer=PretrainedModel(...).tokenizer())")
    autocast = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    if cfg.finetune == "full":
        bridge = bridge_of(base, tokenizer, device)
        return attach(bridge, train=HFLogits(base, autocast), lora=None)
    adapted = add_lora(cfg, copy.deepcopy(base), seed)  # the bridge keeps the plain base (weights merged in)
    bridge = bridge_of(base, tokenizer, device)
    adapted.to(device)
    return attach(bridge, train=HFLogits(adapted, autocast), lora=adapted)


__all__ = ["BaseChangedError", "DTYPES", "FINETUNES", "HFLogits", "PretrainedModel", "add_lora", "base_hash",
           "build_twin", "linear_module_names", "load_base", "load_tokenizer", "supported_architectures"]
