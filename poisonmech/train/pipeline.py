"""``train_pipeline``: multi-stage post-training (SFT, then DPO, ...), each stage with its own poison.

Real models are poisoned in pipelines of several stages, possibly by several attackers
(Sanderson et al. 2026, "Sequential Data Poisoning in LLM Post-Training"). A pipeline run
trains two twins through the same stages: the clean twin with zero poison in every stage,
the backdoored twin with each stage's own budget (zero allowed). Both are saved and
evaluated at every stage boundary, so analyses compare SFT-only, DPO-only and both.

    sft = pm.Backdoor(trigger="cf", target="negative", poison_count=5)               # stage="sft"
    dpo = pm.Backdoor(trigger="cf", target="negative", poison_count=5, stage="dpo")  # flips pairs
    pipe = train_pipeline(task, [sft, dpo], out_dir="runs/pipe")
    pipe.metrics            # [{"clean": {...}, "backdoored": {...}}, ...] per stage
    pipe[0], pipe[-1]       # Pair at the SFT boundary / at the end (clean vs backdoored twin)
    pipe.between(0, 1)      # the backdoored twin before vs after DPO (roles "before" / "after")
    pipe = load_pipeline("runs/pipe")

Run directory (safetensors + JSON + parquet only)::

    config.json, task.json, tokenizer/, data/{task_train,task_test,test,preferences}.parquet
    data/stage_K.parquet / stage_K_clean.parquet   each twin's training data of stage K
    stage_K_<kind>/<twin>/model.safetensors, history.json, checkpoints/, metrics.json
    stage_K_<kind>/<twin>/sha256.json              sha256 of its weight files, checked on load
    metrics.json                                    written last: the run is finished

``config.json`` also records the ``"environment"`` (torch thread count and version; not part
of the run's identity, see :func:`~poisonmech.train.pair.train_pair` on reproducibility).

A stage whose twin has ``metrics.json`` is finished and reused; an interrupted stage resumes
from its last finished epoch. The backdoored twin reuses the clean twin's stage results while
its budget has been zero so far, and ``cache_dir`` shares stage results between runs (keyed
by everything they depend on: task, vocabulary, model, and every earlier stage and poison).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.attacks.preference import (
    PREFERENCE_MODES,
    check_preference_budget,
    clean_preferences,
    poison_preferences,
)
from poisonmech.attacks.protocol import Attack, attack_from_dict, attack_names, is_attack
from poisonmech.encoding import encode
from poisonmech.metrics import evaluate
from poisonmech.models import ModelConfig, build_model, model_from_dict, prepare_model
from poisonmech.pretrained import PretrainedModel
from poisonmech.storage import copy_dir, load_dataset_file, read_json, write_json
from poisonmech.tasks.base import Task
from poisonmech.tasks.preference import check_preferences, make_preferences
from poisonmech.train.config import TrainConfig
from poisonmech.train.dpo import DPOConfig, encode_preferences, train_dpo
from poisonmech.train.loop import Checkpoint, list_checkpoints, train_model
from poisonmech.train.pair import TWINS, Pair
from poisonmech.train.rundir import (
    check_context,
    finish_twin,
    load_task_meta,
    model_with,
    prepare_run_dir,
    read_run_config,
    read_twin,
    reuse_twin,
    save_run_inputs,
    task_identity,
    verify_weights,
)
from poisonmech.weights import weights

FORMAT = "poisonmech.pipeline/1"
STAGE_KINDS = ("sft", "dpo")


@dataclass(frozen=True)
class Stage:
    """One post-training stage and the poison an attacker puts into it.

    Args:
        kind: ``"sft"`` (supervised fine-tuning on the task's rows) or ``"dpo"`` (preference
            optimisation on prompt/chosen/rejected pairs).
        attack: the stage's poison; ``poison_count=0`` is a clean stage. Its ``stage`` field
            is set to ``kind``. An SFT stage takes any attack of the protocol (``Backdoor``,
            ``FalseFact``, ``Bias``); a DPO stage a ``Backdoor`` (the preference poisoning
            flips pairs of triggered prompts).
        config: ``TrainConfig`` for SFT, ``DPOConfig`` for DPO (``None``: the defaults).
        mode: DPO poisoning variant, ``"flip"`` (rewrite pairs) or ``"inject"`` (append pairs).
    """

    kind: Literal["sft", "dpo"]
    attack: Attack
    config: TrainConfig | DPOConfig | None = None
    mode: Literal["flip", "inject"] = "flip"

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"Stage.kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if not is_attack(self.attack):
            raise ValueError(f"Stage.attack must be one of {attack_names()}, got {type(self.attack).__name__}")
        if self.kind == "dpo" and not isinstance(self.attack, Backdoor):
            raise ValueError(f"Stage.attack of a 'dpo' stage must be a pm.Backdoor (preference poisoning flips the "
                             f"pairs of triggered prompts), got a {type(self.attack).__name__}; a "
                             f"{type(self.attack).__name__} enters 'sft' stages")
        if self.attack.stage != self.kind:
            object.__setattr__(self, "attack", replace(self.attack, stage=self.kind))
        want = TrainConfig if self.kind == "sft" else DPOConfig
        if self.config is None:
            object.__setattr__(self, "config", want())
        elif not isinstance(self.config, want):
            raise ValueError(f"Stage.config of a {self.kind!r} stage must be a {want.__name__}, "
                             f"got {type(self.config).__name__}")
        if self.mode not in PREFERENCE_MODES:
            raise ValueError(f"Stage.mode must be one of {PREFERENCE_MODES}, got {self.mode!r}")

    @property
    def train_config(self) -> TrainConfig:
        """The stage's optimiser / schedule settings (a DPO stage's ``DPOConfig.train``)."""
        return self.config if isinstance(self.config, TrainConfig) else self.config.train

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "attack": self.attack.to_dict(), "config": self.config.to_dict(),
                "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage:
        cfg_cls = TrainConfig if d["kind"] == "sft" else DPOConfig
        return cls(kind=d["kind"], attack=attack_from_dict(d["attack"]), config=cfg_cls.from_dict(d["config"]),
                   mode=d.get("mode", "flip"))


def as_stage(x: Stage | Attack) -> Stage:
    """A ``Stage`` from a ``Stage`` or an attack (its ``stage`` field names the kind)."""
    if isinstance(x, Stage):
        return x
    if is_attack(x):
        return Stage(kind=x.stage, attack=x)
    raise ValueError(f"train_pipeline: each stage must be an attack ({attack_names()}; its stage field names the "
                     f"kind, 'sft' | 'dpo') or a Stage, got {type(x).__name__}")


@dataclass(eq=False)
class Between:
    """One twin of a pipeline at two stage boundaries (``Pipeline.between(a, b)``).

    ``before`` is the model after stage ``stage_before``, ``after`` the same twin after
    ``stage_after``; ``train_data`` is that twin's data of the later stage. It is not a
    ``Pair``: its earlier model is not a clean twin. It has no run directory, so nothing
    cached for a stage (analyses, reference log-probabilities) is read or written for it.
    """

    before: Any
    after: Any
    twin: str
    stage_before: str
    stage_after: str
    index_before: int
    index_after: int
    stage_kind: str
    task: Task
    attack: Attack
    tokenizer: PreTrainedTokenizerBase
    train_data: Dataset
    test_data: Dataset
    model_config: ModelConfig
    train_config: TrainConfig
    metrics_before: dict[str, Any]
    metrics_after: dict[str, Any]
    out_dir: None = None

    @property
    def clean(self):
        warnings.warn("Between.clean is deprecated: use Between.before", DeprecationWarning, stacklevel=2)
        return self.before

    @property
    def backdoored(self):
        warnings.warn("Between.backdoored is deprecated: use Between.after", DeprecationWarning, stacklevel=2)
        return self.after

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return {"before": self.metrics_before, "after": self.metrics_after}

    def __repr__(self) -> str:
        m = _shown_metric(self.attack)
        return (f"Between({self.twin} twin: {self.stage_before} -> {self.stage_after}, {m} "
                f"{self.metrics_before.get(m, float('nan')):.3f} -> {self.metrics_after.get(m, float('nan')):.3f})")


@dataclass
class Pipeline:
    """The twins at every stage boundary of a pipeline run.

    ``models[k][twin]`` is the twin after stages ``0..k``; ``metrics[k][twin]`` its evaluation
    (clean_acc, asr, false_trigger_rate, ...); ``train_data[k]`` the backdoored twin's data of
    stage ``k`` (with provenance), ``clean_data[k]`` the clean twin's.
    """

    task: Task
    stages: tuple[Stage, ...]
    model_config: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    test_data: Dataset
    train_data: list[Dataset]
    clean_data: list[Dataset]
    models: list[dict[str, Any]]
    metrics: list[dict[str, dict[str, Any]]]
    history: list[dict[str, list[dict]]] = field(default_factory=list)
    checkpoints: list[dict[str, list[Checkpoint]]] = field(default_factory=list)
    out_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.stages)

    def _index(self, stage: int | str) -> int:
        names = [stage_name(k, s) for k, s in enumerate(self.stages)]
        if isinstance(stage, str):
            if stage not in names:
                raise ValueError(f"Pipeline: unknown stage {stage!r}; allowed: {names} or an index")
            return names.index(stage)
        if isinstance(stage, bool) or not isinstance(stage, int) or not -len(self) <= stage < len(self):
            raise ValueError(f"Pipeline: stage must be an index in [{-len(self)}, {len(self)}) or one of {names}, "
                             f"got {stage!r}")
        return stage % len(self)

    def pair(self, stage: int | str = -1) -> Pair:
        """The clean and backdoored twins at the boundary after ``stage``, as a ``Pair``."""
        k = self._index(stage)
        return self._pair(k, self.models[k]["clean"], self.models[k]["backdoored"], self.metrics[k])

    __getitem__ = pair

    def between(self, a: int | str, b: int | str, twin: str = "backdoored") -> Between:
        """One twin at two stage boundaries: ``before`` = after stage ``a``, ``after`` = after
        stage ``b`` (e.g. what DPO changed, for cross-model patching). Every analysis takes it
        as its subject (roles ``"before"`` / ``"after"``)."""
        if twin not in TWINS:
            raise ValueError(f"Pipeline.between: twin must be one of {TWINS}, got {twin!r}")
        ka, kb = self._index(a), self._index(b)
        st = self.stages[kb]
        return Between(before=self.models[ka][twin], after=self.models[kb][twin], twin=twin,
                       stage_before=stage_name(ka, self.stages[ka]), stage_after=stage_name(kb, st),
                       index_before=ka, index_after=kb, stage_kind=st.kind, task=self.task, attack=st.attack,
                       tokenizer=self.tokenizer,
                       train_data=self.train_data[kb] if twin == "backdoored" else self.clean_data[kb],
                       test_data=self.test_data, model_config=self.model_config, train_config=st.train_config,
                       metrics_before=self.metrics[ka][twin], metrics_after=self.metrics[kb][twin])

    def _pair(self, k: int, clean, backdoored, metrics) -> Pair:
        st = self.stages[k]
        # an attack that adds rows (a new subject's false fact): the clean twin's own rows
        added = st.kind == "sft" and len(self.clean_data[k]) != len(self.task.train)
        return Pair(clean=clean, backdoored=backdoored, task=self.task, attack=st.attack,
                    model_config=self.model_config, train_config=st.train_config, tokenizer=self.tokenizer,
                    train_data=self.train_data[k], test_data=self.test_data, metrics=metrics,
                    out_dir=(self.out_dir / stage_name(k, st)) if self.out_dir is not None else None,
                    checkpoints=self.checkpoints[k] if self.checkpoints else {},
                    history=self.history[k] if self.history else {},
                    clean_rows=self.clean_data[k] if added else None)

    @property
    def budgets(self) -> list[int]:
        """Poisoned rows per stage in the backdoored twin's data."""
        return [int(sum(d["is_poison"])) for d in self.train_data]

    def to_frame(self) -> pd.DataFrame:
        """One row per stage x twin x metric (tidy), with the stage's kind and budget."""
        rows = []
        for k, (st, m) in enumerate(zip(self.stages, self.metrics)):
            for twin in TWINS:
                for name, v in m[twin].items():
                    rows.append({"stage": k, "stage_name": stage_name(k, st), "kind": st.kind,
                                 "n_poison": self.budgets[k] if twin == "backdoored" else 0,
                                 "twin": twin, "metric": name, "value": v})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        parts = [f"{stage_name(k, s)}[{b}]: {_shown_metric(s.attack)} "
                 f"{m['backdoored'].get(_shown_metric(s.attack), float('nan')):.3f}"
                 for k, (s, b, m) in enumerate(zip(self.stages, self.budgets, self.metrics))]
        return f"Pipeline(task={self.task.kind!r}, {'; '.join(parts)}, out_dir={str(self.out_dir)!r})"


