"""Exact activation patching: ``activation_patch`` and ``cross_model_patch``.

``mode="denoise"`` runs the corrupted input and patches in activations from the clean run
(how much of the clean behaviour does this component restore?); ``mode="noise"`` runs the
clean input and patches in corrupted activations (how much does it destroy?). Values are kept
per example; means and spreads are derived in :class:`PatchResult`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from poisonmech.models import model_device
from poisonmech.patching.engine import (
    HEAD_SITES,
    HOOKS,
    SITES,
    Engine,
    RunCache,
    collect,
    fast_path_error,
)
from poisonmech.patching.metrics import PositionalMetric
from poisonmech.patching.result import PatchResult

Tensor = torch.Tensor
MODES = ("denoise", "noise")
METHODS = ("auto", "fast", "hooks")


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Analyses run in eval mode; a model in training mode is switched and restored afterwards."""
    was = model.training
    if was:  # a bridge's .eval() walks thousands of modules: only switch when needed
        model.eval()
    try:
        yield
    finally:
        if was:
            model.train(True)


def check_inputs(model, clean_tokens: Tensor, corrupted_tokens: Tensor, site: str | None = None,
                 sites: tuple[str, ...] = SITES) -> tuple[Tensor, Tensor]:
    clean_tokens, corrupted_tokens = torch.as_tensor(clean_tokens), torch.as_tensor(corrupted_tokens)
    if site is not None and site not in sites:
        raise ValueError(f"site must be one of {sites}, got {site!r}")
    if clean_tokens.ndim != 2 or clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError("clean_tokens and corrupted_tokens must be [batch, pos] token tensors of the same shape, "
                         f"got {tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}")
    if clean_tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"tokens must be integer token ids, got dtype {clean_tokens.dtype}")
    if clean_tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"tokens have {clean_tokens.shape[1]} positions; the model's n_ctx is {model.cfg.n_ctx}")
    if site in ("resid_mid", "mlp_out") and model.cfg.attn_only:
        raise ValueError(f"site {site!r} does not exist in an attention-only model")
    if clean_tokens.device != corrupted_tokens.device:
        raise ValueError(f"clean_tokens and corrupted_tokens are on different devices ({clean_tokens.device} and "
                         f"{corrupted_tokens.device}); put both on one device")
    # tokens on another device than the model are moved to it (as TransformerLens and HF do),
    # rather than failing deep inside an embedding lookup
    device = model_device(model)
    return clean_tokens.long().to(device), corrupted_tokens.long().to(device)


def metric_values(metric: Callable, logits: Tensor, n: int) -> Tensor:
    out = torch.as_tensor(metric(logits))
    if out.shape != (n,):
        raise ValueError(f"metric must return one value per example, a [batch={n}] tensor; got shape {tuple(out.shape)}")
    return out.detach().float()


