"""``sweep``: many pairs over attacks x models x seeds, on a local process pool or Ray.

Every run lives in ``<out_dir>/runs/<name>/`` (named by a hash of its config) and is finished
exactly when its ``DONE.json`` exists; that file is written last, atomically. A sweep that is
killed (even ``kill -9``) and started again skips finished runs and redoes the rest (a pair
itself resumes from its last finished epoch). A run that raises is recorded in ``FAILED.json``
with its error; the other runs go on, and the next start retries it.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from poisonmech.attacks.protocol import attack_from_dict, check_attack_type
from poisonmech.runtime import num_threads
from poisonmech.storage import read_json, write_json
from poisonmech.sweeps.result import Sweep, load_sweep
from poisonmech.sweeps.spec import DONE, FAILED, RunSpec, finished_with

BACKENDS = ("local", "ray")


def run_one(spec_dict: dict[str, Any], run_dir: str, threads: int | None = None,
            clean_cache: str | None = None) -> dict[str, Any]:
    """Train (or resume) one pair, run its analyses, and mark it done. Safe to call in a worker.

    ``threads`` sets torch's thread count for the run and restores it after (one-worker sweeps
    run in the caller's process)."""
    with num_threads(threads or None):
        return _run_one(spec_dict, run_dir, clean_cache)


def _run_one(spec_dict: dict[str, Any], run_dir: str, clean_cache: str | None) -> dict[str, Any]:
    import poisonmech as pm
    from poisonmech.analyses import run_analyses

    spec = RunSpec.from_dict(spec_dict)
    out = Path(run_dir)
    try:
        task_kw = dict(spec.task)
        task = pm.make_task(task_kw.pop("kind"), **task_kw)
        pair = pm.train_pair(task, attack_from_dict(spec.attack), model=pm.model_from_dict(spec.model),
                             train=pm.TrainConfig.from_dict(spec.train), out_dir=out, progress=False,
                             clean_cache=clean_cache)
        analyses = run_analyses(pair, spec.analyses, out) if spec.analyses else {}
        record = {"status": "done", "spec": spec.to_dict(), "metrics": pair.metrics, "analyses": analyses,
                  "n_poison": int(sum(pair.train_data["is_poison"]))}
        (out / FAILED).unlink(missing_ok=True)
        write_json(out / DONE, record)
        return record
    except Exception as exc:  # recorded, not raised: one failed run must not stop the sweep
        record = {"status": "failed", "spec": spec.to_dict(), "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / FAILED, record)
        return record


def _specs(task, attacks, seeds, models, train, analyses) -> list[RunSpec]:
    import poisonmech as pm

    if task.spec is None:
        raise ValueError("sweep: the task must be a generated one (pm.make_task(kind, ...)) so that every "
                         "worker can rebuild it; a user Dataset is not supported in sweeps yet")
    if not attacks:
        raise ValueError("sweep: attacks is empty; give at least one attack (pm.Backdoor, pm.FalseFact, pm.Bias)")
    if not seeds:
        raise ValueError("sweep: seeds is empty; give at least one seed")
    models = list(models) if models else [pm.ModelConfig()]
    trains = list(train) if isinstance(train, (list, tuple)) else [train or pm.TrainConfig()]
    task_kw = {k: v for k, v in task.spec.items()}
    specs = []
    for attack in attacks:
        check_attack_type(attack, "sweep")
        for model in models:
            for tr in trains:
                for seed in seeds:
                    specs.append(RunSpec(task=task_kw, attack=replace(attack, seed=seed).to_dict(),
                                         model=model.to_dict(),
                                         train={k: v for k, v in replace(tr, seed=seed).to_dict().items()
                                                if k != "device"},
                                         analyses=analyses))
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"sweep: the same run appears twice: {sorted(dupes)}")
    return specs


def _analysis_configs(analyses) -> tuple[str, ...] | dict[str, dict[str, Any]]:
    """Analysis names as they are, or ``{name: config}`` as checked config dicts."""
    from poisonmech.analyses import ANALYSES, CONFIGS

    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        raise ValueError(f"sweep: unknown analyses {unknown}; allowed: {sorted(ANALYSES)}")
    if isinstance(analyses, Mapping):
        return {name: CONFIGS[name].build(cfg, where=f"sweep: analyses[{name!r}]").to_dict()
                for name, cfg in analyses.items()}
    return tuple(analyses)


def _check_manifest(out: Path, specs: list[RunSpec]) -> None:
    manifest = out / "sweep.json"
    new = {s.name: s.to_dict() for s in specs}
    if manifest.is_file():
        old = read_json(manifest).get("runs", {})
        clash = [n for n in new if n in old and {k: v for k, v in old[n].items() if k != "analyses"}
                 != {k: v for k, v in new[n].items() if k != "analyses"}]
        if clash:
            raise ValueError(f"sweep: {out} already holds runs with the same directory but different configs: {clash}")
        new = {**old, **new}
    write_json(manifest, {"format": "poisonmech.sweep/1", "runs": new})


