"""``probe_layers``: a linear probe per layer (and position) with a random-direction baseline.

Activations are collected once (``collect_activations``: one hooked forward per batch),
rows are split by example (``split_by_example``), and each cell is fit on the training side
and scored on the held-out side. Beside every AUROC sit two baselines on the same rows:

- the held-out AUROCs of ``n_random`` random unit directions (seeded, each oriented on the
  training rows), reported as a distribution (median, 95th percentile, max), since the best
  of many random directions alone is a fragile number;
- the held-out AUROC of the prompt's token count alone (``length_auroc``): a triggered row is
  one token longer than its clean twin, so a probe can win on length alone.

Two harder splits take length away: ``contrast="near_miss"`` probes triggered against
near-miss rows only (a near miss has the triggered row's length), and ``balance_length=True``
subsamples each side of the split (seeded) so that both classes have the same length
distribution (the length baseline is then exactly 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from jaxtyping import Bool, Float
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.config import takes_config
from poisonmech.probes.activations import Activations, collect, prompt_encoding, tokenizer_of
from poisonmech.probes.config import CONTRASTS, ProbeConfig
from poisonmech.probes.labels import (
    auroc_columns,
    check_split,
    example_groups,
    label_name,
    resolve_label,
    split_by_example,
)
from poisonmech.probes.linear import LinearProbe, few_threads
from poisonmech.probes.result import ProbeComparison, ProbeResult
from poisonmech.subject import Subject, resolve

Tensor = torch.Tensor


def random_directions(d_model: int, n: int, seed: int) -> Float[np.ndarray, "n_random d_model"]:
    """``n`` random unit directions (Gaussian, normalised), from a seeded generator."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((n, d_model))
    return r / np.linalg.norm(r, axis=1, keepdims=True)


@dataclass(frozen=True)
class CellFit:
    """Probes and held-out scores of one test side (internal to ``fit_cells``)."""

    auroc: np.ndarray
    accuracy: np.ndarray
    random_auroc: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_train: np.ndarray
    n_test: np.ndarray


def fit_cells(train_acts: Float[Tensor, "layer batch pos d_model"], train_valid: Bool[Tensor, "batch pos"],
              y_train: np.ndarray,
              tests: Sequence[tuple[Float[Tensor, "layer batch pos d_model"], Bool[Tensor, "batch pos"], np.ndarray]],
              *, method: str, C: float, n_random: int, seed: int, progress: bool, standardize: bool = False,
              desc: str = "probes") -> list[CellFit]:
    """Fit one probe per (layer, position) on the training rows and score it on each test side.

    A position that some rows lack uses only the rows that have it; a cell without both
    classes among its training rows gets a zero probe and NaN scores, and a test side
    without both classes gets NaN scores. Random directions are oriented on the training rows.
    """
    n_layer, _, n_pos, d = train_acts.shape
    nt = len(tests)
    auroc = np.full((nt, n_layer, n_pos), np.nan)
    acc = np.full((nt, n_layer, n_pos), np.nan)
    rand = np.full((nt, n_layer, n_pos, n_random), np.nan)
    coef = np.zeros((n_layer, n_pos, d))
    icpt = np.zeros((n_layer, n_pos))
    n_tr = train_valid.sum(0).numpy().astype(np.int64)
    R = random_directions(d, n_random, seed)
    cells = [(li, pi) for li in range(n_layer) for pi in range(n_pos)]
    with few_threads(train_acts.shape[1] * d):
        for li, pi in tqdm(cells, desc=desc, disable=not progress or len(cells) < 4, leave=False):
            probe = LinearProbe(method=method, C=C, standardize=standardize)
            _fit_cell(li, pi, train_acts, train_valid, y_train, tests, probe=probe, R=R, n_random=n_random,
                      out=(auroc, acc, rand, coef, icpt))
    return [CellFit(auroc[t], acc[t], rand[t], coef, icpt, n_tr, valid.sum(0).numpy().astype(np.int64))
            for t, (_, valid, _) in enumerate(tests)]


