"""Sweeps over attacks x models x seeds (resumable run directories, local pool or Ray), and
multi-stage pipelines side by side over seeds (``pipeline_sweep``)."""

from poisonmech.sweeps.pipelines import PipelineSweep, pipeline_sweep
from poisonmech.sweeps.result import RunRecord, Sweep, load_sweep
from poisonmech.sweeps.runner import BACKENDS, run_one, sweep
from poisonmech.sweeps.spec import RunSpec

__all__ = ["BACKENDS", "PipelineSweep", "RunRecord", "RunSpec", "Sweep", "load_sweep", "pipeline_sweep", "run_one", "sweep"]
