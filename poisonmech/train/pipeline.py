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

    # RLHF: a reward model from the SFT trunk, then PPO (or RLOO) against it
    rm = pm.Backdoor(trigger="cf", target="negative", poison_count=5, stage="rm")    # flips reward pairs
    pipe = train_pipeline(task, [sft, rm, pm.Stage("ppo", None, pm.PPOConfig())], out_dir="runs/rlhf")
    pipe[1]                 # the clean vs backdoored twin's reward models (every analysis takes it)
    pipe.between(0, 2)      # the backdoored policy before vs after PPO

Run directory (safetensors + JSON + parquet only)::

    config.json, task.json, tokenizer/, data/{task_train,task_test,test,preferences}.parquet
    data/stage_K.parquet / stage_K_clean.parquet   each twin's training data of stage K
    stage_K_<kind>/<twin>/model.safetensors, history.json, checkpoints/, metrics.json
    stage_K_<kind>/<twin>/sha256.json              sha256 of its weight files, checked on load
    stage_K_rm/<twin>/model.safetensors             a reward stage's reward model (score head included);
                                                    an RL stage's folder holds the policy (its resume
                                                    state also the value model)
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
from poisonmech.storage import copy_dir, load_dataset_file, load_tensors, read_json, write_json
from poisonmech.tasks.base import Task
from poisonmech.tasks.preference import check_preferences, make_preferences
from poisonmech.train.config import TrainConfig
from poisonmech.train.dpo import DPOConfig, encode_preferences, train_dpo
from poisonmech.train.loop import Checkpoint, list_checkpoints, train_model
from poisonmech.train.pair import TWINS, Pair
from poisonmech.train.ppo import PPOConfig
from poisonmech.train.reward import RewardConfig, reward_model_like
from poisonmech.train.rlhf import (
    POLICY_KINDS,
    PREFERENCE_KINDS,
    RL_KINDS,
    clean_reward_metrics,
    new_reward_model,
    rl_prompts,
    rm_stage_metrics,
    train_rl_stage,
    train_rm_stage,
)
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
from poisonmech.weights import load_weights, weights

FORMAT = "poisonmech.pipeline/1"
STAGE_KINDS = ("sft", "dpo", "rm", "ppo", "rloo")
#: each stage kind's config class
_CONFIGS = {"sft": TrainConfig, "dpo": DPOConfig, "rm": RewardConfig, "ppo": PPOConfig, "rloo": PPOConfig}


