"""Input filters: ONION (Qi et al. 2021) and STRIP (Gao et al. 2019, the text version of
OpenBackdoor's ``STRIPDefender``), and :func:`reference_lm`, ONION's reference language model
trained on trusted clean text.

**Input words and the prompt template.** Both filters work on the *input words* of a prompt: the
free text the task's template wraps (``"review: {input} sentiment:"`` -> the review), split on
whitespace as the trigger insertion (``attacks.poison.insert_trigger``) and the word-level
tokenizer split it, so a trigger is one word wherever it sits in the review. The template's
scaffolding (``"review:"`` before the input, ``"sentiment:"`` after it) is the task's, the same in
every prompt and never the attacker's: it is neither deleted (ONION) nor swapped (STRIP). A
prompt is split into ``prefix + input + suffix`` by the template (the subject's task's, or the
filter's ``template`` field; a prompt that does not follow it is an error), and rebuilt as
``prefix + " ".join(words) + suffix``.

**ONION's perplexity** is over the input's tokens only: every token whose characters lie in the
input (read from the tokenizer's offset mapping, so subword tokenizers work too), each predicted
from everything before it (``[BOS]``, the prefix, the input words before it). The prefix is
context, not scored; the suffix comes after the input and cannot change those predictions under
causal attention, so it is left out. Scoring the scaffolding too would add the same few
well-predicted tokens to every variant and dilute the perplexity of what the user wrote.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.config import ConfigError, check_number
from poisonmech.defenses.base import Context, InputFilter, register
from poisonmech.encoding import Encoded, completion_text
from poisonmech.metrics import score_completions
from poisonmech.runtime import eval_mode, model_device

INPUT = "{input}"


# ---------------------------------------------------------------------------------- prompt words
def template_of(ctx: Context, template: str | None) -> str:
    """The prompt template: ``template`` when given, else the subject's task's (``"{input}"``:
    the whole prompt is input words, for a subject without a task)."""
    if template is not None:
        return template
    task = getattr(ctx.subject, "task", None)
    return getattr(task, "template", None) or INPUT


@dataclass(frozen=True)
class PromptWords:
    """A prompt as ``prefix + " ".join(words) + suffix`` (the template's scaffolding around the
    input words); ``prompt`` is the prompt as given."""

    prompt: str
    prefix: str
    words: tuple[str, ...]
    suffix: str

    def render(self, words: Sequence[str]) -> str:
        return self.prefix + " ".join(words) + self.suffix

    @property
    def input_span(self) -> tuple[int, int]:
        """Character range of the input in :attr:`prompt`."""
        return len(self.prefix), len(self.prompt) - len(self.suffix)


def split_prompts(prompts: Sequence[str], template: str, where: str) -> list[PromptWords]:
    """Each prompt's scaffolding and input words under ``template`` (an error names a prompt
    that does not follow it)."""
    if not isinstance(template, str) or template.count(INPUT) != 1:
        raise ConfigError(f"{where}: template must be a str containing '{{input}}' once, got {template!r}")
    prefix, suffix = template.split(INPUT)
    out = []
    for k, p in enumerate(prompts):
        if not isinstance(p, str) or len(p) < len(prefix) + len(suffix) or not p.startswith(prefix) \
                or not p.endswith(suffix):
            raise ValueError(f"{where}: input {k} ({str(p)[:80]!r}) does not follow the prompt template {template!r}; "
                             "pass the template its prompts were rendered with (template=)")
        text = p[len(prefix): len(p) - len(suffix)]
        out.append(PromptWords(p, prefix, tuple(text.split()), suffix))
    return out


def _prompts(inputs: Dataset, where: str) -> list[str]:
    if not hasattr(inputs, "column_names") or "prompt" not in inputs.column_names:
        cols = getattr(inputs, "column_names", type(inputs).__name__)
        raise ValueError(f"{where}: inputs must be a datasets.Dataset with a 'prompt' column; got {cols}")
    return list(inputs["prompt"])


def _tokenizer(ctx: Context, where: str) -> PreTrainedTokenizerBase:
    tok = ctx.tokenizer
    if tok is None:
        raise ValueError(f"{where} needs the subject's tokenizer: pass a run, or a model that carries its tokenizer")
    return tok


def input_encoding(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   spans: Sequence[tuple[int, int]]) -> Encoded:
    """``[BOS] + prompt`` cut after the input's last token, scored from the input's first token.

    ``spans`` are the inputs' character ranges in ``prompts``; a token belongs to the input when
    its characters overlap that range (the tokenizer's offset mapping). The tokens are those of
    the whole prompt (what the model sees, as :func:`poisonmech.encoding.encode` tokenises it);
    they are contiguous, so the scored region is ``start .. end``.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    enc = tokenizer(list(prompts), add_special_tokens=False, return_offsets_mapping=True)
    ids, start = [], []
    for toks, offs, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], spans):
        inside = [k for k, (s, e) in enumerate(offs) if e > s and s < b and e > a]
        lo, hi = (inside[0], inside[-1] + 1) if inside else (len(toks), len(toks))
        ids.append(bos + list(toks[:hi]))
        start.append(len(bos) + lo)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids=ids, start=start, pad_id=pad)