def _grid(site: str, by_position: bool, n_layers: int, n_pos: int, n_heads: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if site in HEAD_SITES:
        return (("layer", "pos", "head"), (n_layers, n_pos, n_heads)) if by_position else \
            (("layer", "head"), (n_layers, n_heads))
    return (("layer", "pos"), (n_layers, n_pos)) if by_position else (("layer",), (n_layers,))


# ---------------------------------------------------------------------- fast-path entries
def _entry(e: Engine, site: str, layer: int, pos: int | None, base: RunCache, src: RunCache,
           start: int | None = None) -> tuple[int, str, int, Tensor]:
    """The patched residual stream where the cell's forward resumes: ``(layer, stage, start, x [C N suffix d])``.

    ``pos=None`` patches every position. Head sites give one cell per head (C = n_heads).
    ``start`` (at most ``pos``) lets cells of nearby positions share one suffix: positions
    between ``start`` and ``pos`` are unchanged and recomputed to the same values.
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
    if site == "resid_post":
        site, layer = ("resid_pre", layer + 1) if layer + 1 < L else ("final", layer)
        if site == "final":
            return layer, "final", s, replaced(base["resid_post"][layer], src["resid_post"][layer])[:, s:][None]
        return layer, "pre", s, replaced(base["resid_pre"][layer], src["resid_post"][layer - 1])[:, s:][None]
    if site in ("resid_pre", "resid_mid"):
        stage = "pre" if site == "resid_pre" else "mid"
        return layer, stage, s, replaced(base[site][layer], src[site][layer])[:, s:][None]
    if site in ("attn_out", "mlp_out"):
        x = base["resid_mid" if site == "attn_out" else "resid_post"][layer] + \
            replaced(base[site][layer], src[site][layer]) - base[site][layer]
        x = x[:, s:][None]
        if site == "attn_out":
            return layer, "mid", s, x
        return (layer + 1, "pre", s, x) if layer + 1 < L else (layer, "final", s, x)
    # head sites: recompute every head's z on the suffix with its own patched input; head h's
    # cell keeps only head h's change (heads are independent within a layer).
    q, k, v, z = (base[n][layer] for n in ("q", "k", "v", "attn_head"))
    q_abs = torch.arange(s, q.shape[1], device=q.device).expand(q.shape[0], -1)
    if site == "attn_head":
        z_new = replaced(z, src["attn_head"][layer])[:, s:]
    elif site == "q":
        z_new = e.attend(replaced(q, src["q"][layer])[:, s:], k, v, q_abs)
    elif site == "k":
        z_new = e.attend(q[:, s:], replaced(k, src["k"][layer]), v, q_abs)
    elif site == "v":
        z_new = e.attend(q[:, s:], k, replaced(v, src["v"][layer]), q_abs)
    else:  # pattern [N H dest src]: patched destination rows
        pat = base["pattern"][layer].clone()
        if pos is None:
            pat[:] = src["pattern"][layer]
        else:
            pat[:, :, pos] = src["pattern"][layer][:, :, pos]
        z_new = torch.einsum("nhqk,nkhe->nqhe", pat[:, :, s:], v)
    dz = z_new - z[:, s:]  # [N suffix H dh]
    delta = torch.einsum("nphe,hed->hnpd", dz, e.W_O[layer])  # one cell per head
    return layer, "mid", s, base["resid_mid"][layer][:, s:][None] + delta


def _base_sites(site: str) -> tuple[str, ...]:
    """What the engine reads of the run patched into: the resume state plus the site's own inputs."""
    extra = {"resid_mid": ("resid_mid", "attn_out"), "attn_out": ("resid_mid", "attn_out"), "mlp_out": ("mlp_out",)}
    heads = ("q", "attn_head", "pattern", "resid_mid")
    return ("resid_pre", "k", "v", "resid_post") + (heads if site in HEAD_SITES else extra.get(site, ()))


# sites whose patch at one position changes the residual stream at that position only
_LOCAL = ("resid_mid", "resid_post", "attn_out", "mlp_out", "attn_head", "q", "pattern")


def _fast_values(e: Engine, site: str, by_position: bool, base: RunCache, src: RunCache, metric: Callable,
                 n: int, max_rows: int, bar, baseline: Tensor, groups_per_layer: int = 4) -> Tensor:
    L, T, H = e.n_layers, base["resid_pre"][0].shape[1], e.n_heads
    axes, shape = _grid(site, by_position, L, T, H)
    out = torch.zeros(*shape, n)
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
                    vals.append(torch.stack([metric_values(metric, logits[i], n) for i in range(c)]).cpu())
            v = torch.cat(vals).reshape(len(group), per_cell, n)
            for k, pos in enumerate(group):
                cell = (layer,) if pos is None else (layer, pos)
                out[cell] = v[k] if site in HEAD_SITES else v[k, 0]
                bar.update(1)
    return out


# ---------------------------------------------------------------------- hooked (reference) path
def _hooked_values(model, site: str, by_position: bool, base_tokens: Tensor, base: RunCache, src: RunCache,
                   metric: Callable, n: int, max_rows: int, bar) -> Tensor:
    """Stacked hooked forwards: every cell of one layer in one batch (exact for any bridge).

    ``resid_mid`` is patched through ``hook_attn_out`` (adding ``src - base`` of the mid
    residual): TransformerLens 4 bridges alias ``hook_resid_mid`` to the MLP norm's *input*,
    so editing it would change what the MLP reads but not the residual stream carried past it.
    """
    L, T, H = model.cfg.n_layers, base_tokens.shape[1], model.cfg.n_heads
    axes, shape = _grid(site, by_position, L, T, H)
    out = torch.zeros(*shape, n)
    for layer in range(L):
        cells = [(p, h) for p in (range(T) if by_position else [None])
                 for h in (range(H) if site in HEAD_SITES else [None])]
        src_act = src[site][layer]
        hook_name = HOOKS[site].format(l=layer)
        if site == "resid_mid":  # patch the residual itself: attn_out + (src_mid - base_mid) = src_mid - resid_pre
            src_act = base["attn_out"][layer] + src["resid_mid"][layer] - base["resid_mid"][layer]
            hook_name = HOOKS["attn_out"].format(l=layer)
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
                logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])
            for c, (p, h) in enumerate(chunk):
                cell = (layer,) + ((p,) if p is not None else ()) + ((h,) if h is not None else ())
                out[cell] = metric_values(metric, logits[c * n:(c + 1) * n], n).cpu()
                bar.update(1)
    return out


