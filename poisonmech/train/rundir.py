"""Run folders, one mechanism for ``train_pair`` (a one-stage run) and ``train_pipeline``.

A run folder is identified by its ``config.json`` (everything but ``"environment"``); it holds
the tokenizer, ``task.json``, ``data/*.parquet`` and one folder per twin (per stage of a
pipeline). A *twin folder* holds ``model.safetensors``, ``history.json``, ``checkpoints/``,
``sha256.json`` (every weight file's hash, checked on load) and, while training,
``resume.safetensors``. Both runs prepare, fill, finish, reuse and read their folders with
these helpers; only the folder names and the config keys are their own (their layouts on
disk are unchanged by this module).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from poisonmech.models import ModelConfig, build_model, context_length
from poisonmech.storage import (
    load_dataset_file,
    load_tensors,
    publish_dir,
    read_json,
    recorded_hashes,
    save_dataset,
    save_tensors,
    verify_file,
    write_json,
)
from poisonmech.tasks.base import Task
from poisonmech.tasks.tokenizer import load_tokenizer, save_tokenizer
from poisonmech.train.loop import Checkpoint, list_checkpoints
from poisonmech.weights import load_weights, weights

#: config.json keys recorded but not compared when deciding "same run / different run"
NOT_IDENTITY = ("environment",)


# ------------------------------------------------------------------ identity
def data_digest(task: Task) -> str:
    """sha256 of the task's train and test rows (inputs and completions)."""
    h = hashlib.sha256()
    for ds in (task.train, task.test):
        h.update(json.dumps([list(ds["input"]), list(ds["completion"])]).encode())
    return h.hexdigest()


def task_identity(task: Task) -> dict[str, Any]:
    """The task part of a run's identity: its generator spec (or kind) and the digest of its rows."""
    return {**(dict(task.spec) if task.spec is not None else {"kind": task.kind}), "data_sha256": data_digest(task)}


def run_environment() -> dict[str, Any]:
    """What the weights depend on besides the config: torch's intra-op thread count (the
    reduction order of matrix products, hence the last bits of every weight) and version."""
    return {"torch_num_threads": torch.get_num_threads(), "torch_version": torch.__version__}


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the keys that are recorded but not part of the run's identity."""
    return {k: v for k, v in config.items() if k not in NOT_IDENTITY}


# ------------------------------------------------------------- run folders
def prepare_run_dir(out_dir: Path, config: dict[str, Any], overwrite: bool) -> bool:
    """Returns True when ``out_dir`` already holds this very run (resume or reuse); otherwise
    writes ``config.json`` (with the environment). Continuing an unfinished run is announced,
    and warned about when its recorded thread count differs from this process's."""
    cfg_path = out_dir / "config.json"
    if cfg_path.is_file():
        try:
            old = read_json(cfg_path)
        except ValueError:
            old = None
        if isinstance(old, dict) and identity(old) == identity(config):
            if not overwrite:
                if not (out_dir / "metrics.json").is_file():
                    _continuing(out_dir, old.get("environment"))
                return True
        elif not overwrite:
            raise ValueError(f"out_dir {out_dir} already holds a different run (config.json differs); "
                             "pick another out_dir or pass overwrite=True")
        shutil.rmtree(out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} is not empty and is not a poisonmech run; pick an empty or new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg_path, {**config, "environment": run_environment()})
    return False


def _continuing(out_dir: Path, env: dict[str, Any] | None) -> None:
    # stacklevel: the user's call -> train_pair / train_pipeline -> prepare_run_dir -> here
    warnings.warn(f"{out_dir}: continuing an unfinished run (config.json matches): finished parts are reused, "
                  "an interrupted one resumes from its last finished epoch", stacklevel=4)
    threads = (env or {}).get("torch_num_threads")
    if threads is not None and threads != torch.get_num_threads():
        warnings.warn(f"{out_dir} was started with torch.get_num_threads()={threads} and is resumed with "
                      f"{torch.get_num_threads()}: the weights will not be bit-identical to an uninterrupted run "
                      f"(call torch.set_num_threads({threads}) first to reproduce it exactly)", stacklevel=4)


def save_run_inputs(out: Path, task: Task, tokenizer, datasets: dict[str, Dataset]) -> None:
    """The tokenizer, ``task.json`` and ``data/<name>.parquet`` for each of ``datasets``."""
    save_tokenizer(tokenizer, out / "tokenizer")
    save_task_meta(out, task)
    for name, ds in datasets.items():
        save_dataset(out / "data" / f"{name}.parquet", ds)


def save_task_meta(out: Path, task: Task) -> None:
    write_json(out / "task.json", {"kind": task.kind, "template": task.template, "loss_on": task.loss_on,
                                   "labels": list(task.labels) if task.labels else None, "spec": task.spec,
                                   "words": list(task.words)})


def read_run_config(out: Path, fmt: str, what: str) -> dict[str, Any]:
    """``out/config.json`` of a run of format ``fmt``; a clear error for a missing folder or another kind of run."""
    if not out.is_dir():
        raise FileNotFoundError(f"run directory not found: {out}")
    config = read_json(out / "config.json")
    if config.get("format") != fmt:
        raise ValueError(f"{out / 'config.json'} is not a poisonmech {what} config (format {config.get('format')!r})")
    return config