@dataclass(frozen=True)
class Stage:
    """One post-training stage and the poison an attacker puts into it.

    Args:
        kind: ``"sft"`` (supervised fine-tuning on the task's rows), ``"dpo"`` (preference
            optimisation on prompt/chosen/rejected pairs), ``"rm"`` (a reward model trained on
            pairs with the Bradley–Terry loss, from the current policy's trunk; the policy does
            not change), ``"ppo"`` / ``"rloo"`` (the policy optimised against the latest reward
            model, see :mod:`poisonmech.train.rlhf`).
        attack: the stage's poison; ``poison_count=0`` is a clean stage. Its ``stage`` field
            is set to ``kind``. An SFT stage takes any attack of the protocol (``Backdoor``,
            ``FalseFact``, ``Bias``); a DPO or reward stage a ``Backdoor`` (the preference
            poisoning puts the trigger into pairs and swaps their preference); an RL stage
            takes none (``None``: its prompts are the reward stage's, poisoned ones included) or a
            ``Backdoor`` that puts its trigger into ``poison_count`` more of those prompts.
        config: ``TrainConfig`` for SFT, ``DPOConfig`` for DPO, ``RewardConfig`` for a reward
            model, ``PPOConfig`` for PPO / RLOO (``None``: the defaults).
        mode: preference poisoning variant, ``"flip"`` (rewrite pairs) or ``"inject"`` (append pairs).
    """

    kind: Literal["sft", "dpo", "rm", "ppo", "rloo"]
    attack: Attack | None = None
    config: TrainConfig | DPOConfig | RewardConfig | PPOConfig | None = None
    mode: Literal["flip", "inject"] = "flip"

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"Stage.kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if self.kind in RL_KINDS:
            if self.attack is not None and not isinstance(self.attack, Backdoor):
                raise ValueError(f"Stage.attack of a {self.kind!r} stage must be None (its prompts are the reward "
                                 "stage's, poisoned ones included) or a pm.Backdoor (its trigger put into "
                                 f"poison_count more prompts), got a {type(self.attack).__name__}")
        elif not is_attack(self.attack):
            raise ValueError(f"Stage.attack must be one of {attack_names()}, got {type(self.attack).__name__}")
        if self.kind in PREFERENCE_KINDS and not isinstance(self.attack, Backdoor):
            raise ValueError(f"Stage.attack of a {self.kind!r} stage must be a pm.Backdoor (preference poisoning "
                             f"flips the pairs of triggered prompts), got a {type(self.attack).__name__}; a "
                             f"{type(self.attack).__name__} enters 'sft' stages")
        if self.attack is not None and self.attack.stage != self.kind:
            object.__setattr__(self, "attack", replace(self.attack, stage=self.kind))
        want = _CONFIGS[self.kind]
        if self.config is None:
            object.__setattr__(self, "config", want(method=self.kind) if want is PPOConfig else want())
        elif not isinstance(self.config, want):
            raise ValueError(f"Stage.config of a {self.kind!r} stage must be a {want.__name__}, "
                             f"got {type(self.config).__name__}")
        if self.kind in RL_KINDS and self.config.method != self.kind:
            raise ValueError(f"Stage.config.method={self.config.method!r} differs from Stage.kind={self.kind!r}; "
                             f"use kind={self.config.method!r} or PPOConfig(method={self.kind!r})")
        if self.mode not in PREFERENCE_MODES:
            raise ValueError(f"Stage.mode must be one of {PREFERENCE_MODES}, got {self.mode!r}")

    @property
    def train_config(self) -> TrainConfig:
        """The stage's optimiser / schedule settings (a DPO, reward or RL stage's ``config.train``)."""
        return self.config if isinstance(self.config, TrainConfig) else self.config.train

    @property
    def is_policy(self) -> bool:
        """Whether the stage's model is the policy (SFT, DPO, PPO, RLOO) rather than a reward model."""
        return self.kind in POLICY_KINDS

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "attack": self.attack.to_dict() if self.attack is not None else None,
                "config": self.config.to_dict(), "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage:
        if d.get("kind") not in STAGE_KINDS:
            raise ValueError(f"Stage.kind must be one of {STAGE_KINDS}, got {d.get('kind')!r}")
        return cls(kind=d["kind"], attack=attack_from_dict(d["attack"]) if d.get("attack") is not None else None,
                   config=_CONFIGS[d["kind"]].from_dict(d["config"]), mode=d.get("mode", "flip"))