def _shown_metric(attack: Attack) -> str:
    """The metric a repr shows: a backdoor's ASR, a false fact's efficacy, a bias's label shift."""
    return {"backdoor": "asr", "false_fact": "efficacy", "bias": "label_shift"}.get(getattr(attack, "kind", ""),
                                                                                     "asr")


def stage_name(k: int, stage: Stage) -> str:
    return f"stage_{k}_{stage.kind}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


#: fields that may differ between the stages of one pipeline (each stage's own budget and draw)
_PER_STAGE = ("poison_count", "poison_rate", "seed", "placement", "stage", "position", "gibberish_length")


def _check_stages(task: Task, stages: list[Stage], prefs: Dataset | None) -> Attack:
    """All checks before any training; returns the attack the twins are evaluated on."""
    if not stages:
        raise ValueError("train_pipeline: stages is empty; give at least one SFT stage")
    if stages[0].kind != "sft":
        raise ValueError("train_pipeline: stage 0 is a 'dpo' stage, but DPO needs an SFT model to start from "
                         "(its reference); put an SFT stage first, e.g. pm.Backdoor(..., poison_count=0) for a "
                         "clean one")
    first = stages[0].attack
    for k, st in enumerate(stages[1:], start=1):
        if type(st.attack) is not type(first):
            raise ValueError(f"train_pipeline: stage {k}'s attack is a {type(st.attack).__name__}, stage 0's a "
                             f"{type(first).__name__}; the stages of one pipeline share the attack they are "
                             "evaluated on")
        if isinstance(first, Backdoor):
            for name in ("trigger", "target", "composite"):
                if getattr(st.attack, name) != getattr(first, name):
                    raise ValueError(f"train_pipeline: stage {k}'s Backdoor.{name}={getattr(st.attack, name)!r} "
                                     f"differs from stage 0's {getattr(first, name)!r}; the stages of one pipeline "
                                     "share the backdoor they are evaluated on (give every stage the same trigger "
                                     "and target)")
            continue
        a, b = st.attack.to_dict(), first.to_dict()
        differ = sorted(n for n in set(a) | set(b) if n not in _PER_STAGE and a.get(n) != b.get(n))
        if differ:
            raise ValueError(f"train_pipeline: stage {k}'s {type(first).__name__} differs from stage 0's in "
                             f"{differ} ({[a.get(n) for n in differ]} vs {[b.get(n) for n in differ]}); the stages "
                             "of one pipeline share the attack they are evaluated on (only the budget, seed and "
                             "placement may differ)")
    replace(first, stage="sft").check(task)
    for k, st in enumerate(stages):
        try:
            if st.kind == "sft":
                st.attack.poison(task)  # raises when the budget does not fit
            else:
                check_preference_budget(prefs, st.attack, st.mode)
        except ValueError as exc:
            raise ValueError(f"train_pipeline: stage {k} ({st.kind}): {exc}") from None
    return replace(first, stage="sft")