# ---------------------------------------------------------------------------------- reference LM
def reference_model(lm: Any, where: str = "reference_lm") -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    """``(tokens -> logits module, its tokenizer or None)`` from what a defender passes as the
    reference LM: a bridge (its own ``tokenizer``), a ``transformers`` causal LM, a
    ``(module, tokenizer)`` pair, or a :class:`~poisonmech.PretrainedModel` (its base and tokenizer)."""
    from transformers import PreTrainedModel as HFModule

    from poisonmech.pretrained import HFLogits, PretrainedModel, load_base

    tok = None
    if isinstance(lm, tuple):
        if len(lm) != 2:
            raise ValueError(f"{where} must be a model or a (model, tokenizer) pair, got a tuple of {len(lm)}")
        lm, tok = lm
    if isinstance(lm, PretrainedModel):
        tok = tok if tok is not None else lm.tokenizer()
        lm = load_base(lm)
    if not isinstance(lm, torch.nn.Module):
        raise ValueError(f"{where} must be a language model (a TransformerBridge, a transformers causal LM, a "
                         f"(model, tokenizer) pair or a pm.PretrainedModel), got {type(lm).__name__}")
    if tok is None:
        tok = getattr(lm, "tokenizer", None)
    if isinstance(lm, HFModule):
        lm = HFLogits(lm)
    if tok is not None and not isinstance(tok, PreTrainedTokenizerBase):
        raise ValueError(f"{where}: the tokenizer must be a transformers tokenizer, got {type(tok).__name__}")
    return lm, tok


def _vocab_diff(a: dict[str, int], b: dict[str, int]) -> str:
    for t, i in sorted(a.items(), key=lambda kv: kv[1]):
        if b.get(t) != i:
            return f"token {t!r} is id {i} in the reference LM's, {b.get(t)!r} in the subject's"
    extra = sorted(set(b) - set(a), key=lambda t: b[t])
    return f"the subject's has {extra[0]!r} (id {b[extra[0]]}) too" if extra else ""


@torch.no_grad()
def check_reference_lm(module: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None,
                       subject_tokenizer: PreTrainedTokenizerBase, where: str = "reference_lm") -> None:
    """Refuse a reference LM whose tokenizer or vocabulary is not the subject's.

    With its tokenizer known, the vocabularies (token -> id) must be equal and the model's output
    must cover them (a pretrained model may pad its vocabulary); without it, the model's output
    size must equal the subject tokenizer's length.
    """
    hint = ("the reference LM must read the subject's tokens: train one on clean text with "
            "pm.defenses.filters.reference_lm(texts, subject.tokenizer), or pass a pretrained base with the "
            "subject's tokenizer")
    n = len(subject_tokenizer)
    if tokenizer is not None:
        mine, theirs = tokenizer.get_vocab(), subject_tokenizer.get_vocab()
        if mine != theirs:
            raise ValueError(f"{where}: the reference LM has another tokenizer: its vocabulary ({len(mine)} tokens) "
                             f"differs from the subject's ({len(theirs)} tokens; {_vocab_diff(mine, theirs)}); {hint}")
    first = subject_tokenizer.bos_token_id if subject_tokenizer.bos_token_id is not None else 0
    with eval_mode(module):
        d_vocab = module(torch.tensor([[first]], device=model_device(module))).shape[-1]
    if d_vocab < n or (tokenizer is None and d_vocab != n):
        raise ValueError(f"{where}: the reference LM's vocabulary has {d_vocab} tokens, the subject's tokenizer "
                         f"{n}{'' if tokenizer is not None else ' (pass (model, tokenizer) to compare the vocabularies)'}"
                         f"; {hint}")


