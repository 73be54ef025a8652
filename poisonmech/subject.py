"""``resolve(subject)``: a ``Pair``, a pipeline stage, a ``Pipeline``, a before/after view, a
run directory or a bare model, turned into one :class:`Subject`.

Every analysis starts with ``resolve``, so every analysis accepts every kind of subject in
its first position. This module is the only code that knows Pairs, Pipelines and the
on-disk layout of a run exist; analyses read models by role, data, checkpoints and the
training stage from the ``Subject``.

    import poisonmech as pm
    s = pm.resolve("runs/demo")              # or a Pair, pipe[1], pipe, pipe.between(0, 1), a model
    s.roles                                  # ("backdoored", "clean")
    s.model()                                # the default role's model (here: the backdoored twin)
    s.model("clean"), s.train_data, s.test_data, s.tokenizer, s.stage_kind, s.run_dir
    pm.resolve(pipe[k]).is_reward_model()   # an "rm" stage: its twins are reward models (stage kind "rm")
    pm.resolve(pipe[k]).preference("clean") # a DPO / reward stage: that twin's own pairs and the stage's settings
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

#: the kinds of subject ``resolve`` accepts, for error messages
ACCEPTED = ("a pm.Pair (train_pair / load_pair)", "a pipeline stage (pipe[k])", "a pm.Pipeline (its last stage)",
            "pipe.between(a, b)", "a run directory (str or Path)", "a TransformerBridge / torch model",
            "a pm.Subject")
#: role names: twins of a pair or stage; a model before / after some stages; a bare model
TWIN_ROLES = ("backdoored", "clean")
BETWEEN_ROLES = ("after", "before")
MODEL_ROLE = "model"


@dataclass(frozen=True)
class StageInfo:
    """The training stage whose end a subject's models sit at.

    ``kind`` is ``"sft"``, ``"dpo"``, ``"rm"`` (the subject's models are reward models: a
    trunk with a one-output score head, see :mod:`poisonmech.train.reward`), ``"ppo"`` or
    ``"rloo"``. For a DPO stage of a pipeline run, ``beta``, ``score_eos`` and ``nll_weight``
    are its settings and :meth:`Subject.preference` reads each twin's preference pairs and
    reference log-probabilities from the run; for a reward stage ``center_rewards`` is its
    ``RewardConfig.center_rewards`` (part of each pair's Bradley–Terry loss) and
    :meth:`Subject.preference` gives each twin's own pairs.
    """

    kind: str = "sft"
    index: int = 0
    name: str | None = None
    beta: float | None = None
    score_eos: bool = False
    nll_weight: float = 0.0
    pipeline_dir: Path | None = None
    center_rewards: float = 0.0

    @property
    def is_reward(self) -> bool:
        """Whether the stage's models are reward models (an ``"rm"`` stage)."""
        return self.kind == "rm"


@dataclass(frozen=True, eq=False)
class Subject:
    """What an analysis runs on: models by role plus the data and provenance around them.

    Attributes:
        models: role -> model. A pair / stage has ``"backdoored"`` and ``"clean"``; a
            before/after view ``"before"`` and ``"after"``; a bare model ``"model"``.
        kind: ``"pair"`` | ``"stage"`` | ``"between"`` | ``"model"``.
        default_role: the model analysed when no ``twin`` / role is given (the backdoored
            twin, the model after the stages, the bare model).
        reference_role: the model it is contrasted with (the clean twin, the model before),
            ``None`` for a bare model.
        train_data: the default role's training rows (with provenance for a run), or ``None``.
        role_train_data: each role's own training rows where they differ (the clean twin's).
        test_data: clean / triggered / near-miss test rows, or ``None``.
        task, attack, model_config, train_config: the run's, or ``None``.
        checkpoints, history: role -> the run's checkpoints / per-epoch history.
        metrics: role -> the run's evaluation.
        stage: the training stage (kind ``"sft"`` for a ``train_pair`` run; ``"rm"`` for a
            reward stage and for a bare reward model).
        run_dir: where cached analyses may be written, or ``None`` (a bare model, a
            before/after view that mixes stages).
    """

    models: dict[str, Any]
    kind: str
    default_role: str
    reference_role: str | None = None
    tokenizer: Any = None
    train_data: Any = None
    role_train_data: dict[str, Any] = field(default_factory=dict)
    test_data: Any = None
    task: Any = None
    attack: Any = None
    model_config: Any = None
    train_config: Any = None
    checkpoints: dict[str, list] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    stage: StageInfo = field(default_factory=StageInfo)
    run_dir: Path | None = None

    # ------------------------------------------------------------------ roles
    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.models)

    @property
    def stage_kind(self) -> str:
        return self.stage.kind

    @property
    def is_run(self) -> bool:
        """True when the subject came from a trained run (it has a task and an attack)."""
        return self.task is not None and self.attack is not None

    def role(self, role: str | None = None, *, field_name: str = "twin") -> str:
        """``role`` checked against this subject's roles (``None``: the default role)."""
        if role is None:
            return self.default_role
        if role not in self.models:
            raise ValueError(f"{field_name} must be one of {self.roles} for this subject ({self.kind}), got {role!r}")
        return role

    def model(self, role: str | None = None) -> torch.nn.Module:
        """The model of ``role`` (default: :attr:`default_role`)."""
        return self.models[self.role(role)]

    def reference(self, where: str = "this analysis") -> torch.nn.Module:
        """The model the default role is contrasted with (clean twin / model before)."""
        if self.reference_role is None:
            raise ValueError(f"{where} needs two models (a clean and a backdoored twin, or a model before and after "
                             f"some stages); a bare model has one. Pass a Pair, a pipeline stage or a run directory")
        return self.models[self.reference_role]

    def train_data_of(self, role: str | None = None):
        """The training rows of ``role`` (the clean twin's differ from the backdoored twin's)."""
        role = self.role(role)
        return self.role_train_data.get(role, self.train_data if role == self.default_role else None)

    def require(self, what: str, where: str, argument: str | None = None):
        """The attribute ``what`` (``"train_data"``, ``"test_data"``, ``"tokenizer"``, ``"task"``,
        ``"attack"``); an error naming how to supply it when the subject lacks it."""
        value = getattr(self, what)
        if value is None:
            how = f"pass {argument}=" if argument else "pass a run (a Pair, a pipeline stage or a run directory)"
            raise ValueError(f"{where} needs {what.replace('_', ' ')}, which this subject ({self.kind}) does not "
                             f"carry: {how}")
        return value

    def with_data(self, *, train=None, test=None, tokenizer=None) -> Subject:
        """A copy with the given data replacing the subject's own."""
        changes: dict[str, Any] = {}
        if train is not None:
            changes["train_data"] = train
        if test is not None:
            changes["test_data"] = test
        if tokenizer is not None:
            changes["tokenizer"] = tokenizer
        return replace(self, **changes) if changes else self

    # ------------------------------------------------------------ fingerprints
    def fingerprint(self, role: str | None = None) -> str:
        """A hash of ``role``'s weights (and buffers): part of every analysis' cache key."""
        return model_fingerprint(self.model(role))

    def data_fingerprint(self, which: str = "train_data") -> str:
        """A hash of the rows of ``train_data`` or ``test_data`` (``""`` when absent)."""
        return dataset_fingerprint(getattr(self, which))

    def key_parts(self, config: Any, *, roles: tuple[str, ...] | None = None,
                  data: tuple[str, ...] = ("train_data", "test_data")) -> dict[str, Any]:
        """What a result computed with ``config`` on ``roles`` (default: every role) depends on,
        in JSON types: the config's fields, each role's weight fingerprint, the data's."""
        roles = self.roles if roles is None else tuple(self.role(r) for r in roles)
        return {"config": config.to_dict() if hasattr(config, "to_dict") else config,
                "weights": {r: self.fingerprint(r) for r in roles},
                "data": {d: self.data_fingerprint(d) for d in data}}

    def cache_key(self, config: Any, *, role: str | None = None, data: tuple[str, ...] = ("train_data", "test_data"),
                  extra: Any = None) -> str:
        """A short hash of :meth:`key_parts` for ``config`` on ``role`` (and the config's class)."""
        blob = {**self.key_parts(config, roles=(self.role(role),), data=data), "class": type(config).__name__,
                "extra": extra}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def is_reward_model(self, role: str | None = None) -> bool:
        """Whether ``role``'s model is a reward model (a bridge whose unembedding has one output:
        its forward gives ``[batch pos 1]`` and the analyses' metric is the reward)."""
        from poisonmech.train.reward import is_reward_model

        return is_reward_model(self.model(role))

    # ------------------------------------------------------ preference stages
    def preference(self, role: str | None = None) -> dict[str, Any] | None:
        """``role``'s own preference pairs of a preference stage, with the stage's settings.

        A DPO stage of a pipeline run: ``kind="dpo"``, the pairs (``data``), the reference
        log-probabilities ``train_dpo`` saved for them (``reference``: chosen, rejected) and
        the stage's ``beta`` / ``score_eos`` / ``nll_weight``. A reward stage (``pipe[k]`` of
        an ``"rm"`` stage, with or without a run directory): ``kind="rm"``, the pairs the
        twin's reward model was trained on (``data``; ``None`` where the subject does not
        carry them) and ``center_rewards``. ``None`` for anything else."""
        st = self.stage
        role = self.role(role)
        if st.kind == "rm" and role in TWIN_ROLES:
            return {"kind": "rm", "data": self.train_data_of(role), "center_rewards": st.center_rewards}
        if st.kind != "dpo" or st.pipeline_dir is None or self.run_dir is None or role not in TWIN_ROLES:
            return None
        from poisonmech.storage import load_dataset_file, load_tensors

        ref_path = self.run_dir / role / "reference_logps.safetensors"
        ref = None
        if ref_path.is_file():
            t = load_tensors(ref_path)
            ref = (t["chosen"], t["rejected"])
        name = f"stage_{st.index}.parquet" if role == "backdoored" else f"stage_{st.index}_clean.parquet"
        data_path = st.pipeline_dir / "data" / name
        return {"kind": "dpo", "data": load_dataset_file(data_path) if data_path.is_file() else None,
                "reference": ref, "beta": st.beta, "score_eos": st.score_eos, "nll_weight": st.nll_weight}

    def __repr__(self) -> str:
        where = f", run_dir={str(self.run_dir)!r}" if self.run_dir is not None else ""
        n_train = None if self.train_data is None else len(self.train_data)
        n_test = None if self.test_data is None else len(self.test_data)
        return (f"Subject(kind={self.kind!r}, roles={self.roles}, stage={self.stage.kind!r}, "
                f"train_rows={n_train}, test_rows={n_test}{where})")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's weights (and buffers)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(ds: Any) -> str:
    """A hash of a ``datasets.Dataset``'s rows (``""`` for ``None``)."""
    if ds is None:
        return ""
    h = hashlib.sha256()
    h.update(json.dumps(ds.column_names).encode())
    for batch in ds.iter(batch_size=1024):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- resolve