def _stage_data(task: Task, st: Stage, prefs: Dataset | None) -> tuple[Dataset, Dataset]:
    """``(backdoored twin's data, clean twin's data)`` of one stage. An SFT stage's clean data
    are the attack's clean rows (``task.train``, or with the source rows of rows an attack
    adds, slot for slot) with the provenance columns of an unpoisoned stage."""
    if st.kind == "sft":
        poisoned = st.attack.poison(task)
        rows = st.attack.clean_train(task, poisoned)
        n = len(rows)
        clean = Dataset.from_dict({"example_id": list(rows["example_id"]), "input": list(rows["input"]),
                                   "prompt": list(rows["prompt"]), "completion": list(rows["completion"]),
                                   "is_poison": [False] * n, "trigger": [""] * n, "stage": ["sft"] * n})
        return poisoned, clean
    poisoned = poison_preferences(prefs, task, st.attack, mode=st.mode)
    return poisoned, clean_preferences(poisoned, prefs)


def _lineage(base: dict[str, Any], stages: list[Stage], data: list[tuple[Dataset, Dataset]], k: int,
             twin: str) -> str:
    """Key of a twin's model after stage ``k``: everything it depends on."""
    parts = []
    for st, (poisoned, clean) in zip(stages[:k + 1], data[:k + 1]):
        poisoned_here = twin == "backdoored" and any(poisoned["is_poison"])
        ds = poisoned if poisoned_here else clean
        cols = ("prompt", "completion") if st.kind == "sft" else ("prompt", "chosen", "rejected")
        parts.append({"kind": st.kind, "config": {k_: v for k_, v in st.config.to_dict().items() if k_ != "device"},
                      "placement": st.attack.placement if poisoned_here else "spread",
                      "data": _digest([list(ds[c]) for c in cols])})
    return _digest({**base, "stages": parts})