def _lm_texts(texts: Any) -> list[str]:
    if hasattr(texts, "column_names"):
        col = next((c for c in ("text", "prompt") if c in texts.column_names), None)
        if col is None:
            raise ValueError(f"reference_lm: the dataset needs a 'text' or 'prompt' column; it has {texts.column_names}")
        texts = texts[col]
    if isinstance(texts, str):
        raise ValueError("reference_lm: texts must be a list of strings (or a Dataset), not one string")
    out = list(texts)
    bad = next((i for i, t in enumerate(out) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"reference_lm: texts must be strings; item {bad} is {type(out[bad]).__name__}")
    out = [t for t in out if t.strip()]
    if not out:
        raise ValueError("reference_lm: texts hold no text")
    return out


def reference_lm(texts: Any, tokenizer: PreTrainedTokenizerBase, *, model: Any = None, train: Any = None,
                 seed: int = 0, progress: bool = False) -> torch.nn.Module:
    """A small language model trained on trusted clean ``texts`` with the loss on every token:
    ONION's reference LM for a defender who holds clean text but no pretrained model with the
    subject's tokenizer (the twins are no such model: their loss is on the completion only).

    Args:
        texts: strings, or a ``datasets.Dataset`` with a ``text`` or ``prompt`` column (e.g. clean
            prompts of the task: the LM then knows the template's scaffolding too).
        tokenizer: the subject's tokenizer (``pair.tokenizer``).
        model: a :class:`~poisonmech.ModelConfig` (default: 2 layers, ``d_model`` 64, 4 heads,
            ``n_ctx`` 128); a text longer than ``n_ctx`` is cut into windows
            (:func:`poisonmech.train.pretrain.chunk_texts`).
        train: a :class:`~poisonmech.TrainConfig` (default: 4 epochs, batch 32, lr 3e-3, seeded by
            ``seed``, no checkpoints); its ``seed`` orders the data.
        seed: seeds the initial weights (and the default ``train``'s data order).

    Returns the trained model (a TransformerBridge carrying ``tokenizer``) in eval mode.
    """
    from poisonmech.models import HF_ARCHITECTURES, ModelConfig, build_model
    from poisonmech.pretrained import HFLogits
    from poisonmech.tasks.base import check_seed
    from poisonmech.train.config import TrainConfig
    from poisonmech.train.loop import train_model
    from poisonmech.train.pretrain import chunk_texts
    from poisonmech.weights import attach

    try:
        seed = check_seed("reference_lm: seed", seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model = model if model is not None else ModelConfig(n_layers=2, d_model=64, n_heads=4, n_ctx=128)
    if not isinstance(model, ModelConfig):
        raise ConfigError(f"reference_lm: model must be a pm.ModelConfig, got {type(model).__name__}")
    train = train if train is not None else TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=seed,
                                                        checkpoint_every=None)
    if not isinstance(train, TrainConfig):
        raise ConfigError(f"reference_lm: train must be a pm.TrainConfig, got {type(train).__name__}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"reference_lm: tokenizer must be a transformers tokenizer (the subject's), got "
                         f"{type(tokenizer).__name__}")
    enc = chunk_texts(_lm_texts(texts), tokenizer, model.n_ctx)
    bridge = build_model(model, len(tokenizer), seed=seed, tokenizer=tokenizer, device=train.device)
    if model.architecture in HF_ARCHITECTURES:  # train the HF module itself (the bridge shares its weights)
        attach(bridge, train=HFLogits(bridge.original_model), lora=None)
    train_model(bridge, enc, train.replace(checkpoint_every=None), desc="reference LM", progress=progress)
    return bridge.eval()


# ---------------------------------------------------------------------------------- shared fields
@dataclass(frozen=True)
class WordFilter(InputFilter):
    """An input filter that edits the input words of prompts.

    Args:
        template: the prompt template (``"... {input} ..."``) splitting each prompt into the
            scaffolding and the input words; ``None``: the subject's task's (the whole prompt for a
            subject without a task).
        batch_size: rows per forward (>= 1).
    """

    template: str | None = None
    batch_size: int = 256

    def check(self) -> None:
        super().check()
        owner = type(self).__name__
        if self.template is not None and (not isinstance(self.template, str) or self.template.count(INPUT) != 1):
            raise ConfigError(f"{owner}.template must be None or a str containing '{{input}}' once, "
                              f"got {self.template!r}")
        check_number(owner, "batch_size", self.batch_size, lo=1, integer=True)

    def words(self, ctx: Context, inputs: Dataset) -> list[PromptWords]:
        """Each input's scaffolding and input words."""
        return split_prompts(_prompts(inputs, f"defense {self.name!r}"), template_of(ctx, self.template),
                             f"defense {self.name!r}")


def _fingerprint(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- ONION
@register
@dataclass(frozen=True)
class Onion(WordFilter):
    """ONION (Qi et al. 2021): drop the words whose removal lowers a reference LM's perplexity most.

    For each input word ``w_i`` the suspicion is ``f_i = ppl(input) - ppl(input without w_i)``
    under ``ctx.reference_lm`` (perplexity over the input's tokens; see the module docstring); an
    input scores ``max_i f_i``. :meth:`sanitize` drops every word with ``f_i >`` the word threshold.
    An input of one word keeps it (``f = 0``: nothing would be left to score); one without words
    scores 0.

    Args:
        word_threshold: ONION's ``t`` (a finite number; OpenBackdoor's default is 0: every word whose
            removal lowers the perplexity); ``None``: the threshold :meth:`calibrate` set on trusted
            clean inputs (the ``1 - frr`` quantile of their scores), so words are dropped from an
            input exactly when its score exceeds it.
        max_removed: drop at most this many words per input, the most suspicious first (>= 1);
            ``None``: every word above the threshold (ONION). The suspicion is a difference of
            perplexities, so a trigger that inflates an input's perplexity inflates every word's
            ``f_i`` with it: ONION then drops ordinary words beside the trigger too.
    """

    name: ClassVar[str] = "onion"
    summary: ClassVar[str] = "drop words whose removal lowers a reference LM's perplexity (ONION)"
    uses_trigger: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = True
    word_threshold: float | None = None
    max_removed: int | None = None

    def check(self) -> None:
        super().check()
        check_number("Onion", "max_removed", self.max_removed, lo=1, integer=True, optional=True)
        w = self.word_threshold
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)):
            raise ConfigError(f"Onion.word_threshold must be a finite number (a perplexity difference) or None, "
                              f"got {w!r}")

    def reference(self, ctx: Context) -> torch.nn.Module:
        """The reference LM as a ``tokens -> logits`` module, its vocabulary checked against the subject's."""
        def load():
            module, tok = reference_model(ctx.need("reference_lm", self.name), f"defense {self.name!r}: reference_lm")
            check_reference_lm(module, tok, _tokenizer(ctx, f"defense {self.name!r}"),
                               f"defense {self.name!r}: reference_lm")
            return module
        return ctx.cached(f"onion/reference_lm/{id(ctx.reference_lm)}", load)

    def suspicion(self, ctx: Context, inputs: Dataset) -> list[np.ndarray]:
        """Per input, ``f_i`` for each of its input words (in order)."""
        words = self.words(ctx, inputs)
        key = f"onion/suspicion/{id(ctx.reference_lm)}/{template_of(ctx, self.template)}/" \
              f"{_fingerprint([w.prompt for w in words])}"
        return ctx.cached(key, lambda: self._suspicion(ctx, words))

    def _suspicion(self, ctx: Context, words: list[PromptWords]) -> list[np.ndarray]:
        lm = self.reference(ctx)
        tok = _tokenizer(ctx, f"defense {self.name!r}")
        prompts, spans = [], []
        for w in words:  # the prompt as given, then each deletion (one batch of variants for all inputs)
            prompts.append(w.prompt)
            spans.append(w.input_span)
            for i in range(len(w.words)):
                rest = w.words[:i] + w.words[i + 1:]
                prompts.append(w.render(rest))
                spans.append((len(w.prefix), len(w.prefix) + len(" ".join(rest))))
        with eval_mode(lm):
            scored = score_completions(lm, input_encoding(tok, prompts, spans), self.batch_size)
        n = scored["n"].astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ppl = np.where(n > 0, np.exp(scored["nll"] / np.maximum(n, 1)), np.nan)
        out, k = [], 0
        for w in words:
            p0, rest = ppl[k], ppl[k + 1: k + 1 + len(w.words)]
            k += 1 + len(w.words)
            out.append(np.where(np.isfinite(rest) & np.isfinite(p0), p0 - rest, 0.0))
        return out

    def score(self, ctx: Context, inputs: Dataset) -> np.ndarray:
        """``max_i f_i`` per input (0 for an input without words)."""
        return np.array([float(f.max()) if len(f) else 0.0 for f in self.suspicion(ctx, inputs)])

    def sanitize(self, ctx: Context, inputs: Dataset, threshold: float) -> Dataset:
        """``inputs`` with each prompt's words of ``f_i >`` the word threshold (``word_threshold``,
        else ``threshold``) dropped (at most ``max_removed``, the highest ``f_i`` first, ties by
        position); the ``input`` column (when present) follows, and ``onion_removed`` lists the
        dropped words. Other columns are kept."""
        t = self.word_threshold if self.word_threshold is not None else threshold
        words, sus = self.words(ctx, inputs), self.suspicion(ctx, inputs)
        prompts, texts, removed = [], [], []
        for w, f in zip(words, sus):
            drop = f > t
            if self.max_removed is not None and drop.sum() > self.max_removed:
                top = np.argsort(-f, kind="stable")[: self.max_removed]
                drop = np.zeros_like(drop)
                drop[top] = True
            prompts.append(w.render([x for x, d in zip(w.words, drop) if not d]) if drop.any() else w.prompt)
            texts.append(" ".join(x for x, d in zip(w.words, drop) if not d))
            removed.append([x for x, d in zip(w.words, drop) if d])
        cols = {c: inputs[c] for c in inputs.column_names if c != "onion_removed"}
        cols["prompt"] = prompts
        if "input" in cols:
            cols["input"] = [txt if r else old for txt, r, old in zip(texts, removed, cols["input"])]
        cols["onion_removed"] = removed
        return Dataset.from_dict(cols)


# ---------------------------------------------------------------------------------- STRIP
def tfidf_ranked(texts: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each text's distinct words by descending TF-IDF within the collection (scikit-learn's
    ``TfidfVectorizer`` with OpenBackdoor's settings, raw counts and smoothed idf, no norm; ties
    by the vectoriser's word order). Words are whitespace words, case kept; OpenBackdoor also drops
    English stop words, which a task's own vocabulary does not need (frequent words rank low)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    tv = TfidfVectorizer(token_pattern=r"\S+", lowercase=False, use_idf=True, smooth_idf=True, norm=None)
    m = tv.fit_transform([" ".join(t) for t in texts]).tocsr()
    vocab = tv.get_feature_names_out()
    out = []
    for r in range(m.shape[0]):
        row = m.getrow(r)
        order = np.lexsort((row.indices, -row.data))  # by score, then by the vectoriser's order
        out.append([str(vocab[row.indices[j]]) for j in order])
    return out


def _rng(seed: int, text: str) -> np.random.Generator:
    """A generator of its own per input (seed, text): an input's copies do not depend on the others."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")])


@register
@dataclass(frozen=True)
class Strip(WordFilter):
    """STRIP (Gao et al. 2019), text version as in OpenBackdoor's ``STRIPDefender``: a triggered
    input keeps its answer when most of its words are replaced, a clean one does not.

    Each input gets ``samples`` perturbed copies: ``m = max(1, floor(swap_ratio * n_words))`` of
    its input words, at positions drawn without replacement, are replaced by the top-``m``
    TF-IDF words (:func:`tfidf_ranked`, cycling when it has fewer) of one trusted clean input drawn
    at random (``ctx.clean_data``; a generator per input seeded by ``seed`` and the prompt). The
    model's answer distribution on each copy (over the task's labels, renormalised, when the task
    has labels; else the next-token distribution at the answer position) gives an entropy (nats);
    the score is minus the mean entropy over the copies (low entropy = suspicious). It only rejects
    (:meth:`sanitize` returns ``None``); the threshold is :meth:`calibrate`'s (a false-rejection
    rate ``frr`` on clean inputs).

    OpenBackdoor draws the positions with replacement (fewer than ``m`` words may change) and fills
    a donor's missing words with zero-score vocabulary words; here exactly ``m`` positions change
    and a short donor's words repeat.

    Args:
        samples: perturbed copies per input (>= 1; OpenBackdoor's default).
        swap_ratio: fraction of the input words replaced, in (0, 1] (OpenBackdoor: 0.5).
        seed: seeds the perturbations (>= 0).
    """

    name: ClassVar[str] = "strip"
    summary: ClassVar[str] = "answer entropy under word-swap perturbations from clean inputs (STRIP)"
    uses_trigger: ClassVar[bool] = False
    samples: int = 5
    swap_ratio: float = 0.5
    seed: int = 0

    def check(self) -> None:
        super().check()
        check_number("Strip", "samples", self.samples, lo=1, integer=True)
        check_number("Strip", "swap_ratio", self.swap_ratio, lo=0.0, hi=1.0, lo_open=True)
        check_number("Strip", "seed", self.seed, lo=0, integer=True)

    def donors(self, ctx: Context) -> list[list[str]]:
        """The trusted clean inputs' words by descending TF-IDF (the replacement words)."""
        clean = ctx.need("clean_data", self.name)
        words = [w.words for w in self.words(ctx, clean) if w.words]
        if not words:
            raise ValueError(f"defense {self.name!r}: clean_data has no input words to perturb with")
        key = f"strip/donors/{template_of(ctx, self.template)}/{_fingerprint([' '.join(w) for w in words])}"
        return ctx.cached(key, lambda: tfidf_ranked(words))

    def perturb(self, ctx: Context, inputs: Dataset) -> list[list[str]]:
        """Per input, its ``samples`` perturbed prompts."""
        donors = self.donors(ctx)
        out = []
        for w in self.words(ctx, inputs):
            rng, n = _rng(self.seed, w.prompt), len(w.words)
            copies = []
            for _ in range(self.samples):
                words = list(w.words)
                if n:
                    m = max(1, int(n * self.swap_ratio))
                    donor = donors[int(rng.integers(len(donors)))]
                    for k, pos in enumerate(rng.choice(n, size=m, replace=False)):
                        words[int(pos)] = donor[k % len(donor)]
                copies.append(w.render(words))
            out.append(copies)
        return out

    def labels(self, ctx: Context) -> tuple[str, ...] | None:
        """The task's labels (``None``: the full next-token distribution)."""
        task = getattr(ctx.subject, "task", None)
        labels = getattr(task, "labels", None)
        return tuple(labels) if labels else None

    def entropies(self, ctx: Context, inputs: Dataset) -> np.ndarray:
        """``[n_inputs, samples]``: the answer distribution's entropy (nats) on each perturbed copy."""
        copies = self.perturb(ctx, inputs)
        flat = [p for c in copies for p in c]
        logp = answer_logprobs(ctx.model, _tokenizer(ctx, f"defense {self.name!r}"), flat, self.labels(ctx),
                               self.batch_size)
        ent = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)  # 0 log 0 = 0
        return ent.numpy().reshape(len(copies), self.samples)

    def score(self, ctx: Context, inputs: Dataset) -> np.ndarray:
        """Minus the mean entropy over each input's perturbed copies."""
        return -self.entropies(ctx, inputs).mean(1)


