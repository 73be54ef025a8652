"""Exact activation patching against ``transformer_lens.patching``, in one run on the default pair.

Both sweep the backdoored twin of the default sentiment pair on the same inputs
(``trigger_contrast``: triggered prompts patched into their token-aligned controls) with the
same per-example logit-difference metric: a full head x position sweep of ``z`` and a full
resid_pre x position sweep. Prints wall times, the speedups, the largest disagreement, and
the Pearson correlation of attribution patching with exact patching per site.

Run: ``.venv/bin/python benchmarks/patching_vs_transformer_lens.py [--run runs/default_pair] [--n 32]``
(trains the default pair into --run first if it is not there).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformer_lens import patching as tlp

import poisonmech as pm
from poisonmech.cli import default_pair
from poisonmech.patching import activation_patch, attribution_patch, trigger_contrast


def best_of(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/default_pair")
    ap.add_argument("--n", type=int, default=32, help="examples per sweep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    default_pair(args.run, progress=False)
    pair = pm.load_pair(args.run, device=args.device)
    tc = trigger_contrast(pair, n=args.n)
    model = pair.backdoored.eval()
    clean, corrupted = tc.triggered.to(args.device), tc.control.to(args.device)
    metric = tc.logit_diff()
    metric_dev = pm.patching.logit_diff(tc.target.to(args.device), tc.answer.to(args.device),
                                        tc.positions.to(args.device))
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, examples: {clean.shape[0]}, "
          f"positions: {clean.shape[1]}, layers: {model.cfg.n_layers}, heads: {model.cfg.n_heads}")

    def tl_sweep(fn):  # what a user runs: cache the clean run, then the sweep
        _, clean_cache = model.run_with_cache(clean)
        return fn(model, corrupted, clean_cache, metric_dev, reduce="none").values

    sweeps = {
        "head_by_pos": (lambda: tl_sweep(tlp.get_act_patch_attn_head_out_by_pos),
                        lambda: activation_patch(model, clean, corrupted, metric_dev, site="attn_head",
                                                 by_position=True, progress=False).values),
        "resid_pre_by_pos": (lambda: tl_sweep(tlp.get_act_patch_resid_pre),
                             lambda: activation_patch(model, clean, corrupted, metric_dev, site="resid_pre",
                                                      by_position=True, progress=False).values),
    }
    import transformer_lens.patching as tl_module
    tl_module.tqdm = lambda x, *a, **k: x  # silence TL's per-sweep progress bar in the timing
    for name, (tl_fn, pm_fn) in sweeps.items():
        t_tl, ref = best_of(tl_fn, args.repeats)
        t_pm, ours = best_of(pm_fn, args.repeats)
        err = float((ref.cpu() - ours.cpu()).abs().max())
        print(f"{name}: transformer_lens {t_tl:.3f}s, poisonmech {t_pm:.3f}s, max abs diff {err:.2e}")
        print(f"patching_speedup_vs_transformer_lens_{name}: {t_tl / t_pm:.1f}")

    for site in ("resid_pre", "attn_out", "mlp_out", "attn_head", "q", "k", "v", "pattern"):
        exact = activation_patch(model, clean, corrupted, metric_dev, site=site, by_position=True, progress=False)
        t0 = time.perf_counter()
        approx = attribution_patch(model, clean, corrupted, metric_dev, site=site, by_position=True)
        t_attr = time.perf_counter() - t0
        a, b = exact.effect.mean(-1).flatten(), approx.effect.mean(-1).flatten()
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        print(f"attribution_pearson_vs_exact_{site}: {r:.3f}  (attribution {t_attr:.3f}s)")
    del metric


if __name__ == "__main__":
    main()