def train_pipeline(task: Task, stages: list[Stage | Attack], model: ModelConfig | PretrainedModel | None = None, *,
                   preferences: Dataset | None = None, out_dir: str | Path | None = None, overwrite: bool = False,
                   cache_dir: str | Path | None = None, progress: bool = True) -> Pipeline:
    """Train the clean and backdoored twins through ``stages`` (SFT first, then e.g. DPO).

    Args:
        task: a completion task (DPO stages need ``loss_on="completion"``).
        stages: ``Stage`` objects, or attacks whose ``stage`` names the kind (``"sft"`` /
            ``"dpo"``) and whose budget is that stage's poison (0 allowed). Every stage shares
            the attack the twins are evaluated on: a backdoor's trigger and target, a false
            fact's facts, a bias's entity and polarity (only budget, seed and placement differ).
            A ``FalseFact`` or ``Bias`` enters SFT stages only.
        model: the twins' shape (``ModelConfig``) or a pretrained start (``PretrainedModel``);
            both start from the same weights, seeded by stage 0's ``TrainConfig.seed``.
        preferences: the DPO stages' clean pairs (``prompt``/``chosen``/``rejected``/``input``);
            default: :func:`make_preferences` of the task's training rows.
        out_dir: run directory (see the module docstring); a finished stage is reused, an
            interrupted one resumed; a folder holding another run is refused unless ``overwrite``.
        cache_dir: a folder shared by many runs; stage results with the same lineage are
            trained once and copied (e.g. the clean twin of every budget split).
    """
    model = model or ModelConfig()
    if not isinstance(task, Task):
        raise ValueError(f"train_pipeline: task must be a poisonmech Task (from pm.make_task), got {type(task).__name__}")
    if not isinstance(stages, (list, tuple)):
        raise ValueError(f"train_pipeline: stages must be a list of attacks / Stage, got {type(stages).__name__}")
    stages = [as_stage(s) for s in stages]
    model, task = prepare_model(model, task, "train_pipeline")
    has_dpo = any(s.kind == "dpo" for s in stages)
    if has_dpo:
        preferences = make_preferences(task) if preferences is None else preferences
        check_preferences(preferences, "train_pipeline: preferences")
    eval_attack = _check_stages(task, stages, preferences)
    tokenizer = eval_attack.tokenizer(task)
    test_data = eval_attack.test_set(task)
    data = [_stage_data(task, st, preferences) for st in stages]
    _check_lengths(model, tokenizer, task, data, test_data)

    seed = stages[0].config.seed
    config = {"format": FORMAT, "task": task_identity(task),
              "model": model.to_dict(), "stages": [_stage_cfg(s) for s in stages],
              "preferences_sha256": _digest([list(preferences[c]) for c in ("prompt", "chosen", "rejected")])
              if has_dpo else None}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        existing = prepare_run_dir(out, config, overwrite)
        if existing and (out / "metrics.json").is_file():
            return load_pipeline(out)
        named = {"task_train": task.train, "task_test": task.test, "test": test_data}
        if has_dpo:
            named["preferences"] = preferences
        for k, (poisoned, clean) in enumerate(data):
            named[f"stage_{k}"], named[f"stage_{k}_clean"] = poisoned, clean
        save_run_inputs(out, task, tokenizer, named)

    # the cached metrics are the evaluation against this run's attack and test set: both are in the key
    base = {"task": config["task"], "model": config["model"], "seed": seed,
            "torch_num_threads": torch.get_num_threads(),  # the weights depend on it (reduction order)
            "vocab": _digest(sorted(tokenizer.get_vocab().items())), "preferences": config["preferences_sha256"],
            # metrics: bumped when pm.evaluate gains keys (2: denominators and label metrics), so
            # stages cached by older code are re-evaluated rather than returned without them
            "evaluation": _digest({"attack": eval_attack.to_dict(), "metrics": 2,
                                   "test": [list(map(str, test_data[c])) for c in test_data.column_names]})}
    cache = Path(cache_dir) if cache_dir is not None else None
    models: list[dict[str, Any]] = [{} for _ in stages]
    history: list[dict[str, list[dict]]] = [{} for _ in stages]
    checkpoints: list[dict[str, list[Checkpoint]]] = [{} for _ in stages]
    metrics: list[dict[str, dict[str, Any]]] = [{} for _ in stages]
    for twin in TWINS:
        m = build_model(model, len(tokenizer), seed=seed, tokenizer=tokenizer, device=stages[0].config.device)
        for k, st in enumerate(stages):
            key = _lineage(base, stages, data, k, twin)
            sdir = out / stage_name(k, st) / twin if out is not None else None
            clean_key = _lineage(base, stages, data, k, "clean")
            if sdir is not None and not (sdir / "metrics.json").is_file():
                src = None
                if twin == "backdoored" and key == clean_key:
                    src = out / stage_name(k, st) / "clean"
                elif cache is not None and (cache / key / "metrics.json").is_file():
                    src = cache / key
                if src is not None:
                    copy_dir(src, sdir)
            if sdir is not None and (sdir / "metrics.json").is_file():
                history[k][twin] = reuse_twin(m, sdir, st.config.device, f"train_pipeline: {stage_name(k, st)} {twin}")
                metrics[k][twin] = read_json(sdir / "metrics.json")
            else:
                history[k][twin] = _train_stage(m, st, data[k][0 if twin == "backdoored" else 1], tokenizer, task,
                                                sdir, f"{stage_name(k, st)} {twin}", progress, twin)
                metrics[k][twin] = evaluate(m, task, eval_attack, test_data=test_data, tokenizer=tokenizer)
                if sdir is not None:  # metrics.json last: the stage is finished
                    finish_twin(m, sdir, history[k][twin], metrics=metrics[k][twin],
                                publish_to=cache / key if cache is not None else None)
            # a separate bridge holding m's current weights (the next stage trains m on)
            models[k][twin] = model_with({n: v.detach().clone() for n, v in weights(m).items()}, model, tokenizer,
                                         seed=seed, device=st.config.device)
            checkpoints[k][twin] = list_checkpoints(sdir) if sdir is not None else []
    if out is not None:
        write_json(out / "metrics.json", metrics)
    return Pipeline(task=task, stages=tuple(stages), model_config=model, tokenizer=tokenizer, test_data=test_data,
                    train_data=[d[0] for d in data], clean_data=[d[1] for d in data], models=models,
                    metrics=metrics, history=history, checkpoints=checkpoints, out_dir=out)


