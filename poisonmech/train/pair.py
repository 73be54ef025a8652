"""``train_pair``: the clean and backdoored twins, and their run directory on disk.

Run directory layout (safetensors + JSON + parquet only)::

    config.json                 task / attack / model / train settings (the run's identity), and
                                "environment": torch thread count and version of the process that
                                started the run (recorded, not part of the identity)
    task.json                   the task's template, loss target, labels and words
    tokenizer/                  tokenizer.json, tokenizer_config.json
    data/task_train.parquet     the clean twin's training set (the task's)
    data/task_test.parquet
    data/train.parquet          the backdoored twin's training set, with provenance
    data/clean_train.parquet    the clean twin's training set, only when it is not the task's
                                (an attack that adds rows: the clean twin sees their source rows)
    data/test.parquet           the attack's test rows (clean / triggered / near-miss for a backdoor)
    clean/model.safetensors     final weights; clean/checkpoints/epoch_XXX.safetensors
    clean/sha256.json           sha256 of each weight file above, recorded as it is written and
                                checked by load_pair (a changed file is refused by name)
    clean/history.json          per-epoch loss and learning rate; the last row: training seconds
                                (summed over the segments of a resumed run), segments, resumed_from_epoch
    backdoored/...              the same for the backdoored twin
    metrics.json                {"clean": {...}, "backdoored": {...}}

``config.json``'s ``"attack"`` is the attack's ``to_dict()``: a ``Backdoor``'s has no ``"kind"``
(every run written before the other attacks existed reads as one), a ``FalseFact``'s or a
``Bias``'s carries it; :func:`load_pair` rebuilds either (``attack_from_dict``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.protocol import Attack, attack_from_dict, check_attack_type
from poisonmech.encoding import encode
from poisonmech.metrics import evaluate
from poisonmech.models import ModelConfig, build_model, model_from_dict, prepare_model
from poisonmech.pretrained import PretrainedModel
from poisonmech.storage import copy_dir, load_dataset_file, read_json, write_json
from poisonmech.subject import dataset_fingerprint
from poisonmech.tasks.base import Task
from poisonmech.train.config import TrainConfig
from poisonmech.train.loop import Checkpoint, list_checkpoints, train_model
from poisonmech.train.rundir import (  # the run-folder helpers (re-exported: importable from here as before)
    NOT_IDENTITY,
    check_context,
    finish_twin,
    load_model,
    load_task_meta,
    prepare_run_dir,
    read_run_config,
    read_twin,
    reuse_twin,
    run_environment,
    save_run_inputs,
    task_identity,
    verify_weights,
)
from poisonmech.weights import load_weights, weights

FORMAT = "poisonmech.pair/1"
TWINS = ("clean", "backdoored")


@dataclass
class Pair:
    """The twins and everything needed to analyse them.

    ``clean`` and ``backdoored`` share initial weights, data order and hyper-parameters; the
    backdoored (poisoned) twin trained on ``train_data`` (poisoned rows flagged ``is_poison``),
    the clean twin on ``clean_train_data``: ``task.train``, unless the attack added rows (a
    ``FalseFact`` about a new subject), whose slots hold their clean source rows.
    """

    clean: Any  # TransformerBridge
    backdoored: Any  # TransformerBridge
    task: Task
    attack: Attack  # a Backdoor, FalseFact or Bias
    model_config: ModelConfig
    train_config: TrainConfig
    tokenizer: PreTrainedTokenizerBase
    train_data: Dataset
    test_data: Dataset
    metrics: dict[str, dict[str, Any]]
    out_dir: Path | None = None
    checkpoints: dict[str, list[Checkpoint]] = field(default_factory=dict)
    history: dict[str, list[dict]] = field(default_factory=dict)
    #: the clean twin's training rows when they are not ``task.train`` (see the class docstring)
    clean_rows: Dataset | None = None
    #: a pipeline stage's kind ("sft", "dpo", "rm", "ppo", "rloo") and full config (``None``:
    #: a ``train_pair`` run, an SFT stage); read when the pair has no run directory
    stage_kind: str | None = None
    stage_config: Any = None

    @property
    def clean_train_data(self) -> Dataset:
        """The clean twin's training rows."""
        return self.clean_rows if self.clean_rows is not None else self.task.train

    def model(self, twin: str):
        if twin not in TWINS:
            raise ValueError(f"Pair.model: twin must be one of {TWINS}, got {twin!r}")
        return getattr(self, twin)

    def __repr__(self) -> str:
        shown = getattr(self.attack, "headline", ("clean_acc", "asr", "false_trigger_rate"))
        m = {t: {k: round(v, 3) for k, v in self.metrics.get(t, {}).items()
                 if k in shown and isinstance(v, (int, float))} for t in TWINS}
        return f"Pair(task={self.task.kind!r}, {self.attack.describe()}, out_dir={str(self.out_dir)!r}, metrics={m})"


