"""Named analyses of a trained pair, run by ``poisonmech analyze``, sweeps and the demo.

Each analysis takes a :class:`~poisonmech.train.pair.Pair`, saves its result objects under
``<run>/analyses/<name>/`` (safetensors + JSON) and returns a flat dict of scalar summaries
that the sweep table and the report read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from poisonmech.storage import read_json, write_json

ANALYSES: dict[str, Callable[..., dict[str, Any]]] = {}


def register(name: str):
    def deco(fn):
        ANALYSES[name] = fn
        return fn
    return deco


def _top(result, value: str = "normalized") -> tuple[str, float]:
    frame = result.to_frame()
    row = frame.loc[frame[value].abs().idxmax()]
    label = ".".join(f"{a}{int(row[a])}" for a in result.axes if a in row)
    return label, float(row[value])


@register("patching")
def patching_analysis(pair, out: Path, n: int = 32) -> dict[str, Any]:
    """Where the backdoor lives, by exact patching on triggered prompts and their controls.

    Saves ``heads.safetensors`` (backdoored twin, head x position, control run with the
    triggered run's activations patched in), ``resid_pre.safetensors`` (layer x position)
    and ``cross_model_heads.safetensors`` (backdoored twin on triggered prompts with each
    head's output taken from the clean twin).
    """
    from poisonmech.patching import activation_patch, cross_model_patch, trigger_contrast

    tc = trigger_contrast(pair, n=n)
    metric = tc.logit_diff()
    heads = activation_patch(pair.backdoored, tc.triggered, tc.control, metric, site="attn_head",
                             by_position=True, progress=False)
    resid = activation_patch(pair.backdoored, tc.triggered, tc.control, metric, site="resid_pre",
                             by_position=True, progress=False)
    cross = cross_model_patch(pair, tc.triggered, metric, site="attn_head", progress=False)
    out.mkdir(parents=True, exist_ok=True)
    heads.save(out / "heads.safetensors")
    resid.save(out / "resid_pre.safetensors")
    cross.save(out / "cross_model_heads.safetensors")
    top_head, top_val = _top(heads)
    top_cross, cross_val = _top(cross)
    return {"patching_n_examples": int(tc.triggered.shape[0]),
            "patching_top_head": top_head, "patching_top_head_recovery": top_val,
            "cross_model_top_head": top_cross, "cross_model_top_head_recovery": cross_val,
            "logit_diff_triggered": float(heads.reference.mean()), "logit_diff_control": float(heads.baseline.mean())}


def run_analyses(pair, names: list[str] | tuple[str, ...], run_dir: Path | None = None,
                 overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Run the named analyses on ``pair``; results cached under ``run_dir/analyses/<name>/``."""
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; allowed: {sorted(ANALYSES)}")
    run_dir = Path(run_dir or pair.out_dir)
    summaries = {}
    for name in names:
        out = run_dir / "analyses" / name
        marker = out / "summary.json"
        if marker.is_file() and not overwrite:
            summaries[name] = read_json(marker)
            continue
        summaries[name] = ANALYSES[name](pair, out)
        write_json(marker, summaries[name])  # written last: the analysis is complete
    return summaries
