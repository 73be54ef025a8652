"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

Where does a model recall a fact about a subject? Corrupt the subject: add Gaussian noise to
the token embeddings of the subject's positions (ROME: 3 standard deviations of the
embeddings), so the answer's probability drops. Then restore one hidden state at a time
(layer x position) to its value in the clean run and see how much of the answer's probability
comes back: the states that bring it back carry the fact. ROME finds them at the subject's
last token in the mid-layer MLPs (GPT-2 XL, GPT-J).

Three restorations (ROME's three curves): ``site="resid_post"`` restores the hidden state
leaving one block; ``"mlp_out"`` / ``"attn_out"`` restore the MLP / attention outputs of a
window of ``window`` layers around the layer at that position (ROME's
``trace_important_window``). ``sever="mlp"`` (or ``"attn"``) is ROME's severed variant (its
Figure 3): while the state is restored, the MLP (attention) outputs of every layer at the
restored position stay at their corrupted values, so the restored state cannot act through
the later MLPs (attention) there.

This is written by hand: TransformerLens has no causal tracing, and ROME's own code
(``experiments/causal_trace.py``) runs one forward per cell (its noise draws as one batch) on
Hugging Face GPT modules found by module name. Here every cell of every prompt under every noise draw is one row of a stacked
hooked forward (``batch_size`` rows per pass) on the bridge's hook names
(``hook_embed``, ``blocks.L.hook_resid_post`` / ``hook_mlp_out`` / ``hook_attn_out``), so
native models and every bridged Hugging Face architecture run the same code. Two kinds of
cells are known without a forward and filled with the unpatched run's value: positions before
the subject (causal attention: the two runs agree there) and, at positions other than the
last, cells whose restored layers are all the last one (only the last position is read).