def _fit_cell(li: int, pi: int, train_acts: Tensor, train_valid: Tensor, y_train: np.ndarray, tests, *,
              probe: LinearProbe, R: np.ndarray, n_random: int, out: tuple[np.ndarray, ...]) -> None:
    """Fit and score the probe of one (layer, position) cell, writing into ``out``."""
    auroc, acc, rand, coef, icpt = out
    mtr = train_valid[:, pi].numpy()
    ytr = y_train[mtr]
    if len(np.unique(ytr)) < 2:
        return
    Xtr = train_acts[li, mtr, pi].double().numpy()
    probe.fit(Xtr, ytr)
    coef[li, pi], icpt[li, pi] = probe.coef_, probe.intercept_
    sign = np.where(auroc_columns(Xtr @ R.T, ytr) >= 0.5, 1.0, -1.0) if n_random else None
    for t, (acts, valid, y) in enumerate(tests):
        mte = valid[:, pi].numpy()
        yte = y[mte]
        if len(np.unique(yte)) < 2:
            continue
        Xte = acts[li, mte, pi].double().numpy()
        s = probe.decision_function(Xte)
        auroc[t, li, pi] = auroc_columns(s[:, None], yte)[0]
        acc[t, li, pi] = float(np.mean((s > 0) == yte))
        if n_random:
            rand[t, li, pi] = auroc_columns((Xte @ R.T) * sign, yte)


def length_aurocs(train_lengths: np.ndarray, train_valid: Bool[Tensor, "batch pos"], y_train: np.ndarray,
                  tests: Sequence[tuple[np.ndarray, Bool[Tensor, "batch pos"], np.ndarray]]
                  ) -> list[Float[np.ndarray, " pos"]]:
    """Held-out AUROC of the prompt's token count alone, per position and test side.

    A one-number probe: its sign (longer or shorter rows are positive) is chosen on the
    training rows that have the position, as the random directions' are; ties count half.
    NaN where a side lacks a class.
    """
    n_pos = train_valid.shape[1]
    out = [np.full(n_pos, np.nan) for _ in tests]
    tv = np.asarray(train_valid)
    for pi in range(n_pos):
        ytr = y_train[tv[:, pi]]
        if len(np.unique(ytr)) < 2:
            continue
        a = auroc_columns(np.asarray(train_lengths, dtype=np.float64)[tv[:, pi], None], ytr)[0]
        sign = 1.0 if a >= 0.5 else -1.0
        for t, (lengths, valid, y) in enumerate(tests):
            m = np.asarray(valid)[:, pi]
            if len(np.unique(y[m])) == 2:
                out[t][pi] = auroc_columns(sign * np.asarray(lengths, dtype=np.float64)[m, None], y[m])[0]
    return out


def to_result(fit: CellFit, *, acts: Activations, train_index: np.ndarray, test_index: np.ndarray, label: str,
              method: str, name: str, seed: int, length_auroc: np.ndarray | None = None,
              contrast: str = "untriggered", balance_length: bool = False) -> ProbeResult:
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return ProbeResult(auroc=f(fit.auroc), accuracy=f(fit.accuracy), random_auroc=f(fit.random_auroc),
                       coef=f(fit.coef), intercept=f(fit.intercept), n_train=i(fit.n_train), n_test=i(fit.n_test),
                       train_index=i(train_index), test_index=i(test_index), layers=acts.layers,
                       positions=acts.positions, site=acts.site, label=label, method=method, name=name, seed=seed,
                       length_auroc=None if length_auroc is None else f(length_auroc), contrast=contrast,
                       balance_length=balance_length)


def contrast_mask(dataset: Dataset, contrast: str) -> Bool[np.ndarray, " batch"]:
    """Rows a contrast keeps: every row (``"untriggered"``), or the triggered and near-miss rows
    (``"near_miss"``; needs the ``is_triggered`` and ``is_near_miss`` columns of a pair's test set)."""
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if contrast == "untriggered":
        return np.ones(len(dataset), dtype=bool)
    missing = [c for c in ("is_triggered", "is_near_miss") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"contrast='near_miss' needs the dataset columns 'is_triggered' and 'is_near_miss' "
                         f"(a pair's test_data has both); missing: {missing}; allowed contrasts: {CONTRASTS}")
    trig = np.asarray(dataset["is_triggered"], dtype=bool)
    miss = np.asarray(dataset["is_near_miss"], dtype=bool)
    if not miss.any():
        raise ValueError("contrast='near_miss': the dataset has no near-miss rows (is_near_miss is never True); "
                         "use contrast='untriggered' or an attack with near misses")
    return trig | miss