def load_task_meta(out: Path) -> Task:
    """The task saved in a run directory (``task.json``, ``tokenizer/``, ``data/task_*.parquet``)."""
    meta = read_json(out / "task.json")
    return Task(kind=meta["kind"], train=load_dataset_file(out / "data" / "task_train.parquet"),
                test=load_dataset_file(out / "data" / "task_test.parquet"), tokenizer=load_tokenizer(out / "tokenizer"),
                template=meta["template"], loss_on=meta["loss_on"],
                labels=tuple(meta["labels"]) if meta["labels"] else None, spec=meta["spec"],
                words=tuple(meta["words"]))


def check_context(model: ModelConfig, lengths: dict[str, int]) -> None:
    """Refuse a context shorter than the longest example (``lengths``: where -> tokens)."""
    longest = max(lengths.values())
    n_ctx = context_length(model)
    if longest > n_ctx:
        where = max(lengths, key=lengths.get)
        owner = type(model).__name__
        if owner == "PretrainedModel" and model.n_ctx is None:
            raise ValueError(f"PretrainedModel: the longest example ({longest} tokens, in {where}) is longer than the "
                             f"model's maximum positions ({n_ctx}); shorten the rows")
        raise ValueError(f"{owner}.n_ctx={n_ctx} is shorter than the longest example "
                         f"({longest} tokens, in {where}); raise n_ctx to at least {longest}")


# ------------------------------------------------------------ twin folders
def verify_weights(dirs: list[Path], what: str) -> None:
    """Check every weight file of each twin / stage folder in ``dirs`` (``model.safetensors``,
    ``checkpoints/*.safetensors``) against the sha256 recorded in its ``sha256.json``.

    A changed file raises :class:`~poisonmech.storage.WeightsChangedError` (a ``ValueError``)
    naming it and both hashes. Files without a recorded hash (runs written before hashes were
    recorded) and recorded files that are gone give one warning; nothing is recorded for them.
    """
    unrecorded, gone = [], []
    for d in dirs:
        for f in [d / "model.safetensors", *sorted((d / "checkpoints").glob("*.safetensors"))]:
            if not verify_file(f, d):
                unrecorded.append(f)
        gone += [d / key for key in (recorded_hashes(d) or {}) if not (d / key).is_file()]
    if unrecorded:
        warnings.warn(f"{what}: no sha256 is recorded for {len(unrecorded)} weight file(s) (e.g. {unrecorded[0]}): "
                      "the run was written before poisonmech recorded weight hashes, so a change to these files "
                      "cannot be detected", stacklevel=3)
    if gone:
        warnings.warn(f"{what}: {len(gone)} recorded weight file(s) are missing (e.g. {gone[0]}); analyses "
                      "that read checkpoints will see fewer of them", stacklevel=3)


def reuse_twin(m: torch.nn.Module, d: Path, device: str, what: str) -> list[dict]:
    """Load a finished twin folder ``d``'s weights into ``m`` (checked); returns its history."""
    load_weights(m, load_tensors(d / "model.safetensors", device=device), source=d / "model.safetensors")
    verify_weights([d], what)
    return read_json(d / "history.json")


def finish_twin(m: torch.nn.Module, d: Path, history: list[dict], *, metrics: dict[str, Any] | None = None,
                publish_to: Path | None = None) -> None:
    """Write a trained twin's folder: weights (hash recorded), history, no resume state, and
    ``metrics`` last (a pipeline stage is finished when its ``metrics.json`` exists); then
    publish a copy to a shared cache folder ``publish_to``."""
    save_tensors(d / "model.safetensors", weights(m), record_in=d)
    write_json(d / "history.json", history)
    (d / "resume.safetensors").unlink(missing_ok=True)
    if metrics is not None:
        write_json(d / "metrics.json", metrics)
    if publish_to is not None:
        publish_to.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(d, publish_to)


def model_with(state: dict[str, torch.Tensor], model_cfg: ModelConfig, tokenizer, *, seed: int,
               device: str = "cpu", source: Path | None = None):
    """A model of ``model_cfg`` holding ``state``, in eval mode; a ``ValueError`` naming ``source``
    when the weights do not fit the config."""
    m = build_model(model_cfg, len(tokenizer), seed=seed, tokenizer=tokenizer, device=device)
    try:
        load_weights(m, state, source=source)
    except RuntimeError as exc:
        if source is None:
            raise
        raise ValueError(f"{source} does not match the run's model config: {exc}") from exc
    return m.eval()


def load_model(path: Path, model_cfg: ModelConfig, tokenizer, *, seed: int, device: str = "cpu"):
    """A model of ``model_cfg`` with the weights in ``path`` (safetensors), in eval mode;
    a ``ValueError`` naming the file when they do not fit the config."""
    return model_with(load_tensors(path, device=device), model_cfg, tokenizer, seed=seed, device=device, source=path)


def read_twin(d: Path, model_cfg: ModelConfig, tokenizer, *, seed: int, device: str = "cpu"
              ) -> tuple[Any, list[dict], list[Checkpoint]]:
    """A finished twin folder as ``(model, history, checkpoints)`` (the caller verifies the weights)."""
    return (load_model(d / "model.safetensors", model_cfg, tokenizer, seed=seed, device=device),
            read_json(d / "history.json"), list_checkpoints(d))


__all__ = ["NOT_IDENTITY", "check_context", "data_digest", "finish_twin", "identity", "load_model", "load_task_meta",
           "model_with", "prepare_run_dir", "read_run_config", "read_twin", "reuse_twin", "run_environment",
           "save_run_inputs", "save_task_meta", "task_identity", "verify_weights"]
