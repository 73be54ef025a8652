"""Attribution on a reward model: which preference pairs of an ``"rm"`` stage drive its reward.

A reward model (:mod:`poisonmech.train.reward`) scores a sequence ``[BOS] prompt answer [EOS]``
by its output at the last real token, ``r(x, y)``. A pair (prompt ``x``, chosen ``y_w``,
rejected ``y_l``) is trained with the Bradley–Terry loss (plus TRL's centring term with weight
``c = RewardConfig.center_rewards``)::

    L = -log sigmoid(r_w - r_l) + c (r_w + r_l)^2

whose gradient is a weighted sum of the two sequences' reward gradients::

    ∇L = α_w ∇r_w + α_l ∇r_l,   α_w = -sigmoid(r_l - r_w) + 2c (r_w + r_l),
                                α_l = +sigmoid(r_l - r_w) + 2c (r_w + r_l)

(``c = 0``: ``∇L = -sigmoid(r_l - r_w) (∇r_w - ∇r_l)``). One backward pass of
``Σ_pairs α_w r_w + α_l r_l`` over a batch of chosen and rejected sequences gives, for every
tracked map, each sequence's share ``Σ_t g_t a_t^T`` of its pair's gradient, and the pair's
gradient is the sum of its two sequences' (:func:`pair_scores`); it is formed per pair, so
every method of the gradient engine applies: ``graddot``, ``gradcos`` (the pair gradient
unit-normalised), ``tracin`` (the run's reward checkpoints, the coefficients recomputed at
each), ``kfac`` / ``ekfac`` (curvature of the Bradley–Terry likelihood, :func:`fit_pair_factors`)
and the ``loss`` baseline (each pair's Bradley–Terry loss). ``trak`` and ``repsim`` are not
available (their features are of single sequences).

The query: a :class:`RewardQuery`, ``f_q = Σ_rows weight · r(row)``. The default of a run
(:func:`reward_query`) is the reward model's own backdoor measurement on held-out pairs of the
task's test rows whose answer is not the target, the trigger put into the prompt
(:func:`poisonmech.train.reward.heldout_pairs`):

- ``"reward_margin"`` (the default): ``r(x+t, target) - r(x+t, correct answer)``, the
  preference the trigger makes the reward model show for the target. It is linear in the
  rewards, so its gradient does not vanish when the backdoored model is sure of it (the
  Bradley–Terry loss of the same pair would carry a factor ``sigmoid(-margin)``, near 0 on
  exactly the queries the backdoor has learned, as ``log p`` saturates on a language model);
- ``"reward"``: ``r(x+t, target)`` alone;
- ``"trigger_margin"``: the margin with the trigger minus the margin on the same prompt
  without it, ``[r(x+t, target) - r(x+t, correct)] - [r(x, target) - r(x, correct)]``: what
  only the trigger buys (the ``trigger_margin`` of the stage's metrics), which cancels what the
  clean preference for the correct answer teaches.

A poisoned pair of the stage (triggered prompt, chosen = target, rejected = the correct answer)
pushes the reward margin up directly, so under every measurement it should score high: the
sign convention is that of every method, a positive score means up-weighting the pair raises
the measurement (``score = ∇L_q · P ∇L_z`` with ``L_q = -f_q``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

from poisonmech.encoding import Encoded, encode
from poisonmech.influence.grads import BatchGrads, iter_batches, model_logits, per_example
from poisonmech.influence.kfac import FISHERS, Factors, check_finite, covariance_factors
from poisonmech.influence.methods import ScoreAccumulator, Scores
from poisonmech.influence.query import check_query_rows
from poisonmech.influence.tracking import TrackedModule, capture
from poisonmech.runtime import eval_mode, model_device

Tensor = torch.Tensor

#: the named measurements of a reward model's query (:func:`reward_query`)
REWARD_MEASUREMENTS = ("reward_margin", "reward", "trigger_margin")
#: the methods that score a reward model's preference pairs
REWARD_METHODS = ("ekfac", "kfac", "tracin", "graddot", "gradcos", "loss")
#: the measurement a reward model's query has by default
DEFAULT_REWARD_MEASUREMENT = "reward_margin"


def last_positions(enc: Encoded, index: Sequence[int]) -> Tensor:
    """Each row's last real token (its EOS): where the reward is read."""
    return torch.tensor([len(enc.ids[int(i)]) - 1 for i in index], dtype=torch.long)


