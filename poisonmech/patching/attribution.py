"""Attribution patching: the first-order estimate of every cell's patch from two forwards and one backward.

For an activation ``a`` the estimated effect of patching in ``a_src`` is
``(a_src - a_base) . d metric / d a`` at the base run (Nanda 2023; Syed et al. 2023), per
example. For queries and keys the linear estimate through the softmax saturates, so
``qk_fix=True`` (AtP*, Kramár et al. 2024) recomputes the patched attention pattern exactly
and takes the first-order step from the pattern onwards instead: with the bridge's rotary
cos / sin on rotary models and each key / value head scored through the query heads that
read it under grouped-query attention (falling back, with a warning, to the plain estimate
where the pattern it recomputes does not match ``hook_pattern``).
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Int

from poisonmech.config import takes_config
from poisonmech.patching.activation import (
    _grid,
    _str_tokens,
    check_inputs,
    metric_output,
    metric_values,
)
from poisonmech.patching.config import AttributionConfig
from poisonmech.patching.engine import ROTARY_HOOKS, attention_scale, rotate
from poisonmech.patching.metrics import Metric
from poisonmech.patching.result import PatchResult
from poisonmech.runtime import eval_mode
from poisonmech.sites import HEAD_SITES, architecture_name, hook_name, site_heads
from poisonmech.subject import resolve

Tensor = torch.Tensor


def _capture(model, tokens: Tensor, names: list[str], metric: Metric | None, n: int
             ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, bool]:
    """Activations at ``names`` and, when ``metric`` is given, the gradient of the metric there
    (of ``metric(...).sum()`` for a per-example metric; of the scalar for a batch metric), its
    values and whether it is per example. A hook whose tensor no gradient reached has no
    entry in the gradients (the caller says so rather than reading zeros)."""
    acts: dict[str, Tensor] = {}

    def keeper(name: str):  # keyed by the requested name: hook.name may be the alias's target
        def keep(act, hook):
            if metric is not None:
                act.retain_grad()
            acts[name] = act
            return act
        return keep

    grad_ctx = torch.enable_grad() if metric is not None else torch.no_grad()
    with grad_ctx, model.hooks(fwd_hooks=[(name, keeper(name)) for name in names]):
        logits = model(tokens)
        if metric is None:
            return {k: v.detach() for k, v in acts.items()}, {}, logits.detach(), True
        out = torch.as_tensor(metric(logits))
        per_example = out.ndim != 0
        values = metric_output(out, n, per_example)
        model.zero_grad(set_to_none=True)
        out.sum().backward()  # examples are independent: each example's gradient is its own metric's
    model.zero_grad(set_to_none=True)
    grads = {k: v.grad.detach() for k, v in acts.items() if v.grad is not None}
    return {k: v.detach() for k, v in acts.items()}, grads, values, per_example


@takes_config(AttributionConfig)
def attribution_patch(subject, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                      metric: Metric, site: str | None = None, *, twin: str | None = None,
                      config: AttributionConfig) -> PatchResult:
    """First-order estimate of :func:`activation_patch` for the same ``site`` and grid.

    ``subject`` is anything :func:`poisonmech.resolve` accepts (the model is ``twin``'s,
    default the subject's default role). ``values`` are ``baseline + estimated effect`` so
    that ``.effect`` and ``.normalized`` compare directly with exact patching. Costs two
    forwards and one backward whatever the number of cells. A metric returning one scalar
    for the batch gives one value per cell (``per_example=False``), as in exact patching.

    Options (:class:`~poisonmech.patching.AttributionConfig`): ``site``, ``by_position``,
    ``mode`` as in :func:`activation_patch`, and ``qk_fix`` (AtP*'s exact-softmax correction
    for ``q`` / ``k``).
    """
    s = resolve(subject, where="attribution_patch")
    model = s.model(twin)
    site, by_position, mode, qk_fix = config.site, config.by_position, config.mode, config.qk_fix
    clean_tokens, corrupted_tokens = check_inputs(model, clean_tokens, corrupted_tokens, site)
    base_tokens, src_tokens = (corrupted_tokens, clean_tokens) if mode == "denoise" else (clean_tokens, corrupted_tokens)
    n, T = base_tokens.shape
    L, H = model.cfg.n_layers, site_heads(model, site)
    # resid_mid's real gradient is attn_out's (TL 4 aliases hook_resid_mid to the MLP norm's input)
    hook_site = "attn_out" if site == "resid_mid" else site
    names = [hook_name(hook_site, layer) for layer in range(L)]
    extra: list[str] = []
    if site in ("q", "k") and qk_fix:
        extra = [hook_name(s_, layer) for layer in range(L) for s_ in ("pattern", "q", "k")]
    if site == "resid_mid":
        extra = [hook_name("resid_mid", layer) for layer in range(L)]
    all_names = list(dict.fromkeys(names + extra))
    # the rotary cos / sin the attention used (no gradient there: read on the source run)
    rotary = [t.format(layer=layer) for layer in range(L) for t in ROTARY_HOOKS.values()] \
        if site in ("q", "k") and qk_fix and model.cfg.positional_embedding_type == "rotary" else []
    hooks = model.hook_dict if rotary else {}
    rotary = [name for name in rotary if name in hooks]
    with eval_mode(model):
        base_acts, grads, baseline, per_example = _capture(model, base_tokens, all_names, metric, n)
        src_acts, _, src_logits, _ = _capture(model, src_tokens, all_names + rotary, None, n)
        reference = metric_values(metric, src_logits, n, per_example)
    if site in ("q", "k") and qk_fix:
        why = _qk_unsupported(model, base_acts, src_acts, grads)
        if why is not None:
            warnings.warn(f"attribution_patch: qk_fix cannot recompute {architecture_name(model)}'s attention pattern "
                          f"({why}); using the plain linear estimate for site {site!r}", stacklevel=3)
            qk_fix = False
    axes, shape = _grid(site, by_position, L, T, H)
    est = torch.zeros(*shape, n if per_example else 1)
    for layer in range(L):
        name = names[layer]
        if site == "resid_mid":
            mid = hook_name("resid_mid", layer)
            delta = src_acts[mid] - base_acts[mid]
        else:
            delta = src_acts[name] - base_acts[name]
        g = grads.get(name)
        if g is None:
            raise RuntimeError(f"attribution_patch: no gradient reached {name!r} in {architecture_name(model)}: the "
                               "bridge's forward does not use the tensor this hook sees; use activation_patch")
        if site in ("q", "k") and qk_fix:
            per = _qk_fixed(model, site, layer, base_acts, src_acts, grads)  # [n T heads]
        elif site == "pattern":  # [n H dest src] -> [n dest H]
            per = (delta * g).sum(-1).transpose(1, 2)
        elif site in HEAD_SITES:  # [n T H dh] -> [n T H]
            per = (delta * g).sum(-1)
        else:  # [n T d] -> [n T]
            per = (delta * g).sum(-1)
        per = per.float().cpu()
        if not per_example:  # a batch scalar's first-order change sums every example's term
            per = per.sum(0, keepdim=True)
        if not by_position:
            per = per.sum(1)
        est[layer] = per.movedim(0, -1)
    values = est + baseline.cpu()
    return PatchResult(values=values, axes=axes, site=site, mode=mode,
                       method="attribution" + ("-qkfix" if site in ("q", "k") and qk_fix else ""),
                       baseline=baseline.cpu(), reference=reference.cpu(),
                       str_tokens=tuple(_str_tokens(model, base_tokens, s.tokenizer) or ()) or None,
                       per_example=per_example)


def _scoring_qk(layer: int, src: dict[str, Tensor], q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Queries and keys ``[n pos H dh]`` as the attention scores them: rotated (with the
    cos / sin the bridge fired, kept in ``src``) on a rotary model, and key / value heads
    repeated for their query heads under grouped-query attention."""
    cos_name = ROTARY_HOOKS["cos"].format(layer=layer)
    if cos_name in src:
        cos, sin = src[cos_name], src[ROTARY_HOOKS["sin"].format(layer=layer)]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    group = q.shape[2] // k.shape[2]
    return q, (k.repeat_interleave(group, dim=2) if group > 1 else k)


def _scores(model, layer: int, q: Tensor, k: Tensor) -> Tensor:
    """Causally masked attention scores ``[n H dest src]`` of scoring-ready ``q``, ``k``."""
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    S = torch.einsum("nqhe,nkhe->nhqk", q, k) * attention_scale(model, layer)
    return S.masked_fill(~causal, float("-inf"))


def _qk_unsupported(model, base: dict[str, Tensor], src: dict[str, Tensor], grads: dict[str, Tensor]) -> str | None:
    """Why the QK fix cannot be used (no gradient at ``hook_pattern``, or the pattern
    recomputed from ``hook_q`` / ``hook_k`` differs from it: a score transform it does not
    know), or ``None``."""
    if model.cfg.positional_embedding_type == "rotary" and ROTARY_HOOKS["cos"].format(layer=0) not in src:
        return "no rotary cos / sin hooks"
    for layer in range(model.cfg.n_layers):
        pn, qn, kn = (hook_name(s, layer) for s in ("pattern", "q", "k"))
        if pn not in grads:
            return f"no gradient reached {pn!r}"
        q, k = _scoring_qk(layer, src, base[qn], base[kn])
        err = float((_scores(model, layer, q, k).float().softmax(-1) - base[pn].float()).abs().max())
        if not err <= 1e-4:
            return f"layer {layer}: recomputed pattern differs by {err:.1e}"
    return None


def _qk_fixed(model, site: str, layer: int, base: dict[str, Tensor], src: dict[str, Tensor],
              grads: dict[str, Tensor]) -> Tensor:
    """AtP* for queries/keys: exact patched softmax, then the pattern gradient. Returns
    ``[n pos heads]`` (the site's heads: key heads for ``k`` under grouped-query attention,
    each summing the query heads that read it)."""
    pn, qn, kn = (hook_name(s, layer) for s in ("pattern", "q", "k"))
    P, g = base[pn], grads[pn]  # [n H dest src]
    T = P.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=P.device).tril()
    bq, bk = _scoring_qk(layer, src, base[qn], base[kn])
    if site == "q":  # each destination row recomputed with the source query
        sq, _ = _scoring_qk(layer, src, src[qn], base[kn])
        P_new = _scores(model, layer, sq, bk).softmax(-1)
        return ((P_new - P) * g).sum(-1).transpose(1, 2)  # [n dest H]
    # keys: patching key p changes column p of every row q >= p; exact row update in closed form
    _, sk = _scoring_qk(layer, src, base[qn], src[kn])
    scale = attention_scale(model, layer)
    S = torch.einsum("nqhe,nkhe->nhqk", bq, bk) * scale
    S_col = torch.einsum("nqhe,nkhe->nhqk", bq, sk) * scale  # score of row q with patched key k
    d = (S_col - S).masked_fill(~causal, 0.0)
    # patched probability of the changed entry, in log space (P e^d can overflow):
    # new_p = P e^d / (1 - P + P e^d); every other entry of the row scales by (1 - new_p) / (1 - P)
    Pc = P.clamp(1e-30, 1.0)
    log_num = Pc.log() + d
    new_p = torch.exp(log_num - torch.logaddexp((1.0 - P).clamp_min(1e-30).log(), log_num))
    ratio = (1.0 - new_p) / (1.0 - P).clamp_min(1e-12)
    gp = (g * P).sum(-1, keepdim=True)  # sum_j g[q, j] P[q, j]
    contrib = (ratio - 1.0) * (gp - g * P) + g * (new_p - P)
    contrib = contrib.masked_fill(~causal, 0.0)
    per = contrib.sum(2).transpose(1, 2)  # sum over destinations q -> [n key_pos H]
    n_kv = base[kn].shape[2]
    return per.unflatten(-1, (n_kv, per.shape[-1] // n_kv)).sum(-1) if per.shape[-1] != n_kv else per