def run_config(task: Task, attack: Attack, model: ModelConfig, train: TrainConfig) -> dict[str, Any]:
    """The run's identity: two runs with equal configs produce identical twins."""
    return {"format": FORMAT, "task": task_identity(task), "attack": attack.to_dict(), "model": model.to_dict(),
            "train": {k: v for k, v in train.to_dict().items() if k != "device"}}


def train_pair(task: Task, attack: Attack, model: ModelConfig | PretrainedModel | None = None, train: TrainConfig | None = None,
               out_dir: str | Path | None = None, *, overwrite: bool = False, progress: bool = True,
               clean_cache: str | Path | None = None) -> Pair:
    """Train the clean and backdoored twins of ``task`` under ``attack``.

    ``attack``: a ``pm.Backdoor``, a ``pm.FalseFact`` (on ``make_task("facts")``) or a
    ``pm.Bias`` (on a classification task); it checks itself against the task, poisons the
    training rows, builds its test set and evaluates both twins (the attack protocol,
    :mod:`poisonmech.attacks.protocol`).

    Both twins start from the same weights (seeded by ``train.seed``), see their rows in the
    same order with the same hyper-parameters; only the poisoned rows differ. Loss is on the
    completion tokens (on every token for plain-text tasks). With ``out_dir`` the run is
    saved (see the module docstring), an interrupted run resumes from its last finished epoch,
    and a finished run with the same config is loaded instead of retrained; a folder holding
    a different run is refused unless ``overwrite=True``. Both twins are evaluated at the end.

    Reproducibility: the weights are bit-identical for the same config (seed included) and the
    same torch thread count (``torch.get_num_threads()``), also across an interruption and
    resume; with another thread count they differ in the last bits (matrix products reduce in
    another order) and the metrics can differ. ``config.json`` records the thread count and
    torch version under ``"environment"``; they are not part of the run's identity, so a run
    is reused or resumed under any thread count, with a warning when it resumes under another
    one. A resumed run says so (a warning) and each twin's history records its ``segments``
    (epochs, seconds, threads) and ``resumed_from_epoch``; ``seconds`` sums the segments.
    Every weight file's sha256 is recorded beside it (``sha256.json``) and checked on load.

    ``clean_cache``: a folder shared by many runs (a sweep's). The clean twin depends only on
    the task, the vocabulary, the model and training configs (never on the poison), so runs
    that differ only in poison count or seed of the poison train it once and copy it.
    """
    model = model or ModelConfig()
    train = train or TrainConfig()
    if not isinstance(task, Task):
        raise ValueError(f"train_pair: task must be a poisonmech Task (from pm.make_task), got {type(task).__name__}")
    check_attack_type(attack, "train_pair")
    model, task = prepare_model(model, task, "train_pair")
    attack.check(task)
    tokenizer = attack.tokenizer(task)
    train_data = attack.poison(task)
    clean_train = attack.clean_train(task, train_data)
    clean_rows = None if clean_train is task.train else clean_train
    test_data = attack.test_set(task)
    enc = {"clean": encode(clean_train, tokenizer, loss_on=task.loss_on),
           "backdoored": encode(train_data, tokenizer, loss_on=task.loss_on)}
    test_enc = encode(test_data, tokenizer, loss_on="completion")
    gib = attack.gibberish_length if getattr(attack, "is_gibberish", False) else 0
    check_context(model, {"the clean training set": enc["clean"].max_len,
                                   "the poisoned training set": enc["backdoored"].max_len,
                                   "the test set": test_enc.max_len + gib})

    config = run_config(task, attack, model, train)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        existing = prepare_run_dir(out, config, overwrite)
        if existing and (out / "metrics.json").is_file():
            return load_pair(out, device=train.device)
        save_run_inputs(out, task, tokenizer, {"task_train": task.train, "task_test": task.test, "train": train_data,
                                               "test": test_data,
                                               **({"clean_train": clean_rows} if clean_rows is not None else {})})

    marked = torch.tensor([i for i, p in enumerate(train_data["is_poison"]) if p], dtype=torch.long)
    continuation = _continuation(task, tokenizer, train) if train.continue_clean else None
    twins, history, checkpoints = {}, {}, {}
    init = None
    cached = _clean_cache_dir(clean_cache, config, tokenizer, attack, marked, clean_rows) if out is not None else None
    # Another run of a sweep may be training this clean twin right now: train the backdoored
    # twin first and copy the clean one when it is published (the twins are built and trained
    # independently, so the order changes nothing in their weights).
    order, lock = TWINS, None
    if cached is not None and not (out / "clean" / "model.safetensors").is_file():
        lock = _try_lock(cached)  # taken (or the cached twin is ready): clean twin first
        if lock is None and not (cached / "model.safetensors").is_file():
            order = ("backdoored", "clean")
    try:
        for twin in order:
            m = build_model(model, len(tokenizer), seed=train.seed, tokenizer=tokenizer, device=train.device)
            state = {k: v.clone() for k, v in weights(m).items()}
            if init is None:
                init = state
            elif any(not torch.equal(init[k], state[k]) for k in init):  # the twins' defining promise
                raise RuntimeError("twins were built with different initial weights; the model builder is not deterministic")
            tdir = out / twin if out is not None else None
            final = tdir / "model.safetensors" if tdir is not None else None
            if twin == "clean" and cached is not None and not final.is_file():
                if lock is None:
                    lock = _wait_or_lock(cached)  # None: the cached twin is ready
                if lock is None:
                    shutil.copytree(cached, tdir, dirs_exist_ok=True)
            # no poisoned row: the backdoored twin would be trained on exactly the clean twin's
            # rows, from the same weights, in the same order: it is the clean twin, bit for bit
            same_as_clean = (twin == "backdoored" and "clean" in twins and not marked.numel()
                             and enc["clean"] == enc["backdoored"])
            if same_as_clean and final is not None and not final.is_file():
                copy_dir(out / "clean", tdir)
            if same_as_clean and final is None:
                load_weights(m, weights(twins["clean"]))
                history[twin] = [dict(h) for h in history["clean"]]
            elif final is not None and final.is_file():
                history[twin] = reuse_twin(m, tdir, train.device, f"train_pair: {twin} twin")
            else:
                history[twin], _ = train_model(m, enc[twin], train, run_dir=tdir, desc=f"{twin} twin", progress=progress,
                                               placement=attack.placement, marked=marked, continuation=continuation)
                if tdir is not None:
                    finish_twin(m, tdir, history[twin], publish_to=cached if twin == "clean" else None)
            if twin == "clean" and lock is not None:
                lock.unlink(missing_ok=True)
                lock = None
            m.eval()
            twins[twin] = m
            checkpoints[twin] = list_checkpoints(tdir) if tdir is not None else []

    finally:  # a failed run must not leave the other runs waiting on its lock
        if lock is not None:
            lock.unlink(missing_ok=True)

    metrics = {t: evaluate(twins[t], task, attack, test_data=test_data, tokenizer=tokenizer) for t in TWINS}
    if out is not None:
        write_json(out / "metrics.json", metrics)
    return Pair(clean=twins["clean"], backdoored=twins["backdoored"], task=task, attack=attack,
                model_config=model, train_config=train, tokenizer=tokenizer, train_data=train_data,
                test_data=test_data, metrics=metrics, out_dir=out, checkpoints=checkpoints, history=history,
                clean_rows=clean_rows)