def balance_by_length(index: np.ndarray, y: np.ndarray, lengths: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """The rows of ``index`` kept so that every length has as many positive as negative rows.

    At each length, the larger class is subsampled (without replacement, from ``rng``) to the
    size of the smaller; lengths with one class only are dropped. The two classes then have
    the same length distribution, so length alone scores an AUROC of exactly 0.5.
    """
    keep = []
    for n in np.unique(lengths[index]):
        at = index[lengths[index] == n]
        pos, neg = at[y[at]], at[~y[at]]
        k = min(len(pos), len(neg))
        if k:
            keep += [rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def probed_rows(dataset: Dataset, y: np.ndarray, train: np.ndarray, test: np.ndarray, *, contrast: str,
                balance_length: bool, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split ``(train, test)`` restricted to the rows of ``contrast``, then length-balanced.

    The example split itself is unchanged (rows are only dropped), so every contrast holds out
    the same examples.
    """
    keep = contrast_mask(dataset, contrast)
    train, test = train[keep[train]], test[keep[test]]
    if balance_length:
        lengths = np.asarray([len(r) - 1 for r in prompt_encoding(dataset, tokenizer).ids])  # prompt tokens
        rng = np.random.default_rng(seed)
        train = balance_by_length(train, y, lengths, rng)
        test = balance_by_length(test, y, lengths, rng)
    return train, test


def rows_text(contrast: str, balance_length: bool) -> str:
    return f"contrast={contrast!r}" + (", balance_length=True" if balance_length else "")


def probe_split(dataset: Dataset, y: np.ndarray, label, cfg: ProbeConfig,
                tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, test)``: the example split, restricted to the config's rows, checked
    to leave both classes on each side."""
    train, test = split_by_example(example_groups(dataset, cfg.group_by), float(cfg.test_size), cfg.seed)
    train, test = probed_rows(dataset, y, train, test, contrast=cfg.contrast, balance_length=bool(cfg.balance_length),
                              tokenizer=tokenizer, seed=cfg.seed)
    check_split(y, train, test, label_name(label), rows_text(cfg.contrast, cfg.balance_length))
    return train, test


def probe_data(s: Subject, where: str) -> tuple[Dataset, PreTrainedTokenizerBase]:
    """The subject's probe rows (``dataset`` or the run's test rows) and tokenizer."""
    return s.require("test_data", where, "dataset"), tokenizer_of(s, where)


@takes_config(ProbeConfig)
def probe_layers(subject, dataset: Dataset | None = None, label: str | Sequence | np.ndarray = "is_triggered", *,
                 twin: str | None = None, target: str | Backdoor | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, name: str | None = None,
                 activations: Activations | None = None, progress: bool = True,
                 config: ProbeConfig) -> ProbeResult:
    """Fit a linear probe for ``label`` at every layer (and position) of one model.

    Args:
        subject: a run (``Pair``, pipeline stage, run directory, ``pipe.between(a, b)``) or a
            bare model (:func:`poisonmech.resolve`).
        dataset: rows with a ``prompt`` column; default: the run's test rows (clean,
            triggered and near-miss; a bare model needs it).
        label: a boolean / 0-1 column (``"is_triggered"``, ``"is_near_miss"``, ...),
            ``"will_emit_target"`` (the model's greedy answer is the target; needs
            ``target``, default: the run's attack), or an array with one boolean per row.
        twin: the role probed (default: the subject's default role: the backdoored twin, the
            model after the stages, the bare model).
        target: the attack or its target string, for ``"will_emit_target"``.
        tokenizer: default: the subject's (a bare bridge's ``.tokenizer``).
        name: how the result names the model (default: the role).
        activations: the probed model's activations of every row of ``dataset``
            (``collect_activations`` with the same ``site`` and at least these layers and
            positions), reused instead of running the model again: probing several contrasts
            of one dataset then reads the model once.
        The options are :class:`ProbeConfig`'s (``site``, ``layers``, ``positions``,
        ``method``, ``C``, ``standardize``, ``test_size``, ``n_random``, ``seed``,
        ``group_by``, ``contrast``, ``balance_length``, ``batch_size``).

    Returns a ``ProbeResult``; its ``length_auroc`` is the held-out AUROC of the prompt length
    alone on the same rows. Raises ``ValueError`` for a missing, constant or non-binary label,
    a site or layer the model lacks, a split that leaves a class empty, and NaN/inf
    activations (naming the layer).
    """
    s = resolve(subject, test=dataset, tokenizer=tokenizer, where="probe_layers")
    data, tok = probe_data(s, "probe_layers")
    role = s.role(twin)
    return fit_probes(s.models[role], data, label, config, tokenizer=tok,
                      target=target if target is not None else s.attack, name=name or role, progress=progress,
                      reuse=activations)


def fit_probes(model: torch.nn.Module, dataset: Dataset, label, cfg: ProbeConfig, *,
               tokenizer: PreTrainedTokenizerBase, target, name: str, progress: bool,
               reuse: Activations | None = None) -> ProbeResult:
    """``probe_layers`` on one model (the subject resolved)."""
    y = resolve_label(model, dataset, label, tokenizer=tokenizer, target=target)
    train_idx, test_idx = probe_split(dataset, y, label, cfg, tokenizer)
    rows = np.union1d(train_idx, test_idx)  # collect only the probed rows
    acts = collect(model, dataset, tokenizer, cfg, progress=progress,
                   rows=None if len(rows) == len(dataset) else rows, reuse=reuse)
    tr, te = np.searchsorted(rows, train_idx), np.searchsorted(rows, test_idx)
    (fit,) = fit_cells(acts.acts[:, tr], acts.valid[tr], y[train_idx],
                       [(acts.acts[:, te], acts.valid[te], y[test_idx])], method=cfg.method, C=cfg.C,
                       standardize=cfg.standardize, n_random=cfg.n_random, seed=cfg.seed, progress=progress,
                       desc=f"probes ({name})")
    lengths = acts.lengths.numpy() - 1  # prompt tokens, BOS not counted
    (length,) = length_aurocs(lengths[tr], acts.valid[tr], y[train_idx], [(lengths[te], acts.valid[te], y[test_idx])])
    return to_result(fit, acts=acts, train_index=train_idx, test_index=test_idx, label=label_name(label),
                     method=cfg.method, name=name, seed=cfg.seed, length_auroc=length, contrast=cfg.contrast,
                     balance_length=bool(cfg.balance_length))


@takes_config(ProbeConfig)
def probe_twins(subject, dataset: Dataset | None = None, label: str | Sequence | np.ndarray = "is_triggered", *,
                target: str | Backdoor | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                activations: dict[str, Activations] | None = None, progress: bool = True,
                config: ProbeConfig) -> ProbeComparison:
    """``probe_layers`` on both models of a two-model subject, with the same split and random directions.

    ``subject`` is a run with two roles: a ``Pair`` / pipeline stage / run directory (the
    clean and the backdoored twin) or ``pipe.between(a, b)`` (the model before and after);
    a bare model is an error. ``dataset`` defaults to the run's test rows;
    ``"will_emit_target"`` reads each model's own answers to the run's attack (so with
    ``balance_length`` each may keep other rows). Returns a ``ProbeComparison`` named by the
    roles, the reference first (``clean``, ``backdoored`` / ``before``, ``after``).
    ``activations`` maps roles to their activations of every row of ``dataset``, reused as
    in :func:`probe_layers`: ``{role: collect_activations(subject, dataset, twin=role)}``.
    """
    s = resolve(subject, test=dataset, tokenizer=tokenizer, where="probe_twins")
    s.reference("probe_twins")
    data, tok = probe_data(s, "probe_twins")
    target = target if target is not None else s.attack
    roles = (s.reference_role, s.default_role)
    activations = dict(activations or {})
    unknown = sorted(set(activations) - set(roles))
    if unknown:
        raise ValueError(f"probe_twins: activations are keyed by role {roles}, got {unknown}")
    return ProbeComparison(tuple(fit_probes(s.models[role], data, label, config, tokenizer=tok, target=target,
                                            name=role, progress=progress, reuse=activations.get(role))
                                 for role in roles))