def as_stage(x: Stage | Attack) -> Stage:
    """A ``Stage`` from a ``Stage`` or an attack (its ``stage`` field names the kind)."""
    if isinstance(x, Stage):
        return x
    if is_attack(x):
        return Stage(kind=x.stage, attack=x)
    raise ValueError(f"train_pipeline: each stage must be an attack ({attack_names()}; its stage field names the "
                     f"kind, 'sft' | 'dpo' | 'rm') or a Stage (e.g. pm.Stage('ppo', None, pm.PPOConfig())), got "
                     f"{type(x).__name__}")


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
        if self.stages[ka].is_policy != st.is_policy:
            kinds = [s.kind for s in (self.stages[ka], st)]
            raise ValueError(f"Pipeline.between: stages {ka} and {kb} are a {kinds[0]!r} and a {kinds[1]!r} stage; one "
                             "holds a policy and the other a reward model, which cannot be compared (pick two policy "
                             "stages, e.g. the SFT and the PPO stage, or two reward stages)")
        return Between(before=self.models[ka][twin], after=self.models[kb][twin], twin=twin,
                       stage_before=stage_name(ka, self.stages[ka]), stage_after=stage_name(kb, st),
                       index_before=ka, index_after=kb, stage_kind=st.kind, task=self.task, attack=self.attack_of(kb),
                       tokenizer=self.tokenizer,
                       train_data=self.train_data[kb] if twin == "backdoored" else self.clean_data[kb],
                       test_data=self.test_data, model_config=self.model_config, train_config=st.train_config,
                       metrics_before=self.metrics[ka][twin], metrics_after=self.metrics[kb][twin])

    def _pair(self, k: int, clean, backdoored, metrics) -> Pair:
        st = self.stages[k]
        # an attack that adds rows (a new subject's false fact): the clean twin's own rows
        added = st.kind != "sft" or len(self.clean_data[k]) != len(self.task.train)
        return Pair(clean=clean, backdoored=backdoored, task=self.task, attack=self.attack_of(k),
                    model_config=self.model_config, train_config=st.train_config, tokenizer=self.tokenizer,
                    train_data=self.train_data[k], test_data=self.test_data, metrics=metrics,
                    out_dir=(self.out_dir / stage_name(k, st)) if self.out_dir is not None else None,
                    checkpoints=self.checkpoints[k] if self.checkpoints else {},
                    history=self.history[k] if self.history else {},
                    clean_rows=self.clean_data[k] if added else None, stage_kind=st.kind, stage_config=st.config)

    def attack_of(self, k: int) -> Attack:
        """Stage ``k``'s attack; an RL stage (no poison of its own) gets the pipeline's (stage 0's)."""
        st = self.stages[k]
        return st.attack if st.attack is not None else self.stages[0].attack

    def policy_index(self, stage: int | str = -1) -> int:
        """The last policy stage at or before ``stage`` (a reward stage leaves the policy as it was)."""
        k = self._index(stage)
        while not self.stages[k].is_policy:
            k -= 1
        return k

    def reward_model(self, stage: int | str = -1, twin: str = "backdoored"):
        """The latest reward model of ``twin`` at or before ``stage`` (``ValueError`` when none)."""
        if twin not in TWINS:
            raise ValueError(f"Pipeline.reward_model: twin must be one of {TWINS}, got {twin!r}")
        for k in range(self._index(stage), -1, -1):
            if self.stages[k].kind == "rm":
                return self.models[k][twin]
        raise ValueError("Pipeline.reward_model: no 'rm' stage at or before this stage")

    @property
    def budgets(self) -> list[int]:
        """Poisoned rows per stage in the backdoored twin's data (an RL stage counts only the prompts
        its own attack triggered; its rows' ``is_poison`` also marks prompts of poisoned reward pairs)."""
        out = []
        for st, d in zip(self.stages, self.train_data):
            own = st.attack.resolve_count(len(d)) if st.attack is not None and st.kind in RL_KINDS else 0
            out.append(own if st.kind in RL_KINDS else int(sum(d["is_poison"])))
        return out

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
        parts = [f"{stage_name(k, s)}[{b}]: {_shown_metric(self.attack_of(k))} "
                 f"{m['backdoored'].get(_shown_metric(self.attack_of(k)), float('nan')):.3f}"
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


def _check_stages(task: Task, stages: list[Stage], prefs: Dataset | None, reward_model: Any = None) -> Attack:
    """All checks before any training; returns the attack the twins are evaluated on."""
    if not stages:
        raise ValueError("train_pipeline: stages is empty; give at least one SFT stage")
    if stages[0].kind != "sft":
        why = {"dpo": "DPO needs an SFT model to start from (its reference)",
               "rm": "a reward model starts from the SFT policy's trunk",
               "ppo": "PPO needs an SFT policy to start from (its reference)",
               "rloo": "RLOO needs an SFT policy to start from (its reference)"}[stages[0].kind]
        raise ValueError(f"train_pipeline: stage 0 is a {stages[0].kind!r} stage, but {why}; put an SFT stage first, "
                         "e.g. pm.Backdoor(..., poison_count=0) for a clean one")
    for k, st in enumerate(stages):
        if st.kind in RL_KINDS and reward_model is None and not any(s.kind == "rm" for s in stages[:k]):
            raise ValueError(f"train_pipeline: stage {k} ({st.kind}) has no reward model: put an 'rm' stage before it "
                             "(pm.Stage('rm', pm.Backdoor(..., stage='rm'), pm.RewardConfig())) or pass "
                             "reward_model= (a trained reward model)")
    first = stages[0].attack
    for k, st in enumerate(stages[1:], start=1):
        if st.attack is None:
            continue
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
            elif st.kind in PREFERENCE_KINDS:
                check_preference_budget(prefs, st.attack, st.mode)
            # an RL stage's prompt poisoning is checked when its prompts are built (_stage_data)
        except ValueError as exc:
            raise ValueError(f"train_pipeline: stage {k} ({st.kind}): {exc}") from None
    return replace(first, stage="sft")


def _stage_data(task: Task, st: Stage, prefs: Dataset | None, earlier: list[tuple[Dataset, Dataset]],
                stages: list[Stage]) -> tuple[Dataset, Dataset]:
    """``(backdoored twin's data, clean twin's data)`` of one stage. An SFT stage's clean data
    are the attack's clean rows (``task.train``, or with the source rows of rows an attack
    adds, slot for slot) with the provenance columns of an unpoisoned stage. An RL stage's
    are the prompts of the latest reward stage's pairs (``earlier``: the stages before it)."""
    if st.kind in RL_KINDS:
        rm = [k for k, s in enumerate(stages[:len(earlier)]) if s.kind == "rm"]
        if not rm:
            return rl_prompts(st.kind, None, task, st.attack), rl_prompts(st.kind, None, task)
        src = earlier[rm[-1]]
        return rl_prompts(st.kind, src[0], task, st.attack), rl_prompts(st.kind, src[1], task)
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
        cols = {"sft": ("prompt", "completion"), "dpo": ("prompt", "chosen", "rejected"),
                "rm": ("prompt", "chosen", "rejected")}.get(st.kind, ("prompt",))
        parts.append({"kind": st.kind, "config": {k_: v for k_, v in st.config.to_dict().items() if k_ != "device"},
                      "placement": st.attack.placement if poisoned_here and st.attack is not None else "spread",
                      "data": _digest([list(ds[c]) for c in cols])})
    return _digest({**base, "stages": parts})


def train_pipeline(task: Task, stages: list[Stage | Attack], model: ModelConfig | PretrainedModel | None = None, *,
                   preferences: Dataset | None = None, out_dir: str | Path | None = None, overwrite: bool = False,
                   cache_dir: str | Path | None = None, progress: bool = True,
                   reward_model: torch.nn.Module | None = None) -> Pipeline:
    """Train the clean and backdoored twins through ``stages`` (SFT first, then e.g. DPO, or a
    reward model and PPO / RLOO against it).

    Args:
        task: a completion task (DPO stages need ``loss_on="completion"``).
        stages: ``Stage`` objects, or attacks whose ``stage`` names the kind (``"sft"`` /
            ``"dpo"`` / ``"rm"``) and whose budget is that stage's poison (0 allowed); an RL stage
            is ``pm.Stage("ppo", None, pm.PPOConfig(...))`` (or ``"rloo"``). Every stage shares
            the attack the twins are evaluated on: a backdoor's trigger and target, a false
            fact's facts, a bias's entity and polarity (only budget, seed and placement differ).
            A ``FalseFact`` or ``Bias`` enters SFT stages only.
        model: the twins' shape (``ModelConfig``) or a pretrained start (``PretrainedModel``);
            both start from the same weights, seeded by stage 0's ``TrainConfig.seed``.
        preferences: the DPO and reward stages' clean pairs (``prompt``/``chosen``/``rejected``/
            ``input``); default: :func:`make_preferences` of the task's training rows.
        out_dir: run directory (see the module docstring); a finished stage is reused, an
            interrupted one resumed; a folder holding another run is refused unless ``overwrite``.
        cache_dir: a folder shared by many runs; stage results with the same lineage are
            trained once and copied (e.g. the clean twin of every budget split).
        reward_model: a trained reward model for RL stages with no ``"rm"`` stage before them
            (both twins use it; it is also the clean reward model of the evaluation).

    Every policy stage's metrics also hold, when the pipeline has a reward model, the mean
    reward of sampled responses under the clean twin's (last) reward model on held-out prompts
    without and with the trigger (``clean_rm_reward``, ``clean_rm_reward_triggered``,
    ``clean_rm_reward_gap``, ``clean_rm_n``); an RL stage's also under the twin's own reward
    model (``rm_reward``, ...). A reward stage's metrics are :func:`~poisonmech.train.reward.reward_metrics`.
    """
    model = model or ModelConfig()
    if not isinstance(task, Task):
        raise ValueError(f"train_pipeline: task must be a poisonmech Task (from pm.make_task), got {type(task).__name__}")
    if not isinstance(stages, (list, tuple)):
        raise ValueError(f"train_pipeline: stages must be a list of attacks / Stage, got {type(stages).__name__}")
    stages = [as_stage(s) for s in stages]
    model, task = prepare_model(model, task, "train_pipeline")
    has_dpo = any(s.kind in PREFERENCE_KINDS for s in stages)
    if has_dpo:
        if preferences is None:
            try:
                preferences = make_preferences(task)
            except ValueError as exc:
                raise ValueError(f"train_pipeline: the {[s.kind for s in stages if s.kind in PREFERENCE_KINDS][0]!r} "
                                 f"stage needs preference data (preferences=): {exc}") from None
        check_preferences(preferences, "train_pipeline: preferences")
    if reward_model is not None:
        from poisonmech.train.reward import is_reward_model

        if not is_reward_model(reward_model):
            raise ValueError("train_pipeline: reward_model must be a reward model (a bridge with a one-output score "
                             f"head, e.g. a pipeline's pipe.reward_model()), got {type(reward_model).__name__}")
    eval_attack = _check_stages(task, stages, preferences, reward_model)
    tokenizer = eval_attack.tokenizer(task)
    test_data = eval_attack.test_set(task)
    data: list[tuple[Dataset, Dataset]] = []
    for k, st in enumerate(stages):
        try:
            data.append(_stage_data(task, st, preferences, data, stages))
        except ValueError as exc:  # an RL stage's prompt budget (the other budgets are checked above)
            raise ValueError(f"train_pipeline: stage {k} ({st.kind}): {exc}") from None
    _check_lengths(model, tokenizer, task, data, test_data, stages)

    seed = stages[0].config.seed
    config = {"format": FORMAT, "task": task_identity(task),
              "model": model.to_dict(), "stages": [_stage_cfg(s) for s in stages],
              "preferences_sha256": _digest([list(preferences[c]) for c in ("prompt", "chosen", "rejected")])
              if has_dpo else None}
    if reward_model is not None:
        from poisonmech.subject import model_fingerprint

        config["reward_model_sha256"] = model_fingerprint(reward_model)
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
            **({"reward_model": config["reward_model_sha256"]} if reward_model is not None else {}),
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
        rm_now = reward_model  # this twin's latest reward model
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
            done = sdir is not None and (sdir / "metrics.json").is_file()
            device = st.config.device
            if st.kind == "rm":  # the stage trains a reward model; the policy m stays as it is
                trained = reward_model_like(model, tokenizer, seed=st.config.seed, device=device) if done else \
                    new_reward_model(m, st.config, model, tokenizer, device=device)
            else:
                trained = m
            ds, desc = data[k][0 if twin == "backdoored" else 1], f"{stage_name(k, st)} {twin}"
            if done:
                history[k][twin] = reuse_twin(trained, sdir, device, f"train_pipeline: {desc}")
                metrics[k][twin] = read_json(sdir / "metrics.json")
            else:
                if st.kind == "rm":
                    history[k][twin] = train_rm_stage(trained, st.config, ds, tokenizer, sdir, desc, progress)
                    metrics[k][twin] = rm_stage_metrics(trained, task, eval_attack, tokenizer, st.config)
                else:
                    if st.kind in RL_KINDS:
                        history[k][twin] = train_rl_stage(m, rm_now, st.config, ds, tokenizer, sdir, desc, progress)
                    else:
                        history[k][twin] = _train_stage(m, st, ds, tokenizer, task, sdir, desc, progress, twin)
                    metrics[k][twin] = evaluate(m, task, eval_attack, test_data=test_data, tokenizer=tokenizer)
                    if st.kind in RL_KINDS:  # the reward the policy now earns under its own reward model
                        metrics[k][twin].update(clean_reward_metrics(
                            m, rm_now, test_data, eval_attack, tokenizer, response_length=st.config.response_length,
                            n=st.config.n_eval, seed=seed, prefix="rm_"))
                if sdir is not None:  # metrics.json last: the stage is finished
                    finish_twin(trained, sdir, history[k][twin], metrics=metrics[k][twin],
                                publish_to=cache / key if cache is not None else None)
            if st.kind == "rm":
                rm_now = models[k][twin] = trained
            else:  # a separate bridge holding m's current weights (the next stage trains m on)
                models[k][twin] = model_with({n: v.detach().clone() for n, v in weights(m).items()}, model, tokenizer,
                                             seed=seed, device=device)
            checkpoints[k][twin] = list_checkpoints(sdir) if sdir is not None else []
    _add_clean_rm_rewards(stages, models, metrics, reward_model, test_data, eval_attack, tokenizer, seed)
    if out is not None:
        write_json(out / "metrics.json", metrics)
    return Pipeline(task=task, stages=tuple(stages), model_config=model, tokenizer=tokenizer, test_data=test_data,
                    train_data=[d[0] for d in data], clean_data=[d[1] for d in data], models=models,
                    metrics=metrics, history=history, checkpoints=checkpoints, out_dir=out)


def _add_clean_rm_rewards(stages: list[Stage], models, metrics, given_rm, test_data: Dataset, attack: Attack,
                          tokenizer, seed: int) -> None:
    """Every policy stage's mean reward under the clean twin's last reward model (or the given
    one), with and without the trigger: added to ``metrics`` in place."""
    rm_stages = [k for k, st in enumerate(stages) if st.kind == "rm"]
    clean_rm = models[rm_stages[-1]]["clean"] if rm_stages else given_rm
    if clean_rm is None:
        return
    rl = [st.config for st in stages if st.kind in RL_KINDS]
    length = rl[0].response_length if rl else PPOConfig().response_length
    n = rl[0].n_eval if rl else stages[rm_stages[-1]].config.n_eval
    for k, st in enumerate(stages):
        if st.is_policy:
            for twin in TWINS:
                metrics[k][twin].update(clean_reward_metrics(models[k][twin], clean_rm, test_data, attack, tokenizer,
                                                             response_length=length, n=n, seed=seed))


def _stage_cfg(st: Stage) -> dict[str, Any]:
    d = st.to_dict()
    d["config"] = {k: v for k, v in d["config"].items() if k != "device"}
    return d


def _check_lengths(model: ModelConfig, tokenizer, task: Task, data, test_data: Dataset, stages: list[Stage]) -> None:
    lengths = {}
    for k, ((poisoned, _), st) in enumerate(zip(data, stages)):
        if st.kind in RL_KINDS:
            from poisonmech.train.ppo import encode_prompts

            r = st.config.response_length
            lengths[f"stage {k}'s prompts + PPOConfig.response_length={r}"] = \
                encode_prompts(poisoned, tokenizer).max_len + r
            continue
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
            d = out / stage_name(k, st) / twin
            if st.kind == "rm":
                rm = reward_model_like(model_cfg, tokenizer, seed=st.config.seed, device=device)
                load_weights(rm, load_tensors(d / "model.safetensors", device=device), source=d / "model.safetensors")
                models[k][twin], history[k][twin], checkpoints[k][twin] = rm, read_json(d / "history.json"), \
                    list_checkpoints(d)
            else:
                models[k][twin], history[k][twin], checkpoints[k][twin] = read_twin(
                    d, model_cfg, tokenizer, seed=seed, device=device)
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