def _patch(model, base_tokens: Tensor, src_tokens: Tensor, metric: Callable, site: str, by_position: bool,
           mode: str, method: str, max_rows: int, progress: bool, src_model=None,
           str_tokens: list[str] | None = None) -> PatchResult:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = base_tokens.shape[0]
    src_model = src_model if src_model is not None else model
    with eval_mode(model), eval_mode(src_model):
        base, src = collect(model, base_tokens, _base_sites(site)), collect(src_model, src_tokens, (site,))
        baseline = metric_values(metric, base.logits, n)
        reference = metric_values(metric, src.logits, n)
        L, T, H = model.cfg.n_layers, base_tokens.shape[1], model.cfg.n_heads
        axes, shape = _grid(site, by_position, L, T, H)
        use_fast = method == "fast"
        engine = None
        if method in ("auto", "fast"):
            engine = Engine(model)
            err = fast_path_error(model, engine, base)
            scale = float(base.logits.abs().max()) + 1.0
            if err > 1e-4 * scale:
                if method == "fast":
                    raise ValueError(f"method='fast' cannot reproduce this model's forward (max logit error {err:.2e}); "
                                     "use method='hooks'")
                warnings.warn(f"fast patching path does not reproduce this bridge (max logit error {err:.2e}); "
                              "using stacked hooked forwards", stacklevel=3)
            else:
                use_fast = True
        if use_fast:
            total = L * (T if by_position else 1)
            with tqdm(total=total, desc=f"patching {site}", disable=not progress, leave=False) as bar:
                values = _fast_values(engine, site, by_position, base, src, metric, n, max_rows, bar, baseline)
        else:
            total = int(torch.tensor(shape).prod())
            with tqdm(total=total, desc=f"patching {site}", disable=not progress, leave=False) as bar:
                values = _hooked_values(model, site, by_position, base_tokens, base, src, metric, n, max_rows, bar)
    return PatchResult(values=values, axes=axes, site=site, mode=mode, method=f"exact-{'fast' if use_fast else 'hooks'}",
                       baseline=baseline.cpu(), reference=reference.cpu(),
                       str_tokens=tuple(str_tokens) if str_tokens is not None else None)


def _str_tokens(model, tokens: Tensor) -> list[str] | None:
    tok = getattr(model, "tokenizer", None)
    return tok.convert_ids_to_tokens(tokens[0].tolist()) if tok is not None else None


def activation_patch(model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                     metric: Callable, site: str = "resid_pre", *, by_position: bool = False,
                     mode: str = "denoise", method: str = "auto", max_rows: int = 8192,
                     progress: bool = True) -> PatchResult:
    """Exact activation patching of every cell of ``site``, with per-example values.

    Args:
        model: any TransformerBridge (put in eval mode for the analysis and restored after).
        clean_tokens, corrupted_tokens: ``[batch pos]`` token ids, token-aligned.
        metric: logits ``[batch pos d_vocab]`` -> ``[batch]``; the helpers in
            :mod:`poisonmech.patching.metrics` also tell the engine which positions they read.
        site: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``,
            ``attn_head`` (the head's ``z``), ``q``, ``k``, ``v`` or ``pattern`` (by
            destination position).
        by_position: one cell per position (``layer x pos [x head]``) or all positions at once.
        mode: ``"denoise"`` (patch clean into corrupted) or ``"noise"`` (corrupted into clean).
        method: ``"auto"`` (the suffix engine when it reproduces the model, else hooks),
            ``"fast"`` or ``"hooks"`` (stacked hooked forwards, for any bridge).
        max_rows: rows (cells x examples x positions) per stacked pass: the memory budget.
    """
    clean_tokens, corrupted_tokens = check_inputs(model, clean_tokens, corrupted_tokens, site)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    base, src = (corrupted_tokens, clean_tokens) if mode == "denoise" else (clean_tokens, corrupted_tokens)
    return _patch(model, base, src, metric, site, by_position, mode, method, max_rows, progress,
                  str_tokens=_str_tokens(model, base))


def check_twins(a, b) -> None:
    keys = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx", "attn_only")
    diff = [k for k in keys if getattr(a.cfg, k, None) != getattr(b.cfg, k, None)]
    if diff or type(a.original_model) is not type(b.original_model):
        raise ValueError(f"the twins differ in architecture ({', '.join(diff) or 'model class'}); "
                         "cross-model patching needs identically shaped models")


def cross_model_patch(pair, tokens: Int[Tensor, "batch pos"], metric: Callable, site: str = "attn_head", *,
                      by_position: bool = False, direction: str = "clean_to_backdoored", method: str = "auto",
                      max_rows: int = 8192, progress: bool = True) -> PatchResult:
    """Patch one twin's activations into the other twin, component by component, on the same inputs.

    ``direction="clean_to_backdoored"`` runs the backdoored twin on ``tokens`` (e.g. triggered
    prompts) and patches in the clean twin's activation at each cell: a cell whose patch kills
    the backdoor is where the twins' computations diverge for it. ``"backdoored_to_clean"`` is
    the reverse. Meaningful because the twins share initialisation and data order.
    ``baseline`` is the receiving twin's metric, ``reference`` the donor twin's.
    """
    directions = ("clean_to_backdoored", "backdoored_to_clean")
    if direction not in directions:
        raise ValueError(f"direction must be one of {directions}, got {direction!r}")
    check_twins(pair.clean, pair.backdoored)
    tokens, _ = check_inputs(pair.backdoored, tokens, tokens, site)
    donor, receiver = (pair.clean, pair.backdoored) if direction == "clean_to_backdoored" else \
        (pair.backdoored, pair.clean)
    return _patch(receiver, tokens, tokens, metric, site, by_position, direction, method, max_rows, progress,
                  src_model=donor, str_tokens=_str_tokens(receiver, tokens))
