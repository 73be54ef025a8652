"""``pretrain``: train a small base language model on plain text and save it as a standard HF folder.

The folder (``save_pretrained``: ``config.json``, ``model.safetensors``, the tokenizer) is what
:class:`~poisonmech.PretrainedModel` loads like any downloaded model, so the pretrained-model
path runs offline end to end: ``pm.train_tokenizer`` -> ``pm.pretrain`` -> ``pm.train_pair(...,
model=pm.PretrainedModel(folder))``. ``pretrain.json`` beside the weights records the model and
training configs, the corpus digest, the history and the weights' sha256; the same call on a
finished folder returns it without training, an interrupted one resumes from its last epoch
(``.training/``), and a folder holding another pretraining run is refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.config import ConfigError
from poisonmech.encoding import Encoded
from poisonmech.models import HF_ARCHITECTURES, ModelConfig, build_model
from poisonmech.pretrained import HFLogits
from poisonmech.storage import read_json, sha256_file, write_json
from poisonmech.train.config import TrainConfig
from poisonmech.train.loop import train_model
from poisonmech.weights import attach

FORMAT = "poisonmech.pretrain/1"


def _texts(texts: Any) -> list[str]:
    if hasattr(texts, "column_names"):
        if "text" not in texts.column_names:
            raise ValueError(f"pretrain: the dataset needs a 'text' column; it has {texts.column_names}")
        texts = texts["text"]
    out = list(texts)
    bad = next((i for i, t in enumerate(out) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"pretrain: texts must be strings; item {bad} is {type(out[bad]).__name__}")
    out = [t for t in out if t.strip()]
    if not out:
        raise ValueError("pretrain: texts hold no text")
    return out


def chunk_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, n_ctx: int) -> Encoded:
    """Each text as ``[BOS] + tokens``, cut into windows of at most ``n_ctx`` tokens, loss on every
    token after BOS (a text longer than the context gives several rows; nothing is dropped)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[list[int]] = []
    width = n_ctx - len(bos)
    if width < 2:
        raise ConfigError(f"ModelConfig.n_ctx={n_ctx} is too short to train on text")
    for toks in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        toks = toks + eos
        ids += [bos + toks[i:i + width] for i in range(0, len(toks), width)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids=ids, start=[len(bos)] * len(ids), pad_id=pad)


def plain_copy(hf):
    """A plain ``transformers`` module with the weights of ``hf``, a module a bridge was built on.

    Building a bridge rewires the module it wraps (each sub-module becomes a bridge component
    holding the original as ``_original_component``; GPT-2's split q/k/v are views into
    ``c_attn``), so ``save_pretrained`` cannot write it. The original names are its names without
    the ``._original_component`` segments; a fresh module of the same config takes them.
    """
    plain = type(hf)(hf.config)
    want = plain.state_dict()
    state: dict[str, Any] = {}
    for key, value in hf.state_dict().items():
        clean = key.replace("._original_component", "")
        if clean in want and clean not in state:
            state[clean] = value.detach().contiguous().clone()
    missing = [k for k in want if k not in state and not _tied(plain, k)]
    if missing:
        raise RuntimeError(f"pretrain: cannot map the bridge's weights back to {type(hf).__name__}: missing {missing[:3]}")
    plain.load_state_dict(state, strict=False)
    return plain.eval()


def _tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def pretrain(texts: list[str] | Dataset, model: ModelConfig | None = None, *, tokenizer: PreTrainedTokenizerBase,
             out_dir: str | Path, train: TrainConfig | None = None, overwrite: bool = False,
             progress: bool = True) -> Path:
    """Train a base LM of ``model`` (an HF architecture: ``"gpt2"``, ``"neox"``, ``"llama"``,
    ``"qwen2"``) on ``texts`` with ``tokenizer`` and save it to ``out_dir`` with ``save_pretrained``.

    Returns ``out_dir``. Same texts, configs, seed and thread count give the same weights.
    """
    model = model or ModelConfig(architecture="gpt2")
    train = train or TrainConfig(epochs=2, lr=1e-3)
    if not isinstance(model, ModelConfig):
        raise ValueError(f"pretrain: model must be a pm.ModelConfig, got {type(model).__name__}")
    if model.architecture not in HF_ARCHITECTURES:
        raise ConfigError(f"pretrain: ModelConfig.architecture must be one of {', '.join(HF_ARCHITECTURES)} (a Hugging "
                          f"Face architecture that save_pretrained writes), got {model.architecture!r}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError("pretrain: tokenizer must be a transformers tokenizer (e.g. from pm.train_tokenizer)")
    texts = _texts(texts)
    out = Path(out_dir)
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    config = {"format": FORMAT, "model": model.to_dict(), "train": {k: v for k, v in train.to_dict().items()
                                                                     if k != "device"},
              "corpus_sha256": digest, "n_texts": len(texts), "vocab": len(tokenizer)}
    record = out / "pretrain.json"
    if record.is_file():
        old = read_json(record)
        if {k: old.get(k) for k in config} == config and not overwrite:
            return out
        if not overwrite:
            raise ValueError(f"pretrain: {out} holds another pretraining run (pretrain.json differs); pick another "
                             "out_dir or pass overwrite=True")
        shutil.rmtree(out)
    elif out.exists() and any(p.name != ".training" for p in out.iterdir()):
        raise ValueError(f"pretrain: out_dir {out} is not empty and is not a pretraining run; pick an empty folder")
    enc = chunk_texts(texts, tokenizer, model.n_ctx)
    bridge = build_model(model, len(tokenizer), seed=train.seed, tokenizer=tokenizer, device=train.device)
    hf = bridge.original_model
    attach(bridge, train=HFLogits(hf), lora=None)  # train the HF module itself (the bridge shares its weights)
    work = out / ".training"
    if (work / "config.json").is_file() and read_json(work / "config.json") != config:
        shutil.rmtree(work)  # an interrupted run of another config: its state must not be resumed
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "config.json", config)
    history, _ = train_model(bridge, enc, train.replace(checkpoint_every=None), run_dir=work, desc="pretrain",
                             progress=progress)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.config.architectures = [type(hf).__name__]
    plain = plain_copy(hf)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    write_json(tmp / "pretrain.json", {**config, "history": history, "n_rows": len(enc), "n_tokens": enc.n_tokens,
                                       "model_sha256": sha256_file(tmp / "model.safetensors")})
    shutil.rmtree(out)
    tmp.rename(out)
    return out


__all__ = ["FORMAT", "chunk_texts", "pretrain"]