def _stage_info(pair) -> StageInfo:
    """The stage a Pair's run directory sits at: a pipeline's stage folder, or a one-stage SFT run."""
    from poisonmech.storage import read_json
    from poisonmech.train.pipeline import is_pipeline_dir

    out = pair.out_dir
    if out is None or not is_pipeline_dir(Path(out).parent):
        cfg = getattr(pair, "stage_config", None)
        return StageInfo(kind=_pair_kind(pair), center_rewards=_center_rewards(cfg if cfg is not None else
                                                                                pair.train_config),
                         beta=getattr(cfg, "beta", None), score_eos=bool(getattr(cfg, "score_eos", False)),
                         nll_weight=float(getattr(cfg, "nll_weight", 0.0)))
    stage_dir = Path(out)
    cfg = read_json(stage_dir.parent / "config.json")
    for k, st in enumerate(cfg.get("stages", [])):
        if f"stage_{k}_{st.get('kind')}" == stage_dir.name:
            c = st.get("config", {})
            return StageInfo(kind=st.get("kind", "sft"), index=k, name=stage_dir.name,
                             beta=float(c["beta"]) if "beta" in c else None,
                             score_eos=bool(c.get("score_eos", False)), nll_weight=float(c.get("nll_weight", 0.0)),
                             pipeline_dir=stage_dir.parent, center_rewards=float(c.get("center_rewards", 0.0)))
    return StageInfo(kind=_pair_kind(pair), name=stage_dir.name)