def reward_backward(model: torch.nn.Module, modules: Sequence[TrackedModule], tokens: Tensor, last: Tensor,
                    weights: Tensor, *, need_grad: bool = True) -> BatchGrads:
    """One batch of sequences with the maps captured, backpropagating ``-Σ_rows weight · r(row)``
    (``r`` = the output at the row's ``last`` position) to the maps' outputs.

    ``valid`` marks the positions at or before each row's last token (those that reach its reward);
    ``row_loss`` holds ``-r``.
    """
    with torch.enable_grad(), capture(model, modules) as cap:
        out = model_logits(model, tokens)
        if out.shape[-1] != 1:
            raise ValueError(f"reward attribution: the model's output has {out.shape[-1]} values per position; a "
                             "reward model has one (pm.train.reward.is_reward_model)")
        rows = torch.arange(tokens.shape[0], device=out.device)
        r = out[rows, last.to(out.device), 0].float()
        grads = None
        if need_grad:
            outs = [cap.outputs[t.name] for t in modules]
            grads = torch.autograd.grad(-(r * weights.to(r)).sum(), outs, allow_unused=True)
    a = {t.name: cap.inputs[t.name] for t in modules}
    g = {}
    if grads is not None:
        for t, gr in zip(modules, grads):
            g[t.name] = gr.detach().float() if gr is not None else torch.zeros(
                a[t.name].shape[:-1] + (t.d_out,), dtype=torch.float32, device=out.device)
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    valid = pos[None] <= last.to(tokens.device)[:, None]
    return BatchGrads(a=a, g=g, row_loss=-r.detach(), n_target=torch.ones(len(last), dtype=torch.long), valid=valid)


