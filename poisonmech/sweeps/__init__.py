"""Sweeps over attacks x models x seeds: resumable run directories, local pool or Ray."""

from poisonmech.sweeps.result import RunRecord, Sweep, load_sweep
from poisonmech.sweeps.runner import BACKENDS, run_one, sweep
from poisonmech.sweeps.spec import RunSpec

__all__ = ["BACKENDS", "RunRecord", "RunSpec", "Sweep", "load_sweep", "run_one", "sweep"]