def _pair_kind(pair) -> str:
    """A Pair's stage kind without a pipeline config to read: a reward model's twins are an
    ``"rm"`` stage's; else the attack's ``stage``."""
    from poisonmech.train.reward import is_reward_model

    if getattr(pair, "stage_kind", None):
        return pair.stage_kind
    if is_reward_model(pair.backdoored):
        return "rm"
    return getattr(pair.attack, "stage", "sft") or "sft"


def _center_rewards(train_config) -> float:
    """``RewardConfig.center_rewards`` where a Pair carries the stage's config (a ``TrainConfig``
    does not: a reward stage's Pair holds ``config.train``), else 0."""
    return float(getattr(train_config, "center_rewards", 0.0) or 0.0)


def _clean_rows(pair, stage: StageInfo):
    """The clean twin's training rows. A reward stage's are its clean preference pairs: read from
    the pipeline run (``data/stage_K_clean.parquet``), else the Pair's own clean rows when they
    are pairs, else ``None`` (never the task's SFT rows, which that twin's reward model did not
    train on)."""
    rows = getattr(pair, "clean_train_data", pair.task.train)
    if stage.kind != "rm":
        return rows
    if stage.pipeline_dir is not None:
        from poisonmech.storage import load_dataset_file

        path = stage.pipeline_dir / "data" / f"stage_{stage.index}_clean.parquet"
        if path.is_file():
            return load_dataset_file(path)
    return rows if rows is not None and "chosen" in rows.column_names else None