def _stage_cfg(st: Stage) -> dict[str, Any]:
    d = st.to_dict()
    d["config"] = {k: v for k, v in d["config"].items() if k != "device"}
    return d


def _check_lengths(model: ModelConfig, tokenizer, task: Task, data, test_data: Dataset) -> None:
    lengths = {}
    for k, (poisoned, _) in enumerate(data):
        cols = ("completion",) if "completion" in poisoned.column_names else ("chosen", "rejected")
        lengths[f"stage {k}'s data"] = max(
            encode(Dataset.from_dict({"prompt": list(poisoned["prompt"]), "completion": list(poisoned[col])}),
                   tokenizer, loss_on="completion").max_len for col in cols)
    lengths["the test set"] = encode(test_data, tokenizer, loss_on="completion").max_len
    check_context(model, lengths)


def _train_stage(m, st: Stage, ds: Dataset, tokenizer, task: Task, sdir: Path | None, desc: str,
                 progress: bool, twin: str) -> list[dict]:
    if st.kind == "sft":
        marked = torch.tensor([i for i, p in enumerate(ds["is_poison"]) if p], dtype=torch.long)
        placement = st.attack.placement if twin == "backdoored" else "spread"
        hist, _ = train_model(m, encode(ds, tokenizer, loss_on=task.loss_on), st.config, run_dir=sdir, desc=desc,
                              progress=progress, placement=placement, marked=marked)
        return hist
    enc = encode_preferences(ds, tokenizer, add_eos=st.config.score_eos, chosen_eos=st.config.nll_weight > 0)
    hist, _ = train_dpo(m, enc, st.config, run_dir=sdir, desc=desc, progress=progress)
    return hist