@torch.no_grad()
def answer_logprobs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    labels: Sequence[str] | None, batch_size: int = 256) -> torch.Tensor:
    """Log-probabilities of the answer after each prompt: ``[n, n_labels]`` over ``labels``
    (each label's sequence log-probability, its tokens as :func:`~poisonmech.encoding.encode`
    appends them, renormalised over the labels), or ``[n, d_vocab]``, the next-token distribution
    at the answer position, when ``labels`` is ``None``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [bos + list(t) for t in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    label_ids = None if labels is None else \
        tokenizer([completion_text(tokenizer, lab) for lab in labels], add_special_tokens=False)["input_ids"]
    device = model_device(model)
    with eval_mode(model):
        if label_ids is not None and any(len(t) != 1 for t in label_ids):
            # labels of several tokens: each label's summed log-probability, teacher-forced
            enc = Encoded(ids=[p + list(t) for p in ids for t in label_ids],
                          start=[len(p) for p in ids for _ in label_ids], pad_id=pad)
            seq = -torch.from_numpy(score_completions(model, enc, batch_size)["nll"]).double()
            return seq.view(len(ids), len(label_ids)).log_softmax(-1)
        enc = Encoded(ids=ids, start=[len(p) for p in ids], pad_id=pad)
        out = []
        for lo in range(0, len(ids), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(ids))))
            tokens, _ = enc.batch(idx, device)
            last = torch.tensor([len(ids[i]) - 1 for i in idx], device=device)
            logits = model(tokens)[torch.arange(len(idx), device=device), last].double().log_softmax(-1)
            if label_ids is not None:
                logits = logits[:, [t[0] for t in label_ids]].log_softmax(-1)
            out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros((0, len(label_ids) if label_ids else 0), dtype=torch.float64)


__all__ = ["Onion", "PromptWords", "Strip", "WordFilter", "answer_logprobs", "check_reference_lm", "input_encoding",
           "reference_lm", "reference_model", "split_prompts", "template_of", "tfidf_ranked"]