def _from_pair(pair) -> Subject:
    stage = _stage_info(pair)
    return Subject(models={"backdoored": pair.backdoored, "clean": pair.clean},
                   kind="stage" if stage.pipeline_dir is not None else "pair", default_role="backdoored",
                   reference_role="clean", tokenizer=pair.tokenizer, train_data=pair.train_data,
                   role_train_data={"backdoored": pair.train_data, "clean": _clean_rows(pair, stage)},
                   test_data=pair.test_data, task=pair.task, attack=pair.attack, model_config=pair.model_config,
                   train_config=pair.train_config, checkpoints=dict(pair.checkpoints or {}),
                   history=dict(pair.history or {}), metrics=dict(pair.metrics or {}), stage=stage,
                   run_dir=Path(pair.out_dir) if pair.out_dir is not None else None)


def _from_between(b) -> Subject:
    return Subject(models={"after": b.after, "before": b.before}, kind="between", default_role="after",
                   reference_role="before", tokenizer=b.tokenizer, train_data=b.train_data,
                   test_data=b.test_data, task=b.task, attack=b.attack, model_config=b.model_config,
                   train_config=b.train_config, metrics={"before": b.metrics_before, "after": b.metrics_after},
                   stage=StageInfo(kind=b.stage_kind, index=b.index_after, name=b.stage_after), run_dir=None)


def _from_dir(path: Path):
    from poisonmech.train.pair import load_pair
    from poisonmech.train.pipeline import is_pipeline_dir, load_pipeline

    if not path.is_dir():
        raise FileNotFoundError(f"resolve: no run directory at {path}")
    if is_pipeline_dir(path):
        return load_pipeline(path)[-1]
    if is_pipeline_dir(path.parent):
        pipe = load_pipeline(path.parent)
        return pipe[path.name]
    if not (path / "config.json").is_file():
        raise ValueError(f"resolve: {path} is not a poisonmech run directory (no config.json); pass the folder "
                         "train_pair or train_pipeline wrote")
    return load_pair(path)


def _bare_model(model) -> Subject:
    from poisonmech.train.reward import is_reward_model

    stage = StageInfo(kind="rm") if is_reward_model(model) else StageInfo()
    return Subject(models={MODEL_ROLE: model}, kind="model", default_role=MODEL_ROLE, reference_role=None,
                   tokenizer=getattr(model, "tokenizer", None), stage=stage)


def resolve(subject: Any, *, train=None, test=None, tokenizer=None, where: str = "resolve") -> Subject:
    """Turn any accepted subject into a :class:`Subject`.

    Accepts a ``Pair``, a pipeline stage (``pipe[k]``), a ``Pipeline`` (its last stage),
    ``pipe.between(a, b)``, a run directory (``str`` / ``Path``: a ``train_pair`` or
    ``train_pipeline`` folder, or a stage folder inside one), a bare ``TransformerBridge``
    (or any ``torch.nn.Module``), or a ``Subject``. ``train`` / ``test`` / ``tokenizer``
    replace the subject's own data (for a bare model they are the only data).
    """
    from poisonmech.train.pair import Pair
    from poisonmech.train.pipeline import Between, Pipeline

    if isinstance(subject, Subject):
        s = subject
    elif isinstance(subject, Pair):
        s = _from_pair(subject)
    elif isinstance(subject, Pipeline):
        s = _from_pair(subject[-1])
    elif isinstance(subject, Between):
        s = _from_between(subject)
    elif isinstance(subject, (str, Path)):
        s = resolve(_from_dir(Path(subject)))
    elif isinstance(subject, torch.nn.Module):
        s = _bare_model(subject)
    else:
        raise TypeError(f"{where}: the subject must be one of: {'; '.join(ACCEPTED)}; got {type(subject).__name__}")
    return s.with_data(train=train, test=test, tokenizer=tokenizer)


__all__ = ["ACCEPTED", "StageInfo", "Subject", "dataset_fingerprint", "model_fingerprint", "resolve"]