def _check_ray_address(address: str) -> None:
    if address in ("auto", "local"):
        return
    host_port = address.split("://")[-1]
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise ValueError(f"sweep: cannot reach the Ray cluster at {address!r} ({exc}); start it with "
                         "`ray start --head` or pass address=None for a local Ray instance") from exc


def sweep(task, attacks: Sequence, seeds: Sequence[int] = (0,), models: Sequence | None = None, train=None,
          out_dir: str | Path = "runs/sweep", backend: str = "local", analyses: Sequence[str] | Mapping[str, Any] = (),
          max_workers: int | None = None, threads_per_run: int | None = None, address: str | None = None,
          progress: bool = True) -> Sweep:
    """Train a pair for every (attack, model, seed) and run ``analyses`` on each.

    Args:
        task: a generated task (``pm.make_task(kind, ...)``); the same data for every run.
        attacks: ``pm.Backdoor``, ``pm.FalseFact`` or ``pm.Bias`` objects (e.g. one per poison count).
        seeds: each seed sets the initial weights, the data order and which rows are poisoned.
        models: ``pm.ModelConfig`` objects (default: one default model).
        train: a ``pm.TrainConfig`` shared by all runs, or a list of them (another sweep axis,
            e.g. ``continue_clean``); its seed is replaced per run.
        backend: ``"local"`` (a process pool sized to the machine) or ``"ray"`` (Ray tasks on
            the cluster at ``address``, or a local Ray instance when ``address`` is None).
        analyses: names from ``poisonmech.analyses.ANALYSES`` to run on every pair, or
            ``{name: config}`` (``PatchingAnalysis(...)``, its dict, or ``None``). A finished
            run whose analyses differ is revisited: its pair is reused and each analysis is
            recomputed only when its config (or the weights or data) changed.
        max_workers: parallel runs (default: one per core, at most one per run of the sweep). Small
            models run many small kernels, which one thread each runs best: two one-thread runs
            on two cores finish sooner than two two-thread runs one after the other, and do not
            collapse beside another job (idle OpenMP threads of a multi-thread run spin on
            the cores the other job needs).
        threads_per_run: torch threads per run (default: cores // workers, from the whole sweep's
            runs, so that a resumed sweep trains at the same thread count). The same value on
            every backend gives bit-identical numbers; it is recorded in each run's config.json.
    """
    if backend not in BACKENDS:
        raise ValueError(f"sweep: backend must be one of {BACKENDS}, got {backend!r}")
    specs = _specs(task, attacks, seeds, models, train, _analysis_configs(analyses))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, specs)
    pending = [s for s in specs if not finished_with(out / "runs" / s.name, s)]
    # the clean controls (no poison) are the cheapest runs (their backdoored twin is the clean
    # twin, and nothing is attributed): start them last so that parallel workers finish together
    pending.sort(key=lambda s: s.attack.get("poison_count") == 0)
    cores = os.cpu_count() or 1
    # from the whole sweep, not the runs left: a resumed sweep must train at the thread count
    # of the uninterrupted one (the weights depend on it); it may then leave cores idle
    workers = max(1, min(len(specs), max_workers or cores))
    threads = threads_per_run or max(1, cores // workers)
    workers = max(1, min(workers, len(pending) or 1))
    bar = tqdm(total=len(specs), initial=len(specs) - len(pending), desc="sweep", disable=not progress)
    jobs = [(s.to_dict(), str(out / "runs" / s.name), threads, str(out / "clean_cache")) for s in pending]
    if backend == "ray":
        _run_ray(jobs, address, threads, bar)
    elif workers == 1:
        for job in jobs:
            run_one(*job)
            bar.update(1)
    else:
        # spawn, not fork: forking a process that already runs torch threads can deadlock
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(run_one, *job) for job in jobs]):
                fut.result()
                bar.update(1)
    bar.close()
    return load_sweep(out)


def _run_ray(jobs, address: str | None, threads: int, bar) -> None:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        raise ValueError("sweep: backend='ray' needs the ray package (pip install ray)") from exc
    if address is not None:
        _check_ray_address(address)
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address is not None else {"num_cpus": os.cpu_count() or 1}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
        started = True
    try:
        remote = ray.remote(num_cpus=min(threads, os.cpu_count() or 1))(run_one)
        refs = [remote.remote(*job) for job in jobs]
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            ray.get(done)
            bar.update(len(done))
    finally:
        if started:
            ray.shutdown()


__all__ = ["BACKENDS", "DONE", "FAILED", "RunSpec", "run_one", "sweep"]