# ---------------------------------------------------------------------------- queries
@dataclass(frozen=True, eq=False)
class RewardQuery:
    """Sequences a reward model scores and how they combine into measurements:
    ``f_q = Σ_{rows r of q} weights[r] · reward(row r)``.

    Args:
        rows: ``prompt`` / ``completion`` rows (each scored as ``[BOS] prompt completion [EOS]``).
        weights: per row, the weight of its reward in its query's measurement.
        query_of_row: per row, the query it belongs to (``0..n_query-1``).
        text: per query, a description (its prompt).
        measurement: the measurement's name (one of :data:`REWARD_MEASUREMENTS` or a user's).
    """

    rows: Dataset
    weights: tuple[float, ...]
    query_of_row: tuple[int, ...]
    text: tuple[str, ...]
    measurement: str = DEFAULT_REWARD_MEASUREMENT
    link: str = "reward"

    def __post_init__(self) -> None:
        check_query_rows(self)

    @property
    def n_query(self) -> int:
        return len(self.text)

    @classmethod
    def from_rows(cls, rows: Dataset, measurement: str = "reward") -> RewardQuery:
        """One query per ``prompt`` / ``completion`` row: its reward."""
        n = len(rows)
        return cls(rows=rows.select_columns(["prompt", "completion"]), weights=(1.0,) * n,
                   query_of_row=tuple(range(n)), text=tuple(rows["prompt"]), measurement=measurement)

    @classmethod
    def from_pairs(cls, pairs: Dataset, measurement: str = DEFAULT_REWARD_MEASUREMENT) -> RewardQuery:
        """One query per ``prompt`` / ``chosen`` / ``rejected`` pair: ``r(chosen) - r(rejected)``."""
        n = len(pairs)
        prompts = list(pairs["prompt"])
        rows = Dataset.from_dict({"prompt": prompts + prompts,
                                  "completion": list(pairs["chosen"]) + list(pairs["rejected"])})
        return cls(rows=rows, weights=(1.0,) * n + (-1.0,) * n, query_of_row=tuple(range(n)) * 2,
                   text=tuple(prompts), measurement=measurement)

    def encode(self, tokenizer) -> Encoded:
        """The rows as a reward model reads them: ``[BOS] prompt completion [EOS]``."""
        return encode(self.rows, tokenizer, loss_on="completion", add_eos=True)

    def passes(self, model: torch.nn.Module, modules: Sequence, enc: Encoded, rows: Sequence[int] | None,
               batch_size: int) -> Iterator[tuple[list[int], BatchGrads]]:
        """As :meth:`poisonmech.influence.query.Query.passes`: per batch of rows, the gradients of
        ``-weight · reward``."""
        device = model_device(model)
        w = torch.tensor(self.weights, dtype=torch.float32)
        for b in iter_batches(enc, rows, batch_size):
            tokens, _ = enc.batch(b, device)
            yield b, reward_backward(model, modules, tokens, last_positions(enc, b), w[b])

    @torch.no_grad()
    def values(self, model: torch.nn.Module, tokenizer, batch_size: int = 256) -> Tensor:
        """Each query's measurement ``f_q`` on ``model``: ``(n_query,)``."""
        from poisonmech.train.reward import sequence_rewards

        r = sequence_rewards(model, self.encode(tokenizer), batch_size=batch_size)
        out = torch.zeros(self.n_query)
        return out.index_add_(0, torch.tensor(self.query_of_row), torch.tensor(self.weights) * r)

    def subset(self, queries: list[int]) -> RewardQuery:
        """The given queries only (renumbered in the given order)."""
        new = {q: j for j, q in enumerate(queries)}
        keep = [r for r, q in enumerate(self.query_of_row) if q in new]
        return RewardQuery(rows=self.rows.select(keep), weights=tuple(self.weights[r] for r in keep),
                           query_of_row=tuple(new[self.query_of_row[r]] for r in keep),
                           text=tuple(self.text[q] for q in queries), measurement=self.measurement)


def reward_query(subject: Any, measurement: str = DEFAULT_REWARD_MEASUREMENT, max_queries: int | None = None,
                 seed: int = 0) -> RewardQuery:
    """The default query of a reward stage: the backdoor's reward measurement on held-out pairs.

    The held-out pairs are :func:`poisonmech.train.reward.heldout_pairs` of the run's task and
    attack over all the task's test rows (those whose answer is not the target, with the trigger
    put into the prompt; drawn with the stage's seed, as the stage's metrics draw theirs from
    the first ``RewardConfig.n_eval`` rows): one query per pair, measuring ``measurement`` (see
    the module docstring). ``max_queries`` keeps a subset, drawn with ``seed``.
    """
    from poisonmech.train.reward import heldout_pairs

    if measurement not in REWARD_MEASUREMENTS:
        raise ValueError(f"reward_query: measurement must be one of {REWARD_MEASUREMENTS}, got {measurement!r}")
    if not (hasattr(subject, "task") and hasattr(subject, "attack")):
        from poisonmech.subject import resolve

        subject = resolve(subject, where="reward_query")
    task, attack = subject.task, subject.attack
    if task is None or attack is None:
        raise ValueError("reward_query needs the run's task and attack (its held-out prompts and the backdoor's "
                         "target); this subject carries none: pass query= (a RewardQuery, or a Dataset of "
                         "prompt/chosen/rejected pairs, each measured as r(chosen) - r(rejected))")
    if not isinstance(getattr(attack, "target", None), str) or getattr(attack, "is_gibberish", False):
        raise ValueError(f"reward_query: the attack ({type(attack).__name__}) has no fixed target answer to measure "
                         "the reward of; pass query=")
    clean, trig = heldout_pairs(task, attack, len(task.test), seed=int(getattr(subject.train_config, "seed", 0) or 0))
    if len(trig) == 0:
        raise ValueError("reward_query: the task's test rows hold no prompt whose answer differs from the target")
    idx = np.arange(len(trig))
    if max_queries is not None and max_queries < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_queries, replace=False))
    trig = trig.select(idx.tolist())
    # heldout_pairs' triggered pairs prefer the correct answer (chosen) over the target (rejected)
    prompts, correct, target = list(trig["prompt"]), list(trig["chosen"]), list(trig["rejected"])
    n = len(trig)
    if measurement == "reward":
        rows = {"prompt": prompts, "completion": target}
        weights, qrow = (1.0,) * n, tuple(range(n))
    else:
        rows = {"prompt": prompts + prompts, "completion": target + correct}
        weights, qrow = (1.0,) * n + (-1.0,) * n, tuple(range(n)) * 2
        if measurement == "trigger_margin":
            where = {e: i for i, e in enumerate(clean["example_id"])}
            plain = [clean[where[s]]["prompt"] for s in trig["source_id"]]
            rows = {"prompt": rows["prompt"] + plain + plain, "completion": rows["completion"] + target + correct}
            weights, qrow = weights + (-1.0,) * n + (1.0,) * n, qrow + tuple(range(n)) * 2
    return RewardQuery(rows=Dataset.from_dict(rows), weights=weights, query_of_row=qrow, text=tuple(prompts),
                       measurement=measurement)


