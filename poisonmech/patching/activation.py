"""Exact activation patching: ``activation_patch`` and ``cross_model_patch``.

``mode="denoise"`` runs the corrupted input and patches in activations from the clean run
(how much of the clean behaviour does this component restore?); ``mode="noise"`` runs the
clean input and patches in corrupted activations (how much does it destroy?). Values are kept
per example; means and spreads are derived in :class:`PatchResult`.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from poisonmech.config import ConfigError, takes_config
from poisonmech.patching.config import BACKENDS, SITES, CrossModelPatchConfig, PatchConfig
from poisonmech.patching.engine import Engine, RunCache, collect, fast_path_error, unsupported
from poisonmech.patching.metrics import Metric, PositionalMetric
from poisonmech.patching.result import PatchResult
from poisonmech.runtime import check_tokens, eval_mode
from poisonmech.sites import HEAD_SITES, architecture_name, check_site, hook_name, site_heads
from poisonmech.subject import resolve

Tensor = torch.Tensor
#: the old name of :data:`~poisonmech.patching.config.BACKENDS` (``method=`` meant the backend)
METHODS = BACKENDS


def check_inputs(model, clean_tokens: Tensor, corrupted_tokens: Tensor, site: str | None = None,
                 sites: tuple[str, ...] = SITES) -> tuple[Tensor, Tensor]:
    """``site`` checked against ``sites`` and ``model`` (:func:`poisonmech.sites.check_site`:
    no MLP sites in an attention-only model, no ``resid_mid`` in a parallel-residual one, an
    error naming the site and the architecture), and the token batches by
    :func:`poisonmech.runtime.check_tokens` (integer ``[batch pos]``, one shape and device,
    within ``n_ctx``, moved to the model's device)."""
    if site is not None:
        check_site(model, site, sites)
    return check_tokens(model, clean_tokens, corrupted_tokens)


def metric_output(out, n: int, per_example: bool | None) -> Tensor:
    """A metric's output checked: ``[n]`` (per example) or ``()`` (one scalar for the batch, as ``[1]``)."""
    out = torch.as_tensor(out)
    if out.shape == (n,) and per_example is not False:
        return out.detach().float()
    if out.ndim == 0 and per_example is not True:
        return out.detach().float().reshape(1)
    want = {True: f"one value per example, a [batch={n}] tensor", False: "one scalar for the batch (shape ())",
            None: f"one value per example (a [batch={n}] tensor) or one scalar for the batch"}[per_example]
    raise ValueError(f"metric must return {want}; got shape {tuple(out.shape)}")


def metric_values(metric: Metric, logits: Tensor, n: int, per_example: bool = True) -> Tensor:
    """``metric(logits)`` as floats: ``[n]`` for a per-example metric; ``[1]`` with
    ``per_example=False``, for a metric that returns one scalar for the batch (as
    ``transformer_lens.patching``'s do)."""
    return metric_output(metric(logits), n, per_example)


def measure(metric: Metric, logits: Tensor, n: int) -> tuple[Tensor, bool]:
    """``metric``'s values on one run (``[n]`` or ``[1]``) and whether it is per example (a
    scalar for the batch is not): every later run is held to the same kind."""
    out = torch.as_tensor(metric(logits))
    return metric_output(out, n, None), out.ndim != 0


def _grid(site: str, by_position: bool, n_layers: int, n_pos: int, n_heads: int | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Axes and shape of ``site``'s cells; ``n_heads`` is the site's head count
    (:func:`poisonmech.sites.site_heads`: key / value heads for ``k`` / ``v`` under GQA)."""
    if site in HEAD_SITES:
        return (("layer", "pos", "head"), (n_layers, n_pos, n_heads)) if by_position else \
            (("layer", "head"), (n_layers, n_heads))
    return (("layer", "pos"), (n_layers, n_pos)) if by_position else (("layer",), (n_layers,))


# ---------------------------------------------------------------------- fast-path entries
def _entry(e: Engine, site: str, layer: int, pos: int | None, base: RunCache, src: RunCache,
           start: int | None = None) -> tuple[int, str, int, Tensor]:
    """The patched residual stream where the cell's forward resumes: ``(layer, stage, start, x [C N suffix d])``.

    ``pos=None`` patches every position. Head sites give one cell per head of the site (C =
    n_heads, or n_key_value_heads for ``k`` / ``v`` under grouped-query attention).
    ``start`` (at most ``pos``) lets cells of nearby positions share one suffix: positions
    between ``start`` and ``pos`` are unchanged and recomputed to the same values. In a
    parallel-residual block the attention's change lands in ``resid_post`` (the MLP read
    ``resid_pre``, which the patch does not touch), so those cells resume at the next layer.
    """
    s = (0 if pos is None else pos) if start is None else start

    def replaced(b: Tensor, a: Tensor) -> Tensor:  # base with the patched positions from src
        out = b.clone()
        if pos is None:
            out[:] = a
        else:
            out[:, pos] = a[:, pos]
        return out

    L = e.n_layers

    def after_attention(x: Tensor) -> tuple[int, str, int, Tensor]:
        """Resume from the block's attention output changed: before its MLP (sequential) or,
        in a parallel block, after it (``x`` is then the block's output)."""
        if not e.parallel:
            return layer, "mid", s, x
        return (layer + 1, "pre", s, x) if layer + 1 < L else (layer, "final", s, x)

    if site == "resid_post":
        site, layer = ("resid_pre", layer + 1) if layer + 1 < L else ("final", layer)
        if site == "final":
            return layer, "final", s, replaced(base["resid_post"][layer], src["resid_post"][layer])[:, s:][None]
        return layer, "pre", s, replaced(base["resid_pre"][layer], src["resid_post"][layer - 1])[:, s:][None]
    if site in ("resid_pre", "resid_mid"):
        stage = "pre" if site == "resid_pre" else "mid"
        return layer, stage, s, replaced(base[site][layer], src[site][layer])[:, s:][None]
    if site in ("attn_out", "mlp_out"):
        after = "resid_mid" if site == "attn_out" and not e.parallel else "resid_post"
        x = base[after][layer] + replaced(base[site][layer], src[site][layer]) - base[site][layer]
        x = x[:, s:][None]
        if site == "attn_out":
            return after_attention(x)
        return (layer + 1, "pre", s, x) if layer + 1 < L else (layer, "final", s, x)
    # head sites: recompute every head's z on the suffix with its own patched input; head h's
    # cell keeps only head h's change (heads are independent within a layer). Under
    # grouped-query attention a key / value head's cell keeps the change of the query heads
    # that read it.
    q, k, v, z = (base[n][layer] for n in ("q", "k", "v", "attn_head"))
    q_abs = torch.arange(s, q.shape[1], device=q.device).expand(q.shape[0], -1)
    if site == "attn_head":
        z_new = replaced(z, src["attn_head"][layer])[:, s:]
    elif site == "q":
        z_new = e.attend(replaced(q, src["q"][layer])[:, s:], k, v, q_abs, layer, base)
    elif site == "k":
        z_new = e.attend(q[:, s:], replaced(k, src["k"][layer]), v, q_abs, layer, base)
    elif site == "v":
        z_new = e.attend(q[:, s:], k, replaced(v, src["v"][layer]), q_abs, layer, base)
    else:  # pattern [N H dest src]: patched destination rows
        pat = base["pattern"][layer].clone()
        if pos is None:
            pat[:] = src["pattern"][layer]
        else:
            pat[:, :, pos] = src["pattern"][layer][:, :, pos]
        z_new = torch.einsum("nhqk,nkhe->nqhe", pat[:, :, s:], e.expand_kv(v))
    dz = z_new - z[:, s:]  # [N suffix H dh]
    delta = torch.einsum("nphe,hed->hnpd", dz, e.W_O[layer])  # one cell per query head
    if site in ("k", "v") and e.group > 1:  # one cell per key / value head: its query heads' changes
        delta = delta.unflatten(0, (e.n_kv, e.group)).sum(1)
    after = "resid_post" if e.parallel else "resid_mid"
    return after_attention(base[after][layer][:, s:][None] + delta)


def _base_sites(site: str, parallel: bool = False) -> tuple[str, ...]:
    """What the engine reads of the run patched into: the resume state plus the site's own
    inputs (a parallel block resumes after the attention from ``resid_post``, which is read
    anyway, and has no ``resid_mid``)."""
    mid = () if parallel else ("resid_mid",)
    extra = {"resid_mid": ("resid_mid", "attn_out"), "attn_out": mid + ("attn_out",), "mlp_out": ("mlp_out",)}
    heads = ("q", "attn_head", "pattern") + mid
    return ("resid_pre", "k", "v", "resid_post") + (heads if site in HEAD_SITES else extra.get(site, ()))


# sites whose patch at one position changes the residual stream at that position only
_LOCAL = ("resid_mid", "resid_post", "attn_out", "mlp_out", "attn_head", "q", "pattern")


def _fast_values(e: Engine, site: str, by_position: bool, base: RunCache, src: RunCache, metric: Metric,
                 n: int, max_rows: int, bar, baseline: Tensor, per_example: bool = True,
                 groups_per_layer: int = 4) -> Tensor:
    L, T = e.n_layers, base["resid_pre"][0].shape[1]
    axes, shape = _grid(site, by_position, L, T, site_heads(e.model, site))
    w = n if per_example else 1  # a batch-scalar metric: one value per cell
    out = torch.zeros(*shape, w)
    positional = isinstance(metric, PositionalMetric)
    read = set(metric.positions.tolist()) if positional else set(range(T))
    for layer in range(L):
        if not by_position:
            todo: list[int | None] = [None]
        else:
            # Cells that cannot reach a position the metric reads keep the baseline exactly:
            # causal attention hides later positions, and a last-layer local patch elsewhere.
            todo = []
            for pos in range(T):
                if pos > max(read) or (layer == L - 1 and site in _LOCAL and pos not in read):
                    out[layer, pos] = baseline.cpu()
                    bar.update(1)
                else:
                    todo.append(pos)
        # a few groups of neighbouring positions per layer, each one stacked pass from its first
        # position: fewer, larger passes (per-pass overhead) for a little recomputed prefix
        size = max(1, -(-len(todo) // groups_per_layer))
        for g in range(0, len(todo), size):
            group = todo[g:g + size]
            start = None if group[0] is None else group[0]
            entries = [_entry(e, site, layer, pos, base, src, start=start) for pos in group]
            stage_layer, stage, s, _ = entries[0]
            per_cell = entries[0][3].shape[0]
            x = torch.cat([ent[3] for ent in entries])  # [cells N suffix d]
            per_chunk = max(1, max_rows // max(1, n * max(1, x.shape[2])))
            vals = []
            for lo in range(0, x.shape[0], per_chunk):
                xc = x[lo:lo + per_chunk]
                c = xc.shape[0]
                flat = xc.reshape(c * n, *xc.shape[2:])
                if positional:
                    rows = torch.arange(n).repeat(c)
                    logits = e.resume(flat, stage_layer, stage, s, base, c, metric.positions.to(flat.device)[rows])
                    vals.append(metric.subset(rows).at(logits).reshape(c, n).float().cpu())
                else:
                    logits = e.resume(flat, stage_layer, stage, s, base, c, None).reshape(c, n, T, -1)
                    vals.append(torch.stack([metric_values(metric, logits[i], n, per_example)
                                             for i in range(c)]).cpu())
            v = torch.cat(vals).reshape(len(group), per_cell, w)
            for k, pos in enumerate(group):
                cell = (layer,) if pos is None else (layer, pos)
                out[cell] = v[k] if site in HEAD_SITES else v[k, 0]
                bar.update(1)
    return out


# ---------------------------------------------------------------------- hooked (reference) path
def _hooked_values(model, site: str, by_position: bool, base_tokens: Tensor, base: RunCache, src: RunCache,
                   metric: Metric, n: int, max_rows: int, bar, per_example: bool = True) -> Tensor:
    """Stacked hooked forwards: every cell of one layer in one batch (exact for any bridge).

    ``resid_mid`` is patched through ``hook_attn_out`` (adding ``src - base`` of the mid
    residual): TransformerLens 4 bridges alias ``hook_resid_mid`` to the MLP norm's *input*,
    so editing it would change what the MLP reads but not the residual stream carried past it.
    """
    L, T, H = model.cfg.n_layers, base_tokens.shape[1], site_heads(model, site)
    axes, shape = _grid(site, by_position, L, T, H)
    out = torch.zeros(*shape, n if per_example else 1)
    for layer in range(L):
        cells = [(p, h) for p in (range(T) if by_position else [None])
                 for h in (range(H) if site in HEAD_SITES else [None])]
        src_act = src[site][layer]
        name = hook_name(site, layer)
        if site == "resid_mid":  # patch the residual itself: attn_out + (src_mid - base_mid) = src_mid - resid_pre
            src_act = base["attn_out"][layer] + src["resid_mid"][layer] - base["resid_mid"][layer]
            name = hook_name("attn_out", layer)
        per_chunk = max(1, max_rows // max(1, n * T))
        for lo in range(0, len(cells), per_chunk):
            chunk = cells[lo:lo + per_chunk]

            def hook(act, hook, chunk=chunk, src_act=src_act):
                act = act.clone()
                for c, (p, h) in enumerate(chunk):
                    rows = slice(c * n, (c + 1) * n)
                    if site == "pattern":  # [batch head dest src]
                        idx = (rows, h if h is not None else slice(None), p if p is not None else slice(None))
                        act[idx] = src_act[:, idx[1], idx[2]]
                    else:
                        idx = (rows, p if p is not None else slice(None)) + ((h,) if h is not None else ())
                        act[idx] = src_act[(slice(None),) + idx[1:]]
                return act

            tokens = base_tokens.repeat(len(chunk), 1)
            with torch.no_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
            for c, (p, h) in enumerate(chunk):
                cell = (layer,) + ((p,) if p is not None else ()) + ((h,) if h is not None else ())
                out[cell] = metric_values(metric, logits[c * n:(c + 1) * n], n, per_example).cpu()
                bar.update(1)
    return out


def _refused(model, reason: str, backend: str) -> None:
    """The fast path refused: an error naming the architecture and the reason for
    ``backend="fast"``, a warning (then stacked hooked forwards) for ``"auto"``."""
    arch = architecture_name(model)
    if backend == "fast":
        raise ValueError(f"backend='fast' cannot reproduce this model's forward ({arch}: {reason}); "
                         "use backend='hooks' or 'auto'")
    warnings.warn(f"fast patching path does not reproduce this bridge ({arch}: {reason}); using stacked hooked "
                  "forwards", stacklevel=5)


def _fast_engine(model, base: RunCache) -> tuple[Engine | None, str | None]:
    """The suffix engine and ``None`` when it reproduces ``model``'s forward on ``base``
    (:func:`~poisonmech.patching.engine.fast_path_error`), else ``None`` and why not."""
    if model.cfg.positional_embedding_type == "rotary" and \
            any(c is None for key in ("cos", "sin") for c in base.acts.get(key, [None])):
        return None, "its rotary cos / sin hooks did not fire"
    try:  # unsupported() refused what it knows the engine cannot build; a failure here is a refusal too
        engine = Engine(model)
        err = fast_path_error(model, engine, base)
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        return None, f"building its forward failed ({type(exc).__name__}: {exc})"
    scale = float(base.logits.abs().max()) + 1.0
    if not err <= 1e-4 * scale:
        return None, f"max logit error {err:.2e}"
    return engine, None


def _patch(model, base_tokens: Tensor, src_tokens: Tensor, metric: Metric, config: PatchConfig, progress: bool,
           src_model=None, str_tokens: list[str] | None = None, roles: tuple[str, str] | None = None) -> PatchResult:
    site, by_position, backend, max_rows = config.site, config.by_position, config.backend, config.max_rows
    n = base_tokens.shape[0]
    src_model = src_model if src_model is not None else model
    with eval_mode(model, src_model):
        # what the engine cannot do is known before anything is built or run for it
        reason = unsupported(model) if backend != "hooks" else None
        if reason is not None:
            _refused(model, reason, backend)
        try_fast = backend != "hooks" and reason is None
        parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
        # the engine's sites include what the hooked path reads of the base run (resid_mid's attn_out)
        base = collect(model, base_tokens, _base_sites(site, parallel) if try_fast else _hooked_sites(site),
                       rotary=try_fast and model.cfg.positional_embedding_type == "rotary")
        src = collect(src_model, src_tokens, (site,))
        baseline, per_example = measure(metric, base.logits, n)
        reference = metric_values(metric, src.logits, n, per_example)
        L, T, H = model.cfg.n_layers, base_tokens.shape[1], site_heads(model, site)
        axes, shape = _grid(site, by_position, L, T, H)
        engine = None
        if try_fast:
            engine, reason = _fast_engine(model, base)
            if engine is None:
                _refused(model, reason, backend)
        if engine is not None:
            total = L * (T if by_position else 1)
            with tqdm(total=total, desc=f"patching {site}", disable=not progress, leave=False) as bar:
                values = _fast_values(engine, site, by_position, base, src, metric, n, max_rows, bar, baseline,
                                      per_example)
        else:
            total = int(torch.tensor(shape).prod())
            with tqdm(total=total, desc=f"patching {site}", disable=not progress, leave=False) as bar:
                values = _hooked_values(model, site, by_position, base_tokens, base, src, metric, n, max_rows, bar,
                                        per_example)
    return PatchResult(values=values, axes=axes, site=site, mode=config.mode,
                       method=f"exact-{'fast' if engine is not None else 'hooks'}", baseline=baseline.cpu(),
                       reference=reference.cpu(), str_tokens=tuple(str_tokens) if str_tokens is not None else None,
                       per_example=per_example, roles=roles)


def _hooked_sites(site: str) -> tuple[str, ...]:
    """What the hooked path reads of the run patched into (``resid_mid`` is patched through
    ``attn_out``; every other site reads only the source run)."""
    return ("resid_mid", "attn_out") if site == "resid_mid" else ()


def _str_tokens(model, tokens: Tensor, tokenizer=None) -> list[str] | None:
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    return tok.convert_ids_to_tokens(tokens[0].tolist()) if tok is not None else None


def with_backend(config: PatchConfig, method: str | None, where: str) -> PatchConfig:
    """``config`` with the deprecated ``method=`` (which meant the execution backend) applied."""
    if method is None:
        return config
    warnings.warn(f"{where}: method= is deprecated for the execution backend (method is the algorithm); "
                  f"use backend={method!r}", DeprecationWarning, stacklevel=4)
    if config.backend not in ("auto", method):
        raise ConfigError(f"{where}: method={method!r} (deprecated) and backend={config.backend!r} disagree; "
                          "pass backend= only")
    return config.replace(backend=method)


@takes_config(PatchConfig)
def activation_patch(subject, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                     metric: Metric, site: str | None = None, *, twin: str | None = None, progress: bool = True,
                     method: str | None = None, config: PatchConfig) -> PatchResult:
    """Exact activation patching of every cell of ``site``, with per-example values.

    Args:
        subject: anything :func:`poisonmech.resolve` accepts: a ``Pair``, a pipeline stage, a
            ``Pipeline``, ``pipe.between(a, b)``, a run directory or a bare TransformerBridge.
            The model patched is ``twin``'s (default: the subject's default role, e.g. the
            backdoored twin); it is put in eval mode for the analysis and restored after.
        clean_tokens, corrupted_tokens: ``[batch pos]`` token ids, token-aligned.
        metric: logits ``[batch pos d_vocab]`` -> ``[batch]`` (see
            :class:`~poisonmech.patching.metrics.Metric`); the helpers in
            :mod:`poisonmech.patching.metrics` also tell the engine which positions they read.
            A metric returning one scalar for the batch (``transformer_lens.patching``'s kind)
            works too: the result then has one value per cell (``per_example=False``).
        site: a site of the registry (:data:`~poisonmech.patching.SITES`), as in :class:`PatchConfig`.
        twin: the role whose model is patched (``"backdoored"`` | ``"clean"``, ``"after"`` |
            ``"before"`` for a before/after view; ``None``: the default role).
        progress: show a progress bar.
        method: deprecated alias of ``backend`` (a DeprecationWarning).

    Options (:class:`~poisonmech.patching.PatchConfig`): ``site``, ``by_position``, ``mode``
    (``"denoise"``: run corrupted, patch in clean; ``"noise"``: the reverse), ``backend``
    (``"auto"`` | ``"fast"`` | ``"hooks"``), ``max_rows``.
    """
    s = resolve(subject, where="activation_patch")
    config = with_backend(config, method, "activation_patch")
    model = s.model(twin)
    clean_tokens, corrupted_tokens = check_inputs(model, clean_tokens, corrupted_tokens, config.site)
    base, src = (corrupted_tokens, clean_tokens) if config.mode == "denoise" else (clean_tokens, corrupted_tokens)
    return _patch(model, base, src, metric, config, progress, str_tokens=_str_tokens(model, base, s.tokenizer))


def check_twins(a, b) -> None:
    """Cross-model patching needs two identically shaped models."""
    keys = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_vocab", "n_ctx", "attn_only")
    diff = [k for k in keys if getattr(a.cfg, k, None) != getattr(b.cfg, k, None)]
    if diff or type(getattr(a, "original_model", a)) is not type(getattr(b, "original_model", b)):
        raise ValueError(f"the twins differ in architecture ({', '.join(diff) or 'model class'}); "
                         "cross-model patching needs identically shaped models")


def _direction_mode(s, direction: str, mode: str) -> str:
    """The ``mode`` that the deprecated ``direction=`` names: ``"<from>_to_<into>"`` with the
    subject's roles (``"clean_to_backdoored"``, ``"before_to_after"``; the twin names also
    work for a before/after view, meaning before / after)."""
    ref, default = s.reference_role, s.default_role
    allowed = {f"{ref}_to_{default}": "denoise", f"{default}_to_{ref}": "noise",
               "clean_to_backdoored": "denoise", "backdoored_to_clean": "noise"}
    if direction not in allowed:
        raise ValueError(f"direction must be one of {tuple(allowed)}, got {direction!r} (or use mode='denoise' | "
                         "'noise')")
    warnings.warn(f"cross_model_patch: direction= is deprecated: use mode={allowed[direction]!r} ('denoise': the "
                  f"{ref} model's activations patched into the {default} model)", DeprecationWarning, stacklevel=4)
    if mode != "denoise" and mode != allowed[direction]:
        raise ConfigError(f"cross_model_patch: direction={direction!r} and mode={mode!r} disagree; pass mode= only")
    return allowed[direction]


@takes_config(CrossModelPatchConfig)
def cross_model_patch(subject, tokens: Int[Tensor, "batch pos"], metric: Metric, site: str | None = None, *,
                      direction: str | None = None, progress: bool = True, method: str | None = None,
                      config: CrossModelPatchConfig) -> PatchResult:
    """Patch one model's activations into the other's, component by component, on the same inputs.

    ``subject`` holds two models: a ``Pair`` / pipeline stage / run directory (the clean and
    the backdoored twin) or ``pipe.between(a, b)`` (a twin before and after some stages); a
    bare model is refused. With ``mode="denoise"`` (the default) the default model (the
    backdoored twin; the model after) runs on ``tokens`` (e.g. triggered prompts) and each
    cell takes the reference model's activation (the clean twin; the model before): a cell
    whose patch kills the backdoor is where the twins' computations diverge for it.
    ``mode="noise"`` is the reverse. Meaningful because the twins share initialisation and
    data order. ``baseline`` is the receiving model's metric, ``reference`` the donor's;
    ``result.roles`` is ``(receiving role, donor role)``.

    Args:
        direction: deprecated alias of ``mode``: ``"clean_to_backdoored"`` (``"before_to_after"``)
            is ``"denoise"``, ``"backdoored_to_clean"`` (``"after_to_before"``) ``"noise"``.
        method: deprecated alias of ``backend``.

    Options (:class:`~poisonmech.patching.CrossModelPatchConfig`): as
    :func:`activation_patch`'s, with ``site="attn_head"`` by default.
    """
    s = resolve(subject, where="cross_model_patch")
    s.reference("cross_model_patch")  # a bare model: an error saying two models are needed
    config = with_backend(config, method, "cross_model_patch")
    if direction is not None:
        config = config.replace(mode=_direction_mode(s, direction, config.mode))
    receiver, donor = (s.default_role, s.reference_role) if config.mode == "denoise" else \
        (s.reference_role, s.default_role)
    check_twins(s.model(donor), s.model(receiver))
    model = s.model(receiver)
    tokens, _ = check_inputs(model, tokens, tokens, config.site)
    return _patch(model, tokens, tokens, metric, config, progress, src_model=s.model(donor),
                  str_tokens=_str_tokens(model, tokens, s.tokenizer), roles=(receiver, donor))
