"""Aligned triggered / control token batches for patching a backdoor.

Patching needs two runs whose positions line up. For a backdoor the natural pair is a
triggered prompt and the *same* prompt with each trigger token replaced by a label-neutral
filler token (same number of tokens), so every position but the trigger's means the same.

A control is only a control if it behaves like the untriggered prompt. Two safeguards:

- the replacement words are **label-neutral fillers** (:func:`neutral_words`): never a word
  of any completion (an answer word), of the prompt template, of the trigger or its near
  misses, and never a word whose presence shifts the training set's answers (a sentiment
  adjective, a country in a capital question);
- :func:`trigger_contrast` then **checks every control** on the model being analysed: the
  control must predict the same answer token as the untriggered prompt it came from. A row
  whose control fails is redrawn with other fillers (``tries`` times) and otherwise dropped;
  the result reports how many rows were redrawn and dropped.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Int

from poisonmech.patching.metrics import LogitDiff, TargetLogProb, logit_diff, target_logprob
from poisonmech.runtime import eval_mode, model_device
from poisonmech.subject import resolve
from poisonmech.tasks.tokenizer import split_words

Tensor = torch.Tensor

#: a word is label-neutral when the answers of the training rows that contain it are distributed
#: like all answers, within this total-variation distance (on the default sentiment task the
#: adjectives sit at 0.4-0.5, nouns and clause words at 0.00-0.08; "cheap", both a negative
#: adjective and part of a neutral clause, at 0.12 is excluded)
NEUTRAL_TV = 0.1
#: words seen in fewer training rows than this are not trusted as neutral (too little evidence)
NEUTRAL_MIN_ROWS = 5


@dataclass(frozen=True)
class TriggerContrast:
    """Triggered prompts and their controls, token-aligned, with the answer position.

    ``triggered`` and ``control`` are ``[batch pos]`` token ids of equal length (no padding);
    ``positions`` is where the answer is predicted; ``target`` / ``answer`` are the first
    tokens of the backdoor target and of the true completion; ``trigger_mask`` marks the
    trigger's positions. ``base_ids`` are the test rows' ``base_id`` (the untriggered prompt
    each came from). ``check`` says how the controls were checked: ``n_candidates`` rows
    tried, ``n_redrawn`` needing other fillers, ``n_dropped`` dropped because no control kept
    the untriggered prompt's answer, and the mean metric on untriggered prompts and controls.
    """

    triggered: Int[Tensor, "batch pos"]
    control: Int[Tensor, "batch pos"]
    positions: Int[Tensor, " batch"]
    target: Int[Tensor, " batch"]
    answer: Int[Tensor, " batch"]
    trigger_mask: torch.Tensor
    str_tokens: list[str]  # tokens of the first triggered prompt, for labelling positions
    base_ids: list[int] = field(default_factory=list)
    check: dict = field(default_factory=dict)

    def logit_diff(self) -> LogitDiff:
        """Backdoor target logit minus true answer logit at the answer position."""
        return logit_diff(self.target, self.answer, self.positions)

    def target_logprob(self) -> TargetLogProb:
        return target_logprob(self.target, self.positions)

    def __repr__(self) -> str:
        b, p = self.triggered.shape
        c = self.check
        checked = (f", controls checked: {c['n_candidates']} tried, {c['n_redrawn']} redrawn, "
                   f"{c['n_dropped']} dropped" if c else ", controls not checked")
        return f"TriggerContrast(batch={b}, pos={p}{checked})"


def _run_parts(subject, where: str, *, tokenizer: bool = True):
    """The resolved subject, checked to carry a task and an attack (and a tokenizer): what
    builds backdoor controls. A bare model has none: the error says to pass a run."""
    s = resolve(subject, where=where)
    for what in ("task", "attack") + (("tokenizer",) if tokenizer else ()):
        s.require(what, where)
    return s


def neutral_words(subject) -> list[str]:
    """The label-neutral filler words of the subject's task, in vocabulary order.

    ``subject``: anything :func:`poisonmech.resolve` accepts that carries a task and an
    attack (a ``Pair``, a pipeline stage, ``pipe.between(a, b)``, a run directory).

    Excluded: every word of a completion (answer words), of the prompt template, of the
    trigger and of its near misses, and every word whose training rows' answers differ from
    the overall answer distribution by more than :data:`NEUTRAL_TV` in total variation (the
    words the label depends on), or that occurs in fewer than :data:`NEUTRAL_MIN_ROWS` rows.
    When the threshold leaves nothing (e.g. every word predicts its answer), the fifth of the
    remaining words with the smallest association is used, and the behaviour check of
    :func:`trigger_contrast` decides.
    """
    s = _run_parts(subject, "neutral_words", tokenizer=False)
    attack, task = s.attack, s.task
    banned = {w for v in attack.trigger_variants() for p in v for w in split_words(p)}
    banned |= {w for v in attack.near_miss_variants() for p in v for w in split_words(p)}
    banned |= set(split_words(task.template.replace("{input}", " ")))
    train = task.train
    banned |= {w for c in train["completion"] for w in split_words(c)}
    banned |= set(split_words(attack.target)) if isinstance(attack.target, str) else set()
    overall = Counter(train["completion"])
    n = sum(overall.values())
    by_word: dict[str, Counter] = defaultdict(Counter)
    for text, comp in zip(train["input"], train["completion"]):
        for w in set(split_words(text)):
            by_word[w][comp] += 1
    assoc = {}
    for w in task.words:
        if w in banned or w not in by_word or sum(by_word[w].values()) < NEUTRAL_MIN_ROWS:
            continue
        c = by_word[w]
        m = sum(c.values())
        assoc[w] = 0.5 * sum(abs(c[k] / m - overall[k] / n) for k in overall)
    pool = [w for w in task.words if w in assoc and assoc[w] <= NEUTRAL_TV]
    if not pool and assoc:
        ranked = sorted(assoc, key=assoc.get)
        pool = ranked[:max(1, len(ranked) // 5)]
    if not pool:
        raise ValueError("trigger_contrast: the task has no label-neutral filler word to replace the trigger with "
                         "(every word is an answer, template, trigger or near-miss word)")
    return pool


def _ids(tok, words: list[str]) -> Tensor:
    return torch.tensor(tok.convert_tokens_to_ids(words), dtype=torch.long)


def _trigger_ids(s) -> Tensor:
    words = sorted({w for v in s.attack.trigger_variants() for p in v for w in split_words(p)})
    return _ids(s.tokenizer, words)


class ControlCheckError(ValueError):
    """No control of :func:`trigger_contrast` kept the untriggered prompt's answer."""