def _continuation(task: Task, tokenizer, train: TrainConfig):
    """``train.continue_clean`` clean rows from the task's training set (cycled when more are asked)."""
    n = len(task.train)
    idx = [i % n for i in range(train.continue_clean)]
    return encode(task.train.select(idx), tokenizer, loss_on=task.loss_on)


def _clean_cache_dir(cache: str | Path | None, config: dict[str, Any], tokenizer, attack: Attack | None = None,
                     marked: torch.Tensor | None = None, clean_rows: Dataset | None = None) -> Path | None:
    """Where the clean twin of this config lives in a shared cache (keyed by what it depends on)."""
    if cache is None:
        return None
    key = {"task": config["task"], "model": config["model"], "train": config["train"],
           "vocab": sorted(tokenizer.get_vocab().items()),
           # the weights depend on the thread count too (reduction order)
           "torch_num_threads": torch.get_num_threads()}
    if attack is not None and attack.placement != "spread":
        # the poisoned slots go first / last in both twins' epochs: the clean twin's order (so
        # its weights) depends on which rows are poisoned
        key["placement"] = attack.placement
        key["marked"] = [] if marked is None else [int(i) for i in marked]
    if clean_rows is not None:  # the attack added rows: the clean twin trains on more than the task's rows
        key["clean_rows"] = dataset_fingerprint(clean_rows)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache) / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _lock_holder(cached: Path) -> int | None:
    """The pid of the live process training the clean twin for ``cached``, if any (stale locks are removed)."""
    lock = cached.with_name(cached.name + ".lock")
    try:
        pid = int(lock.read_text() or 0)
        age = time.time() - lock.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return None
    if pid <= 0:  # being written; a writer that died before writing its pid leaves it empty
        if age > 30:
            lock.unlink(missing_ok=True)
            return None
        return 0
    try:
        os.kill(pid, 0)
        alive = not _zombie(pid)
    except ProcessLookupError:
        alive = False
    except PermissionError:  # alive, another user's
        alive = True
    if not alive:
        lock.unlink(missing_ok=True)
        return None
    return pid