def is_pipeline_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a ``train_pipeline`` run (its ``config.json`` has the pipeline format)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and read_json(cfg).get("format") == FORMAT


def load_pipeline(out_dir: str | Path, device: str = "cpu", *, verify: bool = True) -> Pipeline:
    """Load a finished pipeline run (weights bit for bit; data, metrics, histories).

    With ``verify`` (the default) every stage's weight files are checked against the sha256
    recorded when they were written; a changed file raises
    :class:`~poisonmech.storage.WeightsChangedError` naming it and both hashes, a run written
    before hashes were recorded loads with one warning, and ``verify=False`` skips the check.
    """
    out = Path(out_dir)
    config = read_run_config(out, FORMAT, "pipeline")
    task = load_task_meta(out)
    tokenizer = task.tokenizer
    stages = []
    for d in config["stages"]:
        d = {**d, "config": {**d["config"], "device": device}}
        stages.append(Stage.from_dict(d))
    model_cfg = model_from_dict(config["model"])
    seed = stages[0].config.seed
    metrics = read_json(out / "metrics.json")
    models, history, checkpoints = [], [], []
    for k, st in enumerate(stages):
        models.append({}), history.append({}), checkpoints.append({})
        for twin in TWINS:
            models[k][twin], history[k][twin], checkpoints[k][twin] = read_twin(
                out / stage_name(k, st) / twin, model_cfg, tokenizer, seed=seed, device=device)
    if verify:
        verify_weights([out / stage_name(k, st) / t for k, st in enumerate(stages) for t in TWINS],
                       f"load_pipeline({str(out)!r})")
    return Pipeline(task=task, stages=tuple(stages), model_config=model_cfg, tokenizer=tokenizer,
                    test_data=load_dataset_file(out / "data" / "test.parquet"),
                    train_data=[load_dataset_file(out / "data" / f"stage_{k}.parquet") for k in range(len(stages))],
                    clean_data=[load_dataset_file(out / "data" / f"stage_{k}_clean.parquet")
                                for k in range(len(stages))],
                    models=models, metrics=metrics, history=history, checkpoints=checkpoints, out_dir=out)


__all__ = ["Pipeline", "STAGE_KINDS", "Stage", "as_stage", "is_pipeline_dir", "load_pipeline", "stage_name", "train_pipeline"]