def _replace_trigger(tokens: Tensor, trig_ids: Tensor, pool_ids: Tensor, g: torch.Generator) -> Tensor:
    """``tokens`` with every trigger token replaced by a filler drawn from ``pool_ids`` with ``g``."""
    out = tokens.clone()
    mask = torch.isin(tokens, trig_ids.to(tokens.device))
    out[mask] = pool_ids[torch.randint(len(pool_ids), (int(mask.sum()),), generator=g)].to(tokens.device)
    return out


def control_fn(subject, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """``tokens -> tokens`` with every trigger token replaced by a label-neutral filler (seeded).

    The token-aligned control of any batch, e.g. as the patching reference of an ablation
    inside ``pm.evaluate`` (rows without a trigger are their own control). Fillers come from
    :func:`neutral_words`. ``subject``: anything :func:`poisonmech.resolve` accepts that
    carries a task, an attack and a tokenizer.
    """
    s = _run_parts(subject, "control_fn")
    trig_ids = _trigger_ids(s)
    pool_ids = _ids(s.tokenizer, neutral_words(s))

    def control(tokens: Tensor) -> Tensor:
        return _replace_trigger(tokens, trig_ids, pool_ids, torch.Generator().manual_seed(seed))

    return control


@torch.no_grad()
def _last_logits(model, rows: list[list[int]], device) -> Tensor:
    """Each prompt's next-token logits after its last position ``[batch d_vocab]`` (grouped by length)."""
    out: Tensor | None = None
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_len[len(r)].append(i)
    for idx in by_len.values():
        logits = model(torch.tensor([rows[i] for i in idx], device=device))[:, -1].float().cpu()
        if out is None:
            out = torch.empty(len(rows), logits.shape[-1])
        out[idx] = logits
    return out


def trigger_contrast(subject, n: int = 32, *, length: int | None = None, seed: int = 0, model=None,
                     twin: str | None = None, check: bool = True, tries: int = 5) -> TriggerContrast:
    """Up to ``n`` triggered test prompts of one token length from the subject's test rows and their controls.

    ``subject``: anything :func:`poisonmech.resolve` accepts that carries a task, an attack,
    a tokenizer and test rows (a ``Pair``, a pipeline stage, ``pipe.between(a, b)``, a run
    directory); a bare model is refused with an error naming what is missing.

    Only rows whose true answer differs from the target are used (where the backdoor has
    something to change). ``length`` defaults to the most common prompt length among them.
    Each control replaces the trigger's tokens with label-neutral fillers
    (:func:`neutral_words`). With ``check=True`` (the default) every control must make
    ``model`` (default: ``twin``'s model, the subject's default role: the backdoored twin, the
    model after the stages) predict the same answer token as the
    untriggered prompt it came from; a failing row is redrawn up to ``tries`` times, then
    dropped, and ``result.check`` reports the counts (a warning says when rows were dropped).
    """
    import warnings

    s = _run_parts(subject, "trigger_contrast")
    tok, attack, task = s.tokenizer, s.attack, s.task
    if attack.is_gibberish or task.loss_on == "all":
        raise ValueError("trigger_contrast: a gibberish / plain-text backdoor has no single target token; "
                         "build the token batches yourself and use a perplexity-style metric")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"trigger_contrast: n must be an integer >= 1, got {n!r}")
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ValueError(f"trigger_contrast: tries must be an integer >= 1, got {tries!r}")
    data = s.require("test_data", "trigger_contrast")
    untriggered = {b: p for b, p, t, m in zip(data["base_id"], data["prompt"], data["is_triggered"],
                                                data["is_near_miss"]) if not t and not m}
    rows = []
    for base, prompt, comp, is_trig in zip(data["base_id"], data["prompt"], data["completion"],
                                           data["is_triggered"]):
        if is_trig and comp.strip() != attack.target.strip():
            rows.append((tok(prompt)["input_ids"], tok(comp, add_special_tokens=False)["input_ids"], base))
    if not rows:
        raise ValueError("trigger_contrast: the subject's test data has no triggered rows whose answer differs from "
                         "the target")
    if length is None:
        length = Counter(len(r[0]) for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if len(r[0]) == length]
    if not rows:
        raise ValueError(f"trigger_contrast: no triggered prompt has length {length}")
    trig_ids = _trigger_ids(s)
    pool_ids = _ids(tok, neutral_words(s))
    g = torch.Generator().manual_seed(seed)
    target_id = tok(attack.target, add_special_tokens=False)["input_ids"][0]

    def draw(triggered: Tensor) -> Tensor:
        return _replace_trigger(triggered, trig_ids, pool_ids, g)

    def answers(rows) -> Tensor:
        return torch.tensor([r[1][0] if r[1] else tok.eos_token_id for r in rows])

    info: dict = {}
    if not check:
        rows = rows[:n]
        triggered = torch.tensor([r[0] for r in rows])
        control = draw(triggered)
    else:
        model = model if model is not None else s.model(twin)
        device = model_device(model)
        with eval_mode(model):
            cand = rows[:max(n * 3, n + 16)]  # spare rows to fill in for dropped ones
            triggered = torch.tensor([r[0] for r in cand])
            base_logits = _last_logits(model, [tok(untriggered[r[2]])["input_ids"] for r in cand], device)
            want = base_logits.argmax(-1)
            control = draw(triggered)
            ctrl_logits = _last_logits(model, control.tolist(), device)
            ok = ctrl_logits.argmax(-1) == want
            redrawn = torch.zeros(len(cand), dtype=torch.bool)
            for _ in range(tries - 1):
                bad = (~ok).nonzero().flatten()
                if len(bad) == 0:
                    break
                redrawn[bad] = True
                control[bad] = draw(triggered[bad])
                ctrl_logits[bad] = _last_logits(model, control[bad].tolist(), device)
                ok[bad] = ctrl_logits[bad].argmax(-1) == want[bad]
        keep = ok.nonzero().flatten()[:n]
        # the rows looked at: up to the n-th kept one, or every candidate when fewer than n passed
        considered = int(keep[-1]) + 1 if len(keep) == n else len(cand)
        n_dropped = int((~ok[:considered]).sum())
        if len(keep) == 0:
            raise ControlCheckError(f"trigger_contrast: no control of {len(cand)} triggered prompts kept the untriggered "
                             "prompt's answer; the model may not have learned the task (check=False skips the check)")
        rows = [cand[i] for i in keep.tolist()]
        triggered, control = triggered[keep], control[keep]
        answer = answers(rows)

        def diff(logits: Tensor) -> float:
            kept = logits[keep]
            return float((kept[:, target_id] - kept[torch.arange(len(keep)), answer]).mean())

        info = {"n_candidates": considered, "n_redrawn": int(redrawn[:considered].sum()), "n_dropped": n_dropped,
                "n_kept": len(rows), "untriggered_logit_diff": diff(base_logits), "control_logit_diff": diff(ctrl_logits)}
        if n_dropped:
            warnings.warn(f"trigger_contrast: dropped {n_dropped} of {considered} rows whose control changed the "
                          "model's answer from the untriggered prompt's", stacklevel=2)
    return TriggerContrast(
        triggered=triggered, control=control,
        positions=torch.full((len(rows),), length - 1, dtype=torch.long),
        target=torch.full((len(rows),), target_id, dtype=torch.long),
        answer=answers(rows), trigger_mask=torch.isin(triggered, trig_ids), str_tokens=tok.convert_ids_to_tokens(rows[0][0]),
        base_ids=[int(r[2]) for r in rows], check=info,
    )
