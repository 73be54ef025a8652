"""Weight-difference audits: "Watch the Weights" (Zhong & Raghunathan, 2025) on the twins.

Fine-tuning writes what it learned into the update ``ΔW = W_finetuned - W_start`` of the matrices
that write to the residual stream (each layer's attention output projection ``W_O`` and MLP output
projection ``W_out``). The top left singular vectors of each ``ΔW`` are directions in the residual
stream that the update writes along most; an input that drives the activations along one of them
further than any trusted clean input did is flagged. No training data and no trigger are needed:
only the model, its starting point and a few clean inputs.

- :func:`starting_point`: the model a twin's training started from: the shared initial weights of
  a from-scratch run (the run's ``ModelConfig`` built with ``TrainConfig.seed``, as
  ``train_pair`` and ``influence.retrain.train_on_subset`` build it), the pretrained base of a
  full fine-tune, the previous stage's twin of a pipeline stage (read from the pipeline's run
  directory), the ``before`` model of a before/after view.
- :func:`weight_update`: ``{matrix name: ΔW}`` for every residual-writing matrix, each ``ΔW`` as
  ``d_model x d_in`` (``nn.Linear``'s orientation: its left singular vectors live in the residual
  stream). A LoRA twin's update is its adapters' own ``B A * alpha / r`` (peft's
  ``get_delta_weight``; zero for a matrix without adapters).
- ``"weight_diff_monitor"`` (:class:`WeightDiffMonitor`, an input filter): per input and direction
  the cosine (or projection) of the residual stream after the matrix's layer (WtW's reading; or
  the matrix's own output) with the direction, its maximum and minimum over the prompt's tokens
  (or its value at the last prompt token); calibrated on ``ctx.clean_data``: per direction the
  clean range (WtW's rule) or z-scores; the score is the largest excess over the clean range in
  units of the range's width (positive: outside the range) or the largest ``|z|``.
- ``"weight_diff"`` (:class:`WeightDiffAudit`, a model audit): the fraction of the subject's
  unlabelled deployment inputs (its test inputs, which contain triggered ones: that is WtW's
  setting, a monitor watching the traffic a deployed model receives) that the monitor flags at
  its clean-calibrated threshold. Its ground truth is which twin the model is.

Calibration is honest about its own rows: a clean row that the statistics were fit on is scored
leave-one-out (against the range / mean and spread of the *other* clean rows), so the threshold the
benchmark draws from the clean rows' scores (``calibrate``: the ``1 - frr`` quantile) holds for
fresh clean inputs too; without it every clean row would lie inside a range it helped draw, and
the range rule would flag far more than ``frr`` of new clean inputs. Written by hand: no library
computes leave-one-out ranges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from poisonmech import sites
from poisonmech.config import Config, ConfigError, check_choice, check_number
from poisonmech.defenses.base import Context, InputFilter, ModelAudit, register
from poisonmech.runtime import eval_mode, model_device
from poisonmech.subject import TWIN_ROLES, Subject, resolve

#: the sites whose matrices write to the residual stream: attention output (W_O), MLP output (W_out)
WRITING_SITES = ("attn_out", "mlp_out")
#: where a direction is read: the residual stream after its layer (WtW) or the matrix's own output
READS = ("resid_post", "output")
#: over which prompt tokens: the max and min over every prompt token (BOS excluded; WtW), or the last
POSITIONS = ("all", "last")
#: cosine similarity with the direction (WtW) or the plain projection on it
STATISTICS = ("cosine", "projection")
#: the calibration rule: the clean range per direction (WtW) or z-scores
RULES = ("range", "zscore")
#: singular directions whose singular value is below this fraction of the matrix's largest are
#: dropped: they span the null space of a low-rank update (a LoRA update of rank r has r) and are
#: arbitrary there
RELATIVE_TOLERANCE = 1e-6

_MATRIX = {"attn_out": "blocks.{layer}.attn.W_O", "mlp_out": "blocks.{layer}.mlp.W_out"}


def matrix_name(site: str, layer: int) -> str:
    """The name :func:`weight_update` gives the matrix writing ``site`` at ``layer``
    (``"blocks.0.attn.W_O"``, ``"blocks.1.mlp.W_out"``: TransformerLens' parameter names)."""
    check_choice("matrix_name", "site", site, WRITING_SITES)
    return _MATRIX[site].format(layer=int(layer))


# ------------------------------------------------------------------------- the starting point
def starting_point(subject: Any, role: str | None = None) -> torch.nn.Module:
    """The model the training of ``role`` (default: the subject's default role) started from.

    - a pair (``train_pair``, its run directory) or the first stage of a pipeline: the twins' shared
      initial weights, ``build_model(model_config, len(tokenizer), seed=train_config.seed)`` (for a
      ``PretrainedModel``: the pretrained base, checked against its recorded hash);
    - a later pipeline stage: the same twin after the previous stage, read from the pipeline's run
      directory;
    - a before/after view (``pipe.between(a, b)``): its ``before`` model for the role ``"after"``.

    A bare model, a pipeline stage held only in memory past the first (a DPO stage without a run
    directory) and the ``"before"`` role are refused with the reason.
    """
    s = resolve(subject, where="starting_point")
    role = s.role(role)
    if s.kind == "between":
        if role != "after":
            raise ValueError(f"starting_point: in a before/after view only the 'after' model has a starting point "
                             f"(the 'before' model); got role {role!r}")
        return s.models["before"]
    if s.kind == "model" or role not in TWIN_ROLES:
        raise ValueError("starting_point: a weight-difference audit needs the model's starting point, which a bare "
                         "model does not carry; pass a run (a Pair, a run directory, a pipeline stage) or a "
                         "before/after view (pipe.between(a, b))")
    missing = [p for p in ("model_config", "train_config", "tokenizer") if getattr(s, p) is None]
    if missing:
        raise ValueError(f"starting_point: the subject ({s.kind}) lacks its {', '.join(missing)}; pass a run")
    st = s.stage
    if st.pipeline_dir is not None and st.index > 0:
        return _previous_stage(s, role)
    if st.pipeline_dir is None and st.kind != "sft":
        raise ValueError(f"starting_point: a {st.kind!r} stage starts from the previous stage's weights, which this "
                         "subject does not carry (a pipeline stage held in memory); pass the pipeline's run "
                         "directory (train_pipeline(..., out_dir=...)) or pipe.between(k - 1, k)")
    from poisonmech.models import build_model

    model = s.model(role)
    return build_model(s.model_config, len(s.tokenizer), seed=s.train_config.seed, tokenizer=s.tokenizer,
                       device=model_device(model)).eval()


def _previous_stage(s: Subject, role: str) -> torch.nn.Module:
    from poisonmech.storage import read_json
    from poisonmech.train.pipeline import Stage, stage_name
    from poisonmech.train.rundir import read_twin, verify_weights

    st = s.stage
    stages = [Stage.from_dict({**d, "config": {**d["config"], "device": "cpu"}})
              for d in read_json(st.pipeline_dir / "config.json")["stages"]]
    d = st.pipeline_dir / stage_name(st.index - 1, stages[st.index - 1]) / role
    if not (d / "model.safetensors").is_file():
        raise ValueError(f"starting_point: the previous stage's {role} twin is not in the pipeline run ({d})")
    verify_weights([d], f"starting_point({str(d)!r})")
    model, _, _ = read_twin(d, s.model_config, s.tokenizer, seed=stages[0].config.seed,
                            device=str(model_device(s.model(role))))
    return model


# ------------------------------------------------------------------------------ the update
def _layer_sites(model: torch.nn.Module, site_names: tuple[str, ...] | None) -> tuple[str, ...]:
    """The writing sites to read (``None``: those the model has), each checked against the model."""
    if site_names is None:
        have = tuple(x for x in WRITING_SITES if sites.missing_site(model, x) is None)
        if not have:
            raise ValueError("weight_update: the model has none of the residual-writing sites "
                             f"{WRITING_SITES}")
        return have
    for x in site_names:
        sites.check_site(model, x, WRITING_SITES, field="sites")
    return tuple(site_names)


@torch.no_grad()
def written_matrices(model: torch.nn.Module, site_names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The residual-writing matrices of ``model`` (a TransformerBridge), each ``d_model x d_in``:
    ``W_O`` of each layer as ``d_model x (n_heads d_head)``, ``W_out`` as ``d_model x d_mlp``
    (read through TransformerLens' ``W_O`` / ``W_out``, so every architecture it bridges is read
    alike). Float32 copies on the CPU, ordered by layer then site."""
    chosen = _layer_sites(model, site_names)
    d_model = int(model.cfg.d_model)
    w_o = model.W_O.detach() if "attn_out" in chosen else None  # layer head d_head d_model
    w_out = model.W_out.detach() if "mlp_out" in chosen else None  # layer d_mlp d_model
    out = {}
    for layer in range(int(model.cfg.n_layers)):
        for site in chosen:
            w = w_o[layer].reshape(-1, d_model) if site == "attn_out" else w_out[layer]
            out[matrix_name(site, layer)] = w.T.float().cpu().clone()
    return out


@torch.no_grad()
def lora_update(model: torch.nn.Module, site_names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """A LoRA twin's adapters' own update of each residual-writing matrix, ``d_model x d_in``:
    ``B A * alpha / r`` (peft's ``get_delta_weight``), zero for a matrix without adapters."""
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    from poisonmech.weights import lora_module

    adapted = lora_module(model)
    if adapted is None:
        raise ValueError("lora_update: the model is not a LoRA twin (no LoRA module attached)")
    chosen = _layer_sites(model, site_names)
    shapes = written_matrices(model, chosen)
    out = {}
    for layer, block in enumerate(model.blocks):
        for site in chosen:
            name = matrix_name(site, layer)
            part = block.attn if site == "attn_out" else block.mlp
            linear = part.o if site == "attn_out" else part.out
            hf_name = ".".join([block.name, part.name, linear.name])  # the HF module's name in the adapted copy
            try:
                module = adapted.get_submodule(hf_name)
            except AttributeError:
                raise ValueError(f"lora_update: the LoRA module has no {hf_name!r} (the bridge's {name})") from None
            if not isinstance(module, LoraLayer):
                out[name] = torch.zeros_like(shapes[name])
                continue
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            if isinstance(module.get_base_layer(), Conv1D):  # GPT-2's Conv1D stores d_in x d_out
                delta = delta.T
            if tuple(delta.shape) != tuple(shapes[name].shape):
                raise ValueError(f"lora_update: the adapters of {hf_name!r} give a {tuple(delta.shape)} update, the "
                                 f"bridge's {name} is {tuple(shapes[name].shape)}")
            out[name] = delta.detach().float().cpu()
    return out


def _context(ctx_or_subject: Any, role: str | None) -> Context:
    if isinstance(ctx_or_subject, Context):
        return ctx_or_subject
    s = resolve(ctx_or_subject, where="weight_update")
    return Context(subject=s, role=s.role(role))


def weight_update(ctx: Any, sites: tuple[str, ...] | None = None, *, role: str | None = None
                  ) -> dict[str, torch.Tensor]:
    """``{matrix name: ΔW}``: what fine-tuning changed in every residual-writing matrix of the model
    under test (:func:`matrix_name` names them), each ``d_model x d_in``.

    ``ΔW = W_model - W_start`` with the start from :func:`starting_point`; for a LoRA twin the
    adapters' own update (:func:`lora_update`; for a later pipeline stage, minus the previous
    stage's adapters' update). ``ctx``: a defense :class:`~poisonmech.defenses.base.Context` (its
    cache keeps the update) or any subject (with ``role``). ``sites``: a subset of
    :data:`WRITING_SITES` (default: those the model has)."""
    ctx = _context(ctx, role)
    model = ctx.model
    chosen = _layer_sites(model, None if sites is None else tuple(sites))
    from poisonmech.weights import lora_module

    def compute() -> dict[str, torch.Tensor]:
        every = _layer_sites(model, None)
        if lora_module(model) is not None:
            upd = lora_update(model, every)
            st = ctx.subject.stage
            if ctx.subject.kind == "between" or (st.pipeline_dir is not None and st.index > 0):
                start = starting_point(ctx.subject, ctx.role)
                before = lora_update(start, every) if lora_module(start) is not None else None
                if before is None:
                    raise ValueError("weight_update: the starting point of this LoRA twin is not a LoRA twin")
                upd = {k: v - before[k] for k, v in upd.items()}
            return upd
        start = starting_point(ctx.subject, ctx.role)
        after, before = written_matrices(model, every), written_matrices(start, every)
        if set(after) != set(before) or any(after[k].shape != before[k].shape for k in after):
            raise ValueError("weight_update: the starting point's matrices do not match the model's (another "
                             "architecture or size)")
        return {k: after[k] - before[k] for k in after}

    every_update = ctx.cached(f"weight_diff/update/{ctx.role}", compute)
    return {k: v for k, v in every_update.items() if any(k == matrix_name(x, k.split(".")[1]) for x in chosen)}


# --------------------------------------------------------------------------- the directions
@dataclass(frozen=True)
class Directions:
    """The top left singular vectors of each matrix's update.

    ``vectors[i]`` (unit, ``d_model``) is singular vector ``index[i]`` of ``matrix[i]``'s update
    (site ``site[i]`` at ``layer[i]``), ``singular[i]`` its singular value."""

    vectors: torch.Tensor  # direction d_model
    singular: np.ndarray
    matrix: tuple[str, ...]
    site: tuple[str, ...]
    layer: tuple[int, ...]
    index: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.matrix)

    def names(self) -> list[str]:
        return [f"{m}/u{i}" for m, i in zip(self.matrix, self.index)]


def update_directions(update: dict[str, torch.Tensor], rank: int) -> Directions:
    """The top-``rank`` left singular vectors of each update (``torch.linalg.svd``, float64),
    leaving out a zero update and the directions whose singular value is below
    :data:`RELATIVE_TOLERANCE` of the matrix's largest (the null space of a low-rank update)."""
    check_number("update_directions", "rank", rank, lo=1, integer=True)
    vecs, sing, mats, site_of, layer_of, index = [], [], [], [], [], []
    inverse = {v: k for k, v in _MATRIX.items()}
    for name, delta in update.items():
        m = delta.detach().to(torch.float64)
        if not torch.any(m != 0):
            continue
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        keep = [i for i in range(min(rank, len(s))) if s[i] > RELATIVE_TOLERANCE * s[0]]
        parts = name.split(".")
        template = ".".join([parts[0], "{layer}", *parts[2:]])
        for i in keep:
            vecs.append(u[:, i])
            sing.append(float(s[i]))
            mats.append(name)
            site_of.append(inverse[template])
            layer_of.append(int(parts[1]))
            index.append(i)
    if not vecs:
        raise ValueError("weight_diff: the model's chosen matrices equal its starting point's (a zero update): there "
                         "is no direction to monitor")
    return Directions(vectors=torch.stack(vecs).float(), singular=np.asarray(sing), matrix=tuple(mats),
                      site=tuple(site_of), layer=tuple(layer_of), index=tuple(index))


# ----------------------------------------------------------------------------- the features
def _read_hook(site: str, layer: int, read: str) -> str:
    return sites.hook_name("resid_post" if read == "resid_post" else site, layer)


@torch.no_grad()
def direction_features(model: torch.nn.Module, dataset: Dataset, tokenizer, directions: Directions, *,
                       read: str = "resid_post", positions: str = "all", statistic: str = "cosine",
                       batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """``[n_rows, n_directions, 2]``: for each row's ``[BOS] + prompt`` and each direction, the
    largest and smallest ``statistic`` (the cosine of the activation with the direction, or the
    projection on it) over the prompt's tokens (BOS excluded when the prompt has any token;
    ``positions="all"``) or twice its value at the last prompt token (``"last"``). The activation
    is the residual stream after the direction's layer (``read="resid_post"``) or the output of
    the direction's matrix (``"output"``: ``hook_attn_out`` / ``hook_mlp_out``)."""
    from poisonmech.probes.activations import prompt_encoding

    check_choice("direction_features", "read", read, READS)
    check_choice("direction_features", "positions", positions, POSITIONS)
    check_choice("direction_features", "statistic", statistic, STATISTICS)
    enc = prompt_encoding(dataset, tokenizer)
    n, device = len(enc), model_device(model)
    lengths = torch.tensor([len(r) for r in enc.ids], dtype=torch.long)
    hooks: dict[str, list[int]] = {}
    for i, (site, layer) in enumerate(zip(directions.site, directions.layer)):
        hook = _read_hook(site, layer, read)
        if hook not in getattr(model, "hook_dict", {}):
            raise ValueError(f"weight_diff: the model has no hook {hook!r} to read {site} of layer {layer} at")
        hooks.setdefault(hook, []).append(i)
    out = np.zeros((n, len(directions), 2))
    state: dict[str, torch.Tensor] = {}

    def make_hook(cols: list[int]):
        u = directions.vectors[cols].T.to(device)  # d_model k

        def hook(x: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001
            v = x.float() @ u  # batch pos k
            if statistic == "cosine":
                v = v / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
            mask = state["mask"][:, : v.shape[1], None]
            hi = v.masked_fill(~mask, -torch.inf).amax(1)
            lo = v.masked_fill(~mask, torch.inf).amin(1)
            out[state["rows"][:, None], np.asarray(cols)[None, :], 0] = hi.cpu().double().numpy()
            out[state["rows"][:, None], np.asarray(cols)[None, :], 1] = lo.cpu().double().numpy()
            return x
        return hook

    last_layer = max(directions.layer)
    kwargs = {"stop_at_layer": last_layer + 1} if last_layer + 1 < int(model.cfg.n_layers) else {}
    with eval_mode(model), model.hooks(fwd_hooks=[(h, make_hook(c)) for h, c in hooks.items()]):
        for lo in tqdm(range(0, n, batch_size), desc="weight_diff", disable=not progress, leave=False):
            rows = np.arange(lo, min(lo + batch_size, n))
            tokens, _ = enc.batch(rows.tolist(), device)
            length = lengths[rows][:, None]
            t = torch.arange(tokens.shape[1])[None, :]
            if positions == "all":
                first = (length > 1).long()  # skip BOS when there is a prompt
                mask = (t >= first) & (t < length)
            else:
                mask = t == length - 1
            state["rows"], state["mask"] = rows, mask.to(device)
            try:
                model(tokens, **kwargs)
            except NotImplementedError:  # a bridge without a standard block stack
                kwargs = {}
                model(tokens)
    if not np.all(np.isfinite(out)):
        raise ValueError("weight_diff: the activations gave NaN/inf statistics; check the model's weights")
    return out


# ---------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """The clean statistics a monitor scores against: the clean rows' features and prompts."""

    rule: str
    features: np.ndarray  # n_clean direction 2
    prompts: tuple[str, ...]

    def scores(self, features: np.ndarray, prompts: list[str] | None = None) -> np.ndarray:
        """One score per row of ``features`` (higher = further outside the clean rows). A row whose
        prompt is one of the clean rows' is scored leave-one-out: against the other clean rows."""
        f = np.asarray(features, dtype=float)
        n = len(self.features)
        where = {p: i for i, p in reversed(list(enumerate(self.prompts)))}
        loo = np.array([where.get(p, -1) for p in prompts] if prompts is not None else [-1] * len(f))
        if self.rule == "range":
            return self._range(f, loo)
        c = self.features
        s1, s2 = c.sum(0), (c ** 2).sum(0)  # direction 2
        x_out = np.where(loo[:, None, None] >= 0, c[np.maximum(loo, 0)], 0.0)
        k = np.where(loo >= 0, n - 1, n)[:, None, None]
        mean = (s1[None] - x_out) / k
        var = np.maximum((s2[None] - x_out ** 2) / k - mean ** 2, 0.0)
        std = np.maximum(np.sqrt(var), 1e-12 * (1.0 + np.abs(mean)))
        return np.abs((f - mean) / std).max(axis=(1, 2))

    def _range(self, f: np.ndarray, loo: np.ndarray) -> np.ndarray:
        hi_all, lo_all = self.features[:, :, 0], self.features[:, :, 1]  # clean direction
        order_hi = np.argsort(-hi_all, axis=0, kind="stable")[:2]  # the two largest maxima per direction
        order_lo = np.argsort(lo_all, axis=0, kind="stable")[:2]  # the two smallest minima
        cols = np.arange(hi_all.shape[1])
        hi1, hi2 = hi_all[order_hi[0], cols], hi_all[order_hi[1], cols]
        lo1, lo2 = lo_all[order_lo[0], cols], lo_all[order_lo[1], cols]
        hi = np.where(loo[:, None] == order_hi[0][None, :], hi2[None, :], hi1[None, :])  # row direction
        lo = np.where(loo[:, None] == order_lo[0][None, :], lo2[None, :], lo1[None, :])
        width = np.maximum(hi - lo, 1e-12)
        excess = np.maximum(f[:, :, 0] - hi, lo - f[:, :, 1]) / width
        return excess.max(axis=1)

    def clean_scores(self) -> np.ndarray:
        """The clean rows' own scores, each leave-one-out."""
        return self.scores(self.features, list(self.prompts))


def fit_calibration(features: np.ndarray, prompts: list[str], rule: str = "range") -> Calibration:
    """The clean rows' statistics (``features`` from :func:`direction_features`)."""
    check_choice("fit_calibration", "rule", rule, RULES)
    f = np.asarray(features, dtype=float)
    if f.ndim != 3 or f.shape[2] != 2 or len(f) != len(prompts):
        raise ValueError(f"fit_calibration: expected [n_clean, n_directions, 2] features for {len(prompts)} prompts, "
                         f"got {f.shape}")
    if len(f) < 3:
        raise ValueError(f"weight_diff: calibration needs at least 3 clean rows (clean_data=), got {len(f)}")
    return Calibration(rule=rule, features=f, prompts=tuple(prompts))


# ------------------------------------------------------------------------------ the defenses
@dataclass(frozen=True)
class WeightDiffOptions(Config):
    """The monitor's options, shared by ``weight_diff_monitor`` and ``weight_diff``.

    Args:
        rank: singular directions per matrix (>= 1; WtW keeps 20); fewer where the update's rank
            is lower.
        sites: the matrices, by the site they write: a subset of ``("attn_out", "mlp_out")``
            (each layer's attention / MLP output projection); ``None``: those the model has.
        read: ``"resid_post"`` (the residual stream after the matrix's layer, WtW's) or
            ``"output"`` (the matrix's own output, ``hook_attn_out`` / ``hook_mlp_out``).
        positions: ``"all"`` (the maximum and minimum over the prompt's tokens, WtW's) or
            ``"last"`` (the last prompt token, the one that predicts the answer).
        statistic: ``"cosine"`` (WtW's) or ``"projection"``.
        rule: ``"range"`` (the excess over the clean rows' range, in units of its width; WtW's) or
            ``"zscore"`` (the largest ``|z|`` against the clean rows' mean and spread).
        batch_size: rows per forward pass.
    """

    rank: int = 20
    sites: tuple[str, ...] | None = None
    read: str = "resid_post"
    positions: str = "all"
    statistic: str = "cosine"
    rule: str = "range"
    batch_size: int = 64

    def check_options(self) -> None:
        owner = type(self).__name__
        check_number(owner, "rank", self.rank, lo=1, integer=True)
        if self.sites is not None:
            chosen = (self.sites,) if isinstance(self.sites, str) else self.sites
            if not isinstance(chosen, (tuple, list)) or not chosen:
                raise ConfigError(f"{owner}.sites must be a non-empty subset of {WRITING_SITES} or None, "
                                  f"got {self.sites!r}")
            for x in chosen:
                check_choice(owner, "sites", x, WRITING_SITES)
            if len(set(chosen)) != len(chosen):
                raise ConfigError(f"{owner}.sites names a site twice: {self.sites!r}")
            object.__setattr__(self, "sites", tuple(chosen))
        check_choice(owner, "read", self.read, READS)
        check_choice(owner, "positions", self.positions, POSITIONS)
        check_choice(owner, "statistic", self.statistic, STATISTICS)
        check_choice(owner, "rule", self.rule, RULES)
        check_number(owner, "batch_size", self.batch_size, lo=1, integer=True)

    # -- the shared computation (cached in ctx.cache, so the monitor and the audit share it)
    def _key(self) -> str:
        return json.dumps({k: v for k, v in WeightDiffOptions.to_dict(self).items()
                           if k in ("rank", "sites", "read", "positions", "statistic")}, sort_keys=True)

    def directions(self, ctx: Context) -> Directions:
        """The monitored directions of the model under test."""
        key = json.dumps({"rank": self.rank, "sites": self.sites})
        return ctx.cached(f"weight_diff/directions/{ctx.role}/{key}",
                          lambda: update_directions(weight_update(ctx, self.sites), self.rank))

    def features(self, ctx: Context, inputs: Dataset) -> np.ndarray:
        """:func:`direction_features` of ``inputs`` on the model under test (kept for the dataset
        object last seen, so the monitor and the audit read a pool once)."""
        key = f"weight_diff/features/{ctx.role}/{self._key()}/{id(inputs)}"
        hit = ctx.cache.get(key)
        if hit is not None and hit[0] is inputs:
            return hit[1]
        f = direction_features(ctx.model, inputs, ctx.tokenizer, self.directions(ctx), read=self.read,
                               positions=self.positions, statistic=self.statistic, batch_size=self.batch_size,
                               progress=ctx.progress)
        ctx.cache[key] = (inputs, f)
        return f

    def calibration(self, ctx: Context) -> Calibration:
        """The statistics of the trusted clean rows (``ctx.clean_data``)."""
        clean = ctx.need("clean_data", self.name)
        return ctx.cached(f"weight_diff/calibration/{ctx.role}/{self._key()}/{self.rule}/{id(clean)}",
                          lambda: fit_calibration(self.features(ctx, clean), list(clean["prompt"]), self.rule))

    def input_scores(self, ctx: Context, inputs: Dataset) -> np.ndarray:
        if "prompt" not in inputs.column_names:
            raise ValueError(f"defense {self.name!r}: the inputs need a 'prompt' column; they have "
                             f"{inputs.column_names}")
        cal = self.calibration(ctx)
        return cal.scores(self.features(ctx, inputs), list(inputs["prompt"]))


@register
@dataclass(frozen=True)
class WeightDiffMonitor(InputFilter, WeightDiffOptions):
    """Watch the Weights' monitor: flag inputs that drive the activations along the top singular
    directions of the fine-tuning update further than any trusted clean input (see the module
    docstring). Options: :class:`WeightDiffOptions`' and ``frr`` (the false-rejection rate on
    clean inputs its threshold is set to)."""

    name: ClassVar[str] = "weight_diff_monitor"
    summary: ClassVar[str] = ("activations along the top singular directions of the fine-tuning update, outside "
                              "their clean range (Watch the Weights)")
    uses_trigger: ClassVar[bool] = False

    def check(self) -> None:
        InputFilter.check(self)
        self.check_options()

    def score(self, ctx: Context, inputs: Dataset) -> np.ndarray:
        return self.input_scores(ctx, inputs)


@register
@dataclass(frozen=True)
class WeightDiffAudit(ModelAudit, WeightDiffOptions):
    """A model audit from the weight-difference monitor: the fraction of the subject's unlabelled
    deployment inputs (its test inputs, triggered ones among them: WtW's setting) the monitor
    flags at the threshold set on trusted clean rows (their leave-one-out scores' ``1 - frr``
    quantile). A clean model flags about ``frr`` of them; a backdoored one also flags the inputs
    that use its backdoor.

    Args:
        frr: the false-rejection rate on clean inputs the threshold is set to, in [0, 1).
        (and :class:`WeightDiffOptions`')
    """

    name: ClassVar[str] = "weight_diff"
    summary: ClassVar[str] = ("fraction of deployment inputs the weight-difference monitor flags at its "
                              "clean-calibrated threshold (Watch the Weights)")
    uses_trigger: ClassVar[bool] = False
    frr: float = 0.01

    def check(self) -> None:
        check_number(type(self).__name__, "frr", self.frr, lo=0.0, hi=1.0, hi_open=True)
        self.check_options()

    def threshold(self, ctx: Context) -> float:
        """The monitor's threshold from the clean rows' leave-one-out scores."""
        return float(np.quantile(self.calibration(ctx).clean_scores(), 1.0 - self.frr, method="higher"))

    def score_model(self, ctx: Context) -> float:
        pool = ctx.subject.require("test_data", f"defense {self.name!r}")
        if not len(pool):
            raise ValueError(f"defense {self.name!r}: the subject's test inputs are empty")
        return float(np.mean(self.input_scores(ctx, pool) > self.threshold(ctx)))


__all__ = ["Calibration", "Directions", "POSITIONS", "READS", "RULES", "STATISTICS", "WRITING_SITES", "WeightDiffAudit",
           "WeightDiffMonitor", "WeightDiffOptions", "direction_features", "fit_calibration", "lora_update",
           "matrix_name", "starting_point", "update_directions", "weight_update", "written_matrices"]
