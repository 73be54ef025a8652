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
from typing import Literal

import numpy as np
import torch
from datasets import Dataset
from jaxtyping import Bool, Float
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.probes.activations import (
    Activations,
    PositionSpec,
    Site,
    _tokenizer,
    collect_activations,
    prompt_encoding,
)
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

Tensor = torch.Tensor

#: which rows a probe sees: every row, or only triggered and near-miss rows
CONTRASTS = ("untriggered", "near_miss")


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


def check_method(method: str, n_random: int) -> None:
    if method not in ("logistic", "mean_diff"):
        raise ValueError(f"method must be one of ('logistic', 'mean_diff'), got {method!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be an integer >= 0, got {n_random!r}")


def check_rows(contrast: str, balance_length: bool) -> None:
    """``ValueError`` naming the allowed values of ``contrast`` and ``balance_length``."""
    if not isinstance(contrast, str) or contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if not isinstance(balance_length, (bool, np.bool_)):
        raise ValueError(f"balance_length must be True or False, got {balance_length!r}")


def contrast_mask(dataset: Dataset, contrast: str) -> Bool[np.ndarray, " batch"]:
    """Rows a contrast keeps: every row (``"untriggered"``), or the triggered and near-miss rows
    (``"near_miss"``; needs the ``is_triggered`` and ``is_near_miss`` columns of a pair's test set)."""
    check_rows(contrast, False)
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


def probe_layers(model: torch.nn.Module, dataset: Dataset, label: str | Sequence | np.ndarray = "is_triggered", *,
                 site: Site = "resid_post", layers: int | Sequence[int] | None = None,
                 positions: PositionSpec = "last", method: Literal["logistic", "mean_diff"] = "logistic",
                 C: float = 1.0, standardize: bool = False, test_size: float = 0.3, n_random: int = 100,
                 seed: int = 0, group_by: str | None = None, target: str | Backdoor | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 64,
                 name: str = "model", contrast: Literal["untriggered", "near_miss"] = "untriggered",
                 balance_length: bool = False, progress: bool = True) -> ProbeResult:
    """Fit a linear probe for ``label`` at every layer (and position) of ``model``.

    Args:
        model: a ``TransformerBridge`` (e.g. ``pair.backdoored``).
        dataset: rows with a ``prompt`` column (e.g. ``pair.test_data``).
        label: a boolean / 0-1 column (``"is_triggered"``, ``"is_near_miss"``, ...),
            ``"will_emit_target"`` (the model's greedy answer is the target; needs
            ``target``), or an array with one boolean per row.
        site: ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``, ``"mlp_out"``.
        layers: layer numbers; ``None`` for all.
        positions: ``"last"`` (each row's last prompt token), ``"all"`` or a list of ints
            (negative ones count from the end of each prompt).
        method: ``"logistic"`` (L2, strength ``1/C``) or ``"mean_diff"``.
        standardize: fit the logistic probe on standardised activations (see ``LinearProbe``).
        test_size: fraction of *examples* held out (rows sharing ``group_by`` stay together).
        n_random: random unit directions per cell for the baseline (0: none).
        seed: seeds the split and the random directions (nothing global is seeded).
        group_by: the column naming each row's example; default ``base_id`` when present.
        target: the attack (``pair.attack``) or its target string, for ``"will_emit_target"``.
        tokenizer: defaults to ``model.tokenizer``.
        name: how the result names the model (``"backdoored"``, ``"clean"``, ...).
        contrast: which rows are probed: ``"untriggered"`` (every row: triggered against all
            untriggered ones) or ``"near_miss"`` (triggered and near-miss rows only, which have
            the same length; needs the ``is_triggered`` / ``is_near_miss`` columns).
        balance_length: subsample each side of the split (seeded by ``seed``) so that positive
            and negative rows have the same prompt-length distribution.

    Returns a ``ProbeResult``; its ``length_auroc`` is the held-out AUROC of the prompt length
    alone on the same rows. Raises ``ValueError`` for a missing, constant or non-binary label,
    an unknown ``contrast``, a site or layer the model lacks, a split that leaves a class
    empty, and NaN/inf activations (naming the layer).
    """
    check_method(method, n_random)
    check_rows(contrast, balance_length)
    tok = _tokenizer(model, tokenizer)
    y = resolve_label(model, dataset, label, tokenizer=tok, target=target)
    train_idx, test_idx = split_by_example(example_groups(dataset, group_by), test_size, seed)
    train_idx, test_idx = probed_rows(dataset, y, train_idx, test_idx, contrast=contrast,
                                      balance_length=bool(balance_length), tokenizer=tok, seed=seed)
    check_split(y, train_idx, test_idx, label_name(label), rows_text(contrast, balance_length))
    rows = np.union1d(train_idx, test_idx)  # collect only the probed rows
    sub = dataset if len(rows) == len(dataset) else dataset.select(rows.tolist())
    acts = collect_activations(model, sub, site=site, layers=layers, positions=positions, tokenizer=tok,
                               batch_size=batch_size, progress=progress)
    tr, te = np.searchsorted(rows, train_idx), np.searchsorted(rows, test_idx)
    (fit,) = fit_cells(acts.acts[:, tr], acts.valid[tr], y[train_idx],
                       [(acts.acts[:, te], acts.valid[te], y[test_idx])], method=method, C=C,
                       standardize=standardize, n_random=n_random, seed=seed, progress=progress,
                       desc=f"probes ({name})")
    lengths = acts.lengths.numpy() - 1  # prompt tokens, BOS not counted
    (length,) = length_aurocs(lengths[tr], acts.valid[tr], y[train_idx], [(lengths[te], acts.valid[te], y[test_idx])])
    return to_result(fit, acts=acts, train_index=train_idx, test_index=test_idx, label=label_name(label),
                     method=method, name=name, seed=seed, length_auroc=length, contrast=contrast,
                     balance_length=bool(balance_length))


def probe_twins(pair, dataset: Dataset | None = None, label: str | Sequence | np.ndarray = "is_triggered", *,
                site: Site = "resid_post", layers: int | Sequence[int] | None = None,
                positions: PositionSpec = "last", method: Literal["logistic", "mean_diff"] = "logistic",
                C: float = 1.0, standardize: bool = False, test_size: float = 0.3, n_random: int = 100,
                seed: int = 0, group_by: str | None = None, batch_size: int = 64,
                contrast: Literal["untriggered", "near_miss"] = "untriggered", balance_length: bool = False,
                progress: bool = True) -> ProbeComparison:
    """``probe_layers`` on both twins of ``pair`` with the same split and random directions.

    ``dataset`` defaults to ``pair.test_data``; ``"will_emit_target"`` reads each twin's own
    answers to ``pair.attack``'s target (so with ``balance_length`` each twin may keep other
    rows). ``contrast`` and ``balance_length`` are ``probe_layers``'. Returns a
    ``ProbeComparison`` named ``clean`` and ``backdoored``.
    """
    check_rows(contrast, balance_length)
    data = pair.test_data if dataset is None else dataset
    results = []
    for twin in ("clean", "backdoored"):
        results.append(probe_layers(pair.model(twin), data, label, site=site, layers=layers, positions=positions,
                                    method=method, C=C, standardize=standardize, test_size=test_size,
                                    n_random=n_random, seed=seed,
                                    group_by=group_by, target=pair.attack,
                                    tokenizer=pair.tokenizer, batch_size=batch_size, name=twin,
                                    contrast=contrast, balance_length=balance_length, progress=progress))
    return ProbeComparison(tuple(results))