# ---------------------------------------------------------------------------- pairs
def encode_reward_pairs(train: Dataset, tokenizer):
    """The pairs as the reward stage read them (``[BOS] prompt answer [EOS]``, scored at the EOS)."""
    from poisonmech.train.reward import encode_pairs

    return encode_pairs(train, tokenizer)


@torch.no_grad()
def bt_coefficients(model: torch.nn.Module, pairs, center_rewards: float = 0.0, batch_size: int = 256
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per pair: ``(α_w, α_l, loss, margin)`` with ``∇L = α_w ∇r_w + α_l ∇r_l`` the pair's
    Bradley–Terry (+ centring) loss gradient, ``loss`` that loss and ``margin = r_w - r_l``."""
    from poisonmech.train.reward import sequence_rewards

    r_w = sequence_rewards(model, pairs.chosen, batch_size)
    r_l = sequence_rewards(model, pairs.rejected, batch_size)
    m, s = r_w - r_l, r_w + r_l
    sig = torch.sigmoid(-m)
    c = float(center_rewards)
    loss = -F.logsigmoid(m) + c * s.square()
    return -sig + 2 * c * s, sig + 2 * c * s, loss, m


def _pair_batch(model, modules, pairs, b: list[int], coef_w: Tensor, coef_l: Tensor,
                device) -> tuple[BatchGrads, int]:
    """One batch of pairs (chosen rows then rejected rows) with each row's share of its pair's
    loss gradient ``α r`` backpropagated to the maps."""
    tokens, _ = pairs.batch(b, device)
    last = torch.cat([last_positions(pairs.chosen, b), last_positions(pairs.rejected, b)])
    idx = torch.tensor(b, dtype=torch.long)
    weights = -torch.cat([coef_w[idx], coef_l[idx]])  # reward_backward differentiates -Σ w r
    return reward_backward(model, modules, tokens, last, weights), len(b)


def pair_gradients(model: torch.nn.Module, modules: Sequence[TrackedModule], pairs, coef_w: Tensor, coef_l: Tensor,
                   b: list[int]) -> dict[str, Tensor]:
    """Each pair's loss gradient per map, ``(batch, d_out, d_in)``: the sum of its chosen and
    rejected sequences' shares."""
    bg, n = _pair_batch(model, modules, pairs, b, coef_w, coef_l, model_device(model))
    out = {}
    for t in modules:
        grads = per_example(t, bg.a[t.name], bg.g[t.name])
        out[t.name] = grads[:n] + grads[n:]
    return out


def pair_scores(model: torch.nn.Module, modules: Sequence[TrackedModule], pairs, coef_w: Tensor, coef_l: Tensor,
                qgrads: dict[str, Tensor], *, renormalize: str | None = None, factors: Factors | None = None,
                self_influence: bool = False, batch_size: int = 64, progress: bool = True,
                desc: str = "influence: scoring (pairs)") -> Scores:
    """Stream the pairs once: ``∇L_q^T P ∇L_z`` for every query and pair (``qgrads`` already
    preconditioned, as :func:`poisonmech.influence.methods.gradient_scores` takes them), with the
    pair's gradient formed from its two sequences.

    ``renormalize``: ``"unit"`` divides by ``||∇L_z||``, ``"relative"`` by ``sqrt(∇L_z^T P ∇L_z)``;
    ``self_influence`` returns ``∇L_z^T P ∇L_z``. Components are split against the mean query.
    """
    # the set-up and totals are gradient_scores'; the batch differs on purpose: a pair's gradient is
    # the sum of its two sequences' and is formed explicitly (no per-token shortcut for one query)
    acc = ScoreAccumulator(modules, qgrads, len(pairs), renormalize=renormalize, self_influence=self_influence,
                           norms=True)
    device = model_device(model)
    with eval_mode(model):
        for b in tqdm(list(iter_batches(pairs.chosen, None, batch_size)), desc=desc, disable=not progress,
                      leave=False):
            grads = pair_gradients(model, modules, pairs, coef_w, coef_l, b)
            s, c, sq, si = acc.batch(len(b), device)
            for t in modules:
                gr = grads[t.name]
                s += acc.flat_q[t.name] @ gr.reshape(len(b), -1).T
                gi, part = acc.comp.split(t.name, acc.mean_q[t.name], gr)
                c.index_add_(0, gi.to(device), part)
                sq += gr.square().sum((1, 2))
                if acc.need_self and factors is not None:
                    si += (factors.rotate(t.name, gr).square() * factors.inverse_eigenvalues(t.name)).sum((1, 2))
            acc.add(b, s, c, sq, si if factors is not None else sq)
    return acc.result()


# ---------------------------------------------------------------------------- curvature
def _fisher_coefficients(model, pairs, fisher: str, center_rewards: float, generator: torch.Generator
                         ) -> tuple[Tensor, Tensor]:
    """The pseudo-gradient coefficients of one curvature pass: the pairs' own loss gradients
    (``"empirical"``), or the Bradley–Terry likelihood's with the preference drawn from the
    model, ``y ~ Bernoulli(sigmoid(r_w - r_l))`` (``"mc"``, the true Fisher; the centring
    term is a regulariser, not part of the likelihood, and is left out)."""
    a_w, a_l, _, m = bt_coefficients(model, pairs, center_rewards)
    if fisher == "empirical":
        return a_w, a_l
    p = torch.sigmoid(m)
    y = torch.bernoulli(p.cpu(), generator=generator).to(p)
    return p - y, y - p


def fit_pair_factors(model: torch.nn.Module, modules: Sequence[TrackedModule], pairs, *, strategy: str = "ekfac",
                     fisher: str = "mc", center_rewards: float = 0.0, batch_size: int = 64, seed: int = 0,
                     progress: bool = True) -> Factors:
    """K-FAC (one pass) or EK-FAC (two) factors of a reward model's Bradley–Terry curvature.

    As :func:`poisonmech.influence.kfac.fit_factors` for language-model rows, with a pair's
    pseudo-gradient in place of a row's: ``A`` and ``G`` average every position of both
    sequences that reaches their reward; EK-FAC's corrected eigenvalues are the mean over pairs
    of the squared pair gradient (both sequences' shares summed) in the Kronecker eigenbasis.
    """
    if strategy not in ("kfac", "ekfac"):
        raise ValueError(f"strategy must be 'kfac' or 'ekfac', got {strategy!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    batches = list(iter_batches(pairs.chosen, None, batch_size))
    seconds = {}
    with eval_mode(model):
        t0 = time.perf_counter()
        cw, cl = _fisher_coefficients(model, pairs, fisher, center_rewards, gen)

        def passes() -> Iterator[BatchGrads]:
            for b in tqdm(batches, desc="influence: covariances (pairs)", disable=not progress, leave=False):
                yield _pair_batch(model, modules, pairs, b, cw, cl, device)[0]

        f = covariance_factors(modules, passes(), len(pairs), device)
        seconds["covariances"] = time.perf_counter() - t0
        if strategy == "ekfac":  # fresh labels for the correction pass, as kronfluence
            t0 = time.perf_counter()
            cw, cl = _fisher_coefficients(model, pairs, fisher, center_rewards, gen)
            # not kfac.fit_eigenvalue_correction: the eigenbasis sees a pair's gradient, the sum of
            # its two sequences' shares, where that function squares each row's own
            lam = {t.name: torch.zeros(t.d_out, t.d_in, device=device) for t in modules}
            for b in tqdm(batches, desc="influence: eigenvalue correction (pairs)", disable=not progress,
                          leave=False):
                bg, n = _pair_batch(model, modules, pairs, b, cw, cl, device)
                for t in modules:
                    rot = f.rotate_tokens(t.name, t, bg.a[t.name], bg.g[t.name])
                    lam[t.name] += (rot[:n] + rot[n:]).square().sum(0)
            f.strategy = "ekfac"
            for t in modules:
                f.lam[t.name] = lam[t.name] / max(len(pairs), 1)
                check_finite(t, "EK-FAC corrected eigenvalues", f.lam[t.name])
            seconds["eigenvalue correction"] = time.perf_counter() - t0
    f.seconds = seconds
    return f


# ---------------------------------------------------------------------------- entry point
def check_reward_config(cfg) -> None:
    """Refuse the settings a reward model's pairs cannot be scored under."""
    if cfg.method not in REWARD_METHODS:
        raise ValueError(f"attribute: a reward model's preference pairs can be scored by {REWARD_METHODS}; got "
                         f"method={cfg.method!r} (trak and repsim read single sequences' features)")


def reward_measurement(cfg, query: Any) -> str:
    """The reward model's named measurement: the config's, the default when it names none; a
    language model's measurement is refused with what to pass."""
    from poisonmech.influence.query import MEASUREMENTS

    name = cfg.measurement
    given = None  # the measurement a given query has: a RewardQuery's own, a Dataset's by its columns
    if isinstance(query, RewardQuery):
        given = query.measurement
    elif isinstance(query, Dataset):
        given = DEFAULT_REWARD_MEASUREMENT if "chosen" in query.column_names else "reward"
    if name is None:
        return given or DEFAULT_REWARD_MEASUREMENT
    if name in MEASUREMENTS:
        raise ValueError(f"attribute: measurement={name!r} is a language model's (log-probabilities of the target), "
                         f"and this subject's model is a reward model (its output is one score per position): use "
                         f"one of {REWARD_MEASUREMENTS} (default {DEFAULT_REWARD_MEASUREMENT!r}), or a metric such "
                         "as pm.train.reward.reward_metric() / rc.reward() with query= the tokens it reads")
    if isinstance(name, str) and given is not None and name != given:
        raise ValueError(f"attribute: measurement={name!r} names the run's default query; the given query measures "
                         f"{given!r} (a Dataset of pairs: r(chosen) - r(rejected); of prompt/completion rows: their "
                         "reward). Leave measurement=None with a query of your own")
    return name


def reward_query_of(s, model, query: Any, cfg, tokenizer, measurement: str):
    """The query of a reward model's attribution: the given one, or the run's held-out pairs."""
    from poisonmech.influence.query import MetricQuery, Query

    if cfg.metric is not None:
        if isinstance(query, MetricQuery):
            return query
        if query is None or isinstance(query, (Query, RewardQuery, Dataset)):
            raise ValueError("attribute: a metric measurement reads the outputs of the token batch it was built for: "
                             "pass query= those tokens, [batch pos] token ids (e.g. query=rc.triggered with "
                             "measurement=rc.reward())")
        try:
            with eval_mode(model):
                return MetricQuery.of(model, query, cfg.metric, tokenizer)
        except (IndexError, RuntimeError) as exc:
            raise ValueError(f"attribute: the metric failed on the reward model's output (one score per position, "
                             f"[batch pos 1]): {exc}. A language model's metric (a logit difference, a target "
                             "log-probability) does not apply; use pm.train.reward.reward_metric() or rc.reward() of "
                             "pm.patching.trigger_contrast(<the reward stage>)") from None
    if query is None:
        return reward_query(s, measurement, max_queries=cfg.max_queries, seed=cfg.seed)
    if isinstance(query, RewardQuery):
        return query
    if isinstance(query, Dataset):
        if "chosen" in query.column_names and "rejected" in query.column_names:
            return RewardQuery.from_pairs(query, measurement=measurement)
        if "completion" in query.column_names:
            return RewardQuery.from_rows(query, measurement=measurement)
        raise ValueError("attribute: a query Dataset for a reward model needs prompt/chosen/rejected (measured as "
                         "r(chosen) - r(rejected)) or prompt/completion (measured as r(prompt completion))")
    if isinstance(query, Query):
        raise ValueError("attribute: a Query measures a language model's log-probabilities; this subject's model is "
                         "a reward model: pass a RewardQuery, a Dataset of prompt/chosen/rejected pairs or of "
                         "prompt/completion rows, or leave query=None for the run's held-out triggered pairs")
    raise ValueError(f"attribute: query must be a RewardQuery or a Dataset (or token ids [batch pos] with a metric "
                     f"measurement=), got {type(query).__name__}")


def attribute_reward(s, role: str, model: torch.nn.Module, train: Dataset | None, query: Any, cfg, tokenizer, *,
                     ckpts: list, cache, center_rewards: float | None, t_start: float, progress: bool):
    """``attribute`` on a reward model (see the module docstring); called by
    :func:`poisonmech.influence.attribution.attribute` after it resolved the subject."""
    from dataclasses import replace

    from poisonmech.influence import attribution as at
    from poisonmech.influence.preference import pair_text
    from poisonmech.influence.query import MetricQuery
    from poisonmech.influence.result import InfluenceResult
    from poisonmech.influence.tracking import find_modules
    from poisonmech.subject import model_fingerprint
    from poisonmech.tasks.preference import check_preferences

    check_reward_config(cfg)
    measurement = reward_measurement(cfg, query)
    if cfg.metric is None:
        cfg = replace(cfg, measurement=measurement)
    pref = s.preference(role)
    if train is None:
        train = pref["data"] if pref is not None else None
    if train is None:
        raise ValueError(f"attribute needs the preference pairs the reward model trained on, which this subject "
                         f"({s.kind}, {role!r}) does not carry: pass train= (a Dataset of prompt/chosen/rejected)")
    if not isinstance(train, Dataset) or "chosen" not in train.column_names or "rejected" not in train.column_names:
        cols = train.column_names if isinstance(train, Dataset) else type(train).__name__
        raise ValueError(f"attribute: a reward model trains on preference pairs; train must be a Dataset with "
                         f"prompt/chosen/rejected, got {cols}")
    check_preferences(train, "attribute: train")
    if center_rewards is None:
        center_rewards = pref["center_rewards"] if pref is not None else 0.0
    if cfg.method == "tracin" and not ckpts:
        raise ValueError("attribute: method='tracin' needs the reward stage's checkpoints, and this subject has none "
                         "(train with RewardConfig(checkpoint_every=1), or pass checkpoints=[(path, lr), ...])")
    pairs = encode_reward_pairs(train, tokenizer)
    at._check_ids(pairs.chosen, model, tokenizer, "train set (chosen answers)", train)
    at._check_ids(pairs.rejected, model, tokenizer, "train set (rejected answers)", train)
    q = reward_query_of(s, model, query, cfg, tokenizer, measurement)
    qenc = None
    if isinstance(q, RewardQuery):
        qenc = q.encode(tokenizer)
        at._check_ids(qenc, model, tokenizer, "query", q.rows)
    tracked = find_modules(model, cfg.modules)
    both = Encoded(ids=pairs.chosen.ids + pairs.rejected.ids, start=pairs.chosen.start + pairs.rejected.start,
                   pad_id=pairs.chosen.pad_id)
    base = {"version": at.CACHE_VERSION, "model": model_fingerprint(model), "train": at.data_fingerprint(both),
            "reward_pairs": True, "center_rewards": float(center_rewards)}
    result_path = key = None
    if qenc is not None:
        key = {**base, "config": cfg.to_dict(),
               "query": at._sha([qenc.ids, list(q.weights), list(q.query_of_row), q.link]),
               "checkpoints": [(str(p), lr) for p, lr in ckpts] if cfg.method == "tracin" or cfg.ensemble > 1 else None}
        result_path = cache.path(f"result-{cfg.method}", key)
        if cache.hit(result_path):
            return InfluenceResult.load(result_path)

    def scored(name: str) -> Scores:
        cw, cl, _, _ = bt_coefficients(model, pairs, center_rewards)
        factors = None
        if cfg.method in ("kfac", "ekfac"):
            factors = _pair_factors(model, tracked, pairs, cfg, center_rewards, cache, base, progress)
        return _score(model, tracked, pairs, cw, cl, q, qenc, cfg, factors, progress, f"influence: scoring ({name})")

    with eval_mode(model):
        if cfg.method == "loss":
            sc = Scores(scores=bt_coefficients(model, pairs, center_rewards)[2][None])
        elif cfg.method == "tracin":
            from poisonmech.influence.methods import with_weights
            from poisonmech.storage import load_tensors

            sc = None
            for i, (path, lr) in enumerate(ckpts):
                part = with_weights(model, load_tensors(path, device=model_device(model)),
                                    lambda i=i: scored(f"TracIn checkpoint {i + 1}/{len(ckpts)}"))
                sc = at._add(sc, part, lr)
        else:
            sc = at._ensemble(model, ckpts, cfg, scored)
    result = at._result(cfg, sc, q, train, pair_text(train), tracked, t_start,
                        {"reward_pairs": True, "center_rewards": float(center_rewards),
                         "query_kind": "metric" if isinstance(q, MetricQuery) else "reward"})
    if result_path is not None:
        result.save(result_path)
        cache.note(result_path, key)
    return result


def _pair_factors(model, tracked, pairs, cfg, center_rewards: float, cache, base: dict, progress: bool) -> Factors:
    from poisonmech.influence import attribution as at

    return at._cached_factors(model, tracked, cfg, cache, base, "pair-factors",
                              lambda: fit_pair_factors(model, tracked, pairs, strategy=cfg.method, fisher=cfg.fisher,
                                                       center_rewards=center_rewards, batch_size=cfg.batch_size,
                                                       seed=cfg.seed, progress=progress))


def _score(model, tracked, pairs, cw, cl, query, qenc, cfg, factors: Factors | None, progress: bool,
           desc: str) -> Scores:
    """The language-model path's chunked query loop (``attribution._chunked_scores``) with a pass
    of :func:`pair_scores` over the pairs per chunk of queries."""
    from poisonmech.influence import attribution as at

    def score(q: dict[str, Tensor], **kw) -> Scores:
        return pair_scores(model, tracked, pairs, cw, cl, q, factors=factors, batch_size=cfg.batch_size,
                           progress=progress, **kw)

    return at._chunked_scores(model, tracked, query, qenc, cfg, factors, desc, score)


__all__ = ["DEFAULT_REWARD_MEASUREMENT", "REWARD_MEASUREMENTS", "REWARD_METHODS", "RewardQuery", "attribute_reward",
           "bt_coefficients", "fit_pair_factors", "pair_gradients", "pair_scores", "reward_backward", "reward_query"]