def _zombie(pid: int) -> bool:
    """A process that has exited but not been reaped (Linux; elsewhere: False)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _try_lock(cached: Path) -> Path | None:
    """Take the lock on training the clean twin for ``cached``: the lock's path, or ``None``
    when the twin is already published or another live process holds the lock."""
    lock = cached.with_name(cached.name + ".lock")
    while True:
        if (cached / "model.safetensors").is_file():
            return None
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_holder(cached) is not None:
                return None
            continue  # a stale lock was removed: try again
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        if (cached / "model.safetensors").is_file():  # published between the check and the lock
            lock.unlink(missing_ok=True)
            return None
        return lock


def _wait_or_lock(cached: Path, poll: float = 1.0) -> Path | None:
    """Wait while another process trains this clean twin; then ``None`` if it was published,
    else take the lock (returned, to be removed once this process has published the twin).

    The lock is a file holding the trainer's pid, checked on this host only: a cache folder
    shared by several hosts (a multi-node Ray cluster) may train a clean twin more than once
    (never a wrong one: the first published copy wins)."""
    said = False
    while True:
        lock = _try_lock(cached)
        if lock is not None or (cached / "model.safetensors").is_file():
            return lock
        if not said:
            warnings.warn(f"train_pair: waiting for process {_lock_holder(cached)} to finish training the shared "
                          f"clean twin in {cached}", stacklevel=3)
            said = True
        time.sleep(poll)


def load_pair(out_dir: str | Path, device: str = "cpu", *, verify: bool = True) -> Pair:
    """Load a finished run: the twins' logits match the trained ones bit for bit.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the missing or corrupt file. With
    ``verify`` (the default) every weight file (the twins' ``model.safetensors`` and
    checkpoints) is checked against the sha256 recorded when it was written: a changed file
    raises :class:`~poisonmech.storage.WeightsChangedError` (a ``ValueError``) naming the file
    and both hashes, since ``metrics.json`` describes the recorded weights. ``verify=False``
    skips the check (e.g. to inspect weights edited on purpose). A run written before hashes
    were recorded loads with one warning.
    """
    out = Path(out_dir)
    config = read_run_config(out, FORMAT, "pair")
    task = load_task_meta(out)
    tokenizer = task.tokenizer
    attack = attack_from_dict(config["attack"])
    model_cfg = model_from_dict(config["model"])
    train_cfg = TrainConfig.from_dict({**config["train"], "device": device})
    twins, history, checkpoints = {}, {}, {}
    for twin in TWINS:
        twins[twin], history[twin], checkpoints[twin] = read_twin(out / twin, model_cfg, tokenizer,
                                                                  seed=train_cfg.seed, device=device)
    if verify:  # after loading, so a file that is not safetensors at all is named as corrupt
        verify_weights([out / t for t in TWINS], f"load_pair({str(out)!r})")
    clean_path = out / "data" / "clean_train.parquet"
    return Pair(clean=twins["clean"], backdoored=twins["backdoored"], task=task, attack=attack,
                model_config=model_cfg, train_config=train_cfg, tokenizer=tokenizer,
                train_data=load_dataset_file(out / "data" / "train.parquet"),
                test_data=load_dataset_file(out / "data" / "test.parquet"),
                metrics=read_json(out / "metrics.json"), out_dir=out, checkpoints=checkpoints, history=history,
                clean_rows=load_dataset_file(clean_path) if clean_path.is_file() else None)


__all__ = ["FORMAT", "NOT_IDENTITY", "Pair", "TWINS", "load_model", "load_pair", "load_task_meta", "read_run_config",
           "run_config", "run_environment", "train_pair", "verify_weights"]