Differences from ROME, on purpose: the noise scale is ``noise`` times the standard deviation
of the whole embedding matrix ``W_E`` (a property of the model alone; ROME measures it over
the embeddings of its data set's subjects); the severed variant freezes the outputs at the
values of the *same* noise draw (ROME's ``trace_with_repatch`` draws fresh noise for its
second pass); and the spread over noise draws is kept (ROME averages the probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from poisonmech.config import takes_config
from poisonmech.encoding import completion_text
from poisonmech.patching.config import CAUSAL_TRACE_SITES, CausalTraceConfig
from poisonmech.patching.result import PatchResult
from poisonmech.runtime import check_tokens, eval_mode, model_device
from poisonmech.sites import check_site, hook_name
from poisonmech.subject import resolve

Tensor = torch.Tensor
_SEVER_SITE = {"mlp": "mlp_out", "attn": "attn_out"}
_EMBED = "hook_embed"  # the token embeddings (before any positional embedding is added)
_UNEMBED_IN = "unembed.hook_in"  # sliced to the last position: only its logits are read


# ---------------------------------------------------------------------- inputs
def prompt_tokens(prompts, tokenizer, model) -> Int[Tensor, "batch pos"]:
    """``prompts`` as ``[batch pos]`` token ids on ``model``'s device.

    Token ids pass through :func:`poisonmech.runtime.check_tokens`. Strings are tokenised as
    training rows are (:func:`poisonmech.encoding.encode`): the tokenizer's BOS (when it has
    one), then the text without special tokens; every prompt must give the same number of
    tokens (the cells are layer x position).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("causal_trace: prompts given as strings need a tokenizer, and the subject has none; "
                             "pass a run (or resolve(model, tokenizer=...)) or token ids [batch pos]")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        lengths = sorted({len(i) for i in ids})
        if len(lengths) > 1:
            by = {n: [k for k, i in enumerate(ids) if len(i) == n] for n in lengths}
            raise ValueError(f"causal_trace: prompts must all have the same number of tokens (the cells are layer x "
                             f"position); got lengths {by} (prompt indices by length): trace them in groups of "
                             "equal length")
        prompts = torch.tensor(ids, dtype=torch.long)
    (tokens,) = check_tokens(model, prompts, names=("prompts",))
    return tokens.to(model_device(model))


def check_spans(subject_spans, n: int, n_pos: int) -> list[tuple[int, int]]:
    """One ``(start, end)`` token range per prompt (``end`` exclusive), inside the prompt.

    A single pair applies to every prompt.
    """
    def is_pair(x) -> bool:
        return isinstance(x, (tuple, list)) and len(x) == 2 and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in x)

    if isinstance(subject_spans, torch.Tensor):
        subject_spans = subject_spans.tolist()
    if is_pair(subject_spans):
        subject_spans = [tuple(subject_spans)] * n
    if not isinstance(subject_spans, (list, tuple)) or not all(is_pair(s) for s in subject_spans):
        raise ValueError("causal_trace: subject_spans must be one (start, end) pair of token positions per prompt "
                         f"(end exclusive), or one pair for all; got {subject_spans!r}")
    if len(subject_spans) != n:
        raise ValueError(f"causal_trace: subject_spans has {len(subject_spans)} (start, end) pairs for {n} prompts")
    out = []
    for i, (start, end) in enumerate(subject_spans):
        if not 0 <= start < end <= n_pos:
            raise ValueError(f"causal_trace: subject_spans[{i}] = ({start}, {end}) is outside prompt {i}: it has "
                             f"{n_pos} tokens, so a span needs 0 <= start < end <= {n_pos} (end exclusive)")
        out.append((int(start), int(end)))
    return out


def target_ids(target, tokenizer, n: int, d_vocab: int) -> Int[Tensor, " batch"]:
    """The answer token of each prompt whose probability at the last position is measured.

    An ``int`` or a string: the
    same for every prompt; a sequence of them (or a ``[batch]`` tensor): one per prompt. A
    string is tokenised as a completion after the prompt
    (:func:`poisonmech.encoding.completion_text`: a leading space for a subword tokenizer) and
    its first token is scored, as ROME scores one token.
    """
    if isinstance(target, torch.Tensor):
        target = target.tolist() if target.ndim else int(target)
    items = [target] * n if isinstance(target, (int, str)) and not isinstance(target, bool) else target
    if not isinstance(items, (list, tuple)) or len(items) != n:
        raise ValueError(f"causal_trace: target must be a token id, a string, or one of them per prompt ({n}); "
                         f"got {target!r}")
    ids = []
    for i, t in enumerate(items):
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("causal_trace: a target given as a string needs a tokenizer, and the subject has "
                                 "none; pass token ids")
            toks = tokenizer(completion_text(tokenizer, t), add_special_tokens=False)["input_ids"]
            if not toks:
                raise ValueError(f"causal_trace: target[{i}] = {t!r} tokenises to no tokens")
            t = toks[0]
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < d_vocab:
            raise ValueError(f"causal_trace: target[{i}] = {t!r} is not a token id in [0, {d_vocab})")
        ids.append(t)
    return torch.tensor(ids, dtype=torch.long)


def embedding_std(model) -> float:
    """The standard deviation over every entry of the token embedding matrix ``W_E``."""
    W_E = getattr(model, "W_E", None)
    if not isinstance(W_E, torch.Tensor):
        raise ValueError("causal_trace needs a hooked model with a token embedding matrix W_E (a TransformerBridge)")
    return float(W_E.detach().float().std())


def draw_noise(spans: list[tuple[int, int]], samples: int, n_pos: int, d_model: int, scale: float,
               seed: int) -> Tensor:
    """The noise added to the token embeddings, ``[batch sample pos d_model]`` (float32, CPU).

    Zero outside each prompt's subject span. One generator seeded with ``seed`` draws, prompt
    by prompt, ``scale * randn(samples, end - start, d_model)``: the same seed, prompts and
    spans give the same noise on every device.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = torch.zeros(len(spans), samples, n_pos, d_model)
    for b, (start, end) in enumerate(spans):
        out[b, :, start:end] = scale * torch.randn(samples, end - start, d_model, generator=g)
    return out


def restored_layers(layer: int, n_layers: int, site: str, window: int) -> tuple[int, int]:
    """``(lo, hi)``: the layers ``lo .. hi - 1`` a cell at ``layer`` restores. ``resid_post``:
    the layer itself; ``mlp_out`` / ``attn_out``: ROME's window
    ``max(0, layer - window // 2) .. min(n_layers, layer - (-window // 2)) - 1``."""
    if site == "resid_post":
        return layer, layer + 1
    return max(0, layer - window // 2), min(n_layers, layer - (-window // 2))


# ---------------------------------------------------------------------- the runs
def _forward(model, tokens: Tensor, rows_b: Tensor, target: Tensor, hooks: list) -> Tensor:
    """p(target) at the last position for each row (tokens of prompt ``rows_b``), under ``hooks``."""
    def last_only(act, hook):
        return act[:, -1:]

    with torch.no_grad():
        logits = model.run_with_hooks(tokens[rows_b], fwd_hooks=hooks + [(_UNEMBED_IN, last_only)])
    probs = logits[:, -1].float().softmax(-1)
    return probs[torch.arange(len(rows_b), device=probs.device), target.to(probs.device)[rows_b]].cpu()


def _noise_hook(noise: Tensor, rows_b: Tensor, rows_s: Tensor):
    rows_noise = noise[rows_b, rows_s]

    def hook(act, hook):
        return act + rows_noise.to(act.device, act.dtype)

    return hook


def _run_cache(model, tokens: Tensor, target: Tensor, rows_b: Tensor, rows_s: Tensor, noise: Tensor | None,
               sites: tuple[str, ...], batch_size: int) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """p(target) and the activations of ``sites`` (per layer, ``[rows pos d_model]``) of the
    unpatched runs ``rows`` (with ``noise``: corrupted)."""
    names = {hook_name(s, layer): (s, layer) for s in sites for layer in range(model.cfg.n_layers)}
    acts: dict[str, list[list[Tensor]]] = {s: [[] for _ in range(model.cfg.n_layers)] for s in sites}
    probs = []
    for lo in range(0, len(rows_b), batch_size):
        b, s = rows_b[lo:lo + batch_size], rows_s[lo:lo + batch_size]

        def keep(site: str, layer: int):  # by closure: hook.name is the bridge's canonical name, not the alias
            def hook(act, hook):
                acts[site][layer].append(act.detach().clone())
                return act

            return hook

        hooks = [(_EMBED, _noise_hook(noise, b, s))] if noise is not None else []
        probs.append(_forward(model, tokens, b, target, hooks + [(n, keep(*sl)) for n, sl in names.items()]))
    return torch.cat(probs), {s: [torch.cat(a) for a in per] for s, per in acts.items()}


def _patch_hook(rows: Tensor, pos: Tensor, values: Tensor):
    """Set ``act[rows, pos]`` to ``values`` (``[len(rows) d_model]``)."""
    def hook(act, hook):
        act = act.clone()
        act[rows.to(act.device), pos.to(act.device)] = values.to(act.device, act.dtype)
        return act

    return hook


def _cells(n_layers: int, n_pos: int, spans: list[tuple[int, int]], samples: int, site: str,
           window: int) -> tuple[Tensor, Tensor]:
    """Every (layer, pos, prompt, sample) that needs a forward, as ``[rows, 4]``, and the mask
    over the full grid ``[layer pos batch sample]`` of those that do."""
    L, T, B, S = n_layers, n_pos, len(spans), samples
    start = torch.tensor([s for s, _ in spans])
    lo = torch.tensor([restored_layers(layer, L, site, window)[0] for layer in range(L)])
    pos = torch.arange(T)
    # a cell before the subject copies a state onto an equal one; a cell that restores only
    # the last layer at a position that is not the last changes nothing the metric reads
    needed = (pos[None, :, None] >= start[None, None, :]) & \
        ~((lo[:, None, None] == L - 1) & (pos[None, :, None] != T - 1))
    mask = needed[..., None].expand(L, T, B, S)
    return mask.nonzero(), mask


def _trace(model, tokens: Tensor, spans: list[tuple[int, int]], target: Tensor, config: CausalTraceConfig,
           progress: bool) -> dict[str, Tensor]:
    L, (B, T), S, d = model.cfg.n_layers, tokens.shape, config.samples, model.cfg.d_model
    site, sever, denoise = config.site, config.sever, config.mode == "denoise"
    noise = draw_noise(spans, S, T, d, config.noise * embedding_std(model), config.seed)
    sever_site = _SEVER_SITE.get(sever)
    # runs: clean (one row per prompt) and corrupted (one row per prompt and draw, b-major)
    cb = torch.arange(B)
    nb, ns = torch.arange(B).repeat_interleave(S), torch.arange(S).repeat(B)
    clean_sites = (site,) if denoise else ((sever_site,) if sever else ())
    corrupt_sites = (() if denoise else (site,)) + ((sever_site,) if sever and denoise else ())
    p_clean, clean = _run_cache(model, tokens, target, cb, cb * 0, None, clean_sites, config.batch_size)
    p_corr, corrupt = _run_cache(model, tokens, target, nb, ns, noise, corrupt_sites, config.batch_size)
    p_corr = p_corr.reshape(B, S)

    def per_draw(acts: dict[str, list[Tensor]], name: str, of_clean: bool) -> list[Tensor]:
        """``name``'s activations per layer as ``[batch sample pos d_model]`` (clean: expanded)."""
        return [a[:, None].expand(B, S, *a.shape[1:]) if of_clean else a.reshape(B, S, *a.shape[1:])
                for a in acts[name]]

    # what is patched in (src) and what severing freezes (the base run's own values)
    src = per_draw(clean, site, True) if denoise else per_draw(corrupt, site, False)
    frozen = None
    if sever:
        frozen = per_draw(corrupt, sever_site, False) if denoise else per_draw(clean, sever_site, True)
    base_p = p_corr if denoise else p_clean[:, None].expand(B, S)
    cells, mask = _cells(L, T, spans, S, site, config.window)
    values = base_p[None, None].expand(L, T, B, S).clone()  # cells without a forward keep the base run's value
    window = torch.tensor([restored_layers(layer, L, site, config.window) for layer in range(L)])
    out = []
    with tqdm(total=len(cells), desc=f"causal trace {site}", disable=not progress, leave=False) as bar:
        for lo in range(0, len(cells), config.batch_size):
            chunk = cells[lo:lo + config.batch_size]
            layer, pos, b, s = chunk.unbind(1)
            hooks = [(_EMBED, _noise_hook(noise, b, s))] if denoise else []
            first, last = window[layer].unbind(1)
            for k in range(int(first.min()), int(last.max())):
                sel = ((first <= k) & (k < last)).nonzero()[:, 0]
                if len(sel):
                    hooks.append((hook_name(site, k), _patch_hook(sel, pos[sel], src[k][b[sel], s[sel], pos[sel]])))
            if sever:
                rows = torch.arange(len(chunk))
                hooks += [(hook_name(sever_site, k), _patch_hook(rows, pos, frozen[k][b, s, pos])) for k in range(L)]
            out.append(_forward(model, tokens, b, target, hooks))
            bar.update(len(chunk))
    if cells.numel():
        values[mask] = torch.cat(out)  # nonzero() and boolean indexing share the row-major order
    return {"values": values, "p_clean": p_clean, "p_corr": p_corr}


# ---------------------------------------------------------------------- the analysis
@takes_config(CausalTraceConfig)
def causal_trace(subject, prompts: Int[Tensor, "batch pos"] | Sequence[str],
                 subject_spans: Sequence[tuple[int, int]] | tuple[int, int],
                 target: int | str | Sequence[int | str] | Tensor | None = None, site: str | None = None, *,
                 twin: str | None = None, progress: bool = True, config: CausalTraceConfig) -> PatchResult:
    """Causal tracing (ROME): which hidden states, restored, bring back the answer the corrupted subject lost.

    For every layer and position (one cell), the subject's token embeddings get Gaussian
    noise (``noise`` standard deviations of the embedding matrix, ``samples`` draws), the
    cell's state is restored to its clean value, and p(target) at the last position is
    measured.

    Args:
        subject: anything :func:`poisonmech.resolve` accepts (a ``Pair``, a pipeline stage, a
            run directory, a bare TransformerBridge). The traced model is ``twin``'s (default:
            the subject's default role, e.g. the backdoored twin); it is put in eval mode for
            the analysis and restored after.
        prompts: ``[batch pos]`` token ids, or strings tokenised with the subject's tokenizer
            (its BOS first, as training rows are); all of one length.
        subject_spans: per prompt the subject's token positions ``(start, end)``, ``end``
            exclusive, in the tokenised prompt (BOS included); one pair applies to all.
        target: the answer whose probability is measured at the last position: a token id, a
            string (its first token, with a leading space for a subword tokenizer), one of
            them per prompt, or ``None`` for the clean run's top prediction (ROME's default).
        site: ``"resid_post"`` | ``"mlp_out"`` | ``"attn_out"``, as in :class:`CausalTraceConfig`.
        twin: the role whose model is traced (``"backdoored"`` | ``"clean"``, ...).
        progress: show a progress bar.

    Options (:class:`~poisonmech.patching.CausalTraceConfig`): ``site``, ``noise`` (3.0),
    ``samples`` (10), ``window`` (10, for ``mlp_out`` / ``attn_out``), ``sever`` (``None`` |
    ``"mlp"`` | ``"attn"``), ``mode`` (``"denoise"``: ROME; ``"noise"``: run clean, patch the
    corrupted states in), ``batch_size``, ``seed``.

    Returns:
        a :class:`PatchResult` over ``layer x pos`` with one value per prompt: ``values`` the
        patched p(target) averaged over the noise draws (ROME averages the probabilities),
        ``baseline`` the unpatched run's p(target) (corrupted, averaged over the draws, for
        ``"denoise"``), ``reference`` the other run's (clean). ``normalized`` is ROME's
        indirect effect over the gap, ``(values - baseline) / (reference - baseline)``: 1 =
        the clean probability restored, 0 = still corrupted. ``sample_values`` and
        ``sample_baseline`` keep each draw (``[... batch sample]``); ``spread`` is the
        standard deviation over draws of the normalised effect.
    """
    s = resolve(subject, where="causal_trace")
    model = s.model(twin)
    tokenizer = s.tokenizer if s.tokenizer is not None else getattr(model, "tokenizer", None)
    check_site(model, config.site, CAUSAL_TRACE_SITES)
    if config.sever is not None:
        check_site(model, _SEVER_SITE[config.sever], field="sever")
    tokens = prompt_tokens(prompts, tokenizer, model)
    spans = check_spans(subject_spans, tokens.shape[0], tokens.shape[1])
    with eval_mode(model):
        if target is None:
            with torch.no_grad():
                target = model(tokens)[:, -1].argmax(-1).cpu()
        target = target_ids(target, tokenizer, tokens.shape[0], int(model.cfg.d_vocab))
        out = _trace(model, tokens, spans, target, config, progress)
    denoise = config.mode == "denoise"
    B, S = tokens.shape[0], config.samples
    p_clean, p_corr = out["p_clean"], out["p_corr"]
    options = ([f"window={config.window}"] if config.site != "resid_post" else []) + \
        ([f"sever={config.sever}"] if config.sever else [])
    method = "causal-trace" + (f"({', '.join(options)})" if options else "")
    str_tokens = tokenizer.convert_ids_to_tokens(tokens[0].tolist()) if tokenizer is not None else None
    return PatchResult(
        values=out["values"].mean(-1), axes=("layer", "pos"), site=config.site, mode=config.mode, method=method,
        baseline=p_corr.mean(-1) if denoise else p_clean, reference=p_clean if denoise else p_corr.mean(-1),
        str_tokens=tuple(str_tokens) if str_tokens is not None else None,
        sample_values=out["values"], sample_baseline=p_corr if denoise else p_clean[:, None].expand(B, S).clone())


__all__ = ["causal_trace", "check_spans", "draw_noise", "embedding_std", "prompt_tokens", "restored_layers",
           "target_ids"]
