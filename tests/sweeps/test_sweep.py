import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

import poisonmech as pm
from tests.helpers import tiny_model_config, tiny_task, tiny_train_config

SWEEP_SCRIPT = textwrap.dedent("""
    import sys
    import poisonmech as pm
    sys.path.insert(0, {root!r})
    from tests.helpers import tiny_model_config, tiny_task, tiny_train_config
    pm.sweep(tiny_task(n_train=320), [pm.Backdoor(trigger="cf", poison_count=k) for k in (0, 4, 8)], seeds=[0],
             models=[tiny_model_config()], train=tiny_train_config(epochs=4), out_dir=sys.argv[1],
             max_workers=1, threads_per_run=1, progress=False)
""")


def _tiny_sweep(out, counts=(0, 4, 8), n_train=96, epochs=2, **kw):
    return pm.sweep(tiny_task(n_train=n_train), [pm.Backdoor(trigger="cf", poison_count=k) for k in counts],
                    seeds=[0], models=[tiny_model_config()], train=tiny_train_config(epochs=epochs), out_dir=out,
                    max_workers=1, threads_per_run=1, progress=False, **kw)


def _numbers(sw) -> pd.DataFrame:
    f = sw.to_frame()
    return f[f["status"] == "done"].sort_values(["run", "twin", "metric"]).reset_index(drop=True)


def test_failed_runs_are_recorded_and_the_rest_go_on(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sw = _tiny_sweep(tmp_path / "s", counts=(0, 4, 500))  # one worker: runs in this process at 1 thread
        assert torch.get_num_threads() == 2, "a one-worker sweep must restore the caller's thread count"
    finally:
        torch.set_num_threads(before)
    assert [r.status for r in sw.runs].count("done") == 2
    [bad] = sw.failed
    assert "larger than the training set" in bad.error
    frame = sw.to_frame()
    assert {"run", "task", "trigger", "poison_count", "n_train", "d_model", "seed", "twin", "metric", "value"} <= set(frame.columns)
    done_marker = tmp_path / "s" / "runs" / sw.runs[0].name / "DONE.json"
    stamp = done_marker.stat().st_mtime_ns
    again = _tiny_sweep(tmp_path / "s", counts=(0, 4, 500))  # finished runs are skipped, the failure retried
    assert done_marker.stat().st_mtime_ns == stamp
    assert len(again.failed) == 1
    wide = again.metric_frame("asr")
    assert set(wide.columns) >= {"backdoored", "clean", "poison_count"} and len(wide) == 2


def test_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "run_sweep.py"
    script.write_text(SWEEP_SCRIPT.format(root=root))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=root)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("runs/*/DONE.json")):
        time.sleep(0.2)
    time.sleep(0.3)  # into the next run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(out.glob("runs/*/DONE.json"))) < 3, "the sweep finished before it could be killed"
    resumed = _tiny_sweep(out, n_train=320, epochs=4)
    reference = _tiny_sweep(tmp_path / "clean_run", n_train=320, epochs=4)
    assert [r.status for r in resumed.runs] == ["done"] * 3
    pd.testing.assert_frame_equal(_numbers(resumed), _numbers(reference))


def test_ray_backend_gives_the_same_table_as_local(tmp_path):
    pytest.importorskip("ray")
    local = _tiny_sweep(tmp_path / "local", counts=(0, 4))
    ray_sw = _tiny_sweep(tmp_path / "ray", counts=(0, 4), backend="ray")
    pd.testing.assert_frame_equal(_numbers(local), _numbers(ray_sw))


def test_bad_sweeps_are_refused(tmp_path):
    task = tiny_task(n_train=32)
    with pytest.raises(ValueError, match="attacks is empty"):
        pm.sweep(task, [], out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="seeds is empty"):
        pm.sweep(task, [pm.Backdoor(trigger="cf", poison_count=1)], seeds=[], out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="backend must be one of"):
        pm.sweep(task, [pm.Backdoor(trigger="cf", poison_count=1)], backend="slurm", out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="unknown analyses"):
        pm.sweep(task, [pm.Backdoor(trigger="cf", poison_count=1)], analyses=["astrology"], out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="cannot reach the Ray cluster"):
        pm.sweep(task, [pm.Backdoor(trigger="cf", poison_count=1)], models=[tiny_model_config()],
                 train=tiny_train_config(epochs=1), backend="ray", address="127.0.0.1:1", out_dir=tmp_path / "b",
                 progress=False)
    with pytest.raises(FileNotFoundError, match="holds no sweep"):
        pm.load_sweep(tmp_path / "nothing")


def test_same_directory_with_a_different_config_is_refused(tmp_path):
    import json

    sw = _tiny_sweep(tmp_path / "s", counts=(0,))
    manifest = tmp_path / "s" / "sweep.json"
    data = json.loads(manifest.read_text())
    name = sw.runs[0].name
    data["runs"][name]["train"]["lr"] = 0.5
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="same directory but different configs"):
        _tiny_sweep(tmp_path / "s", counts=(0,))


def test_results_have_short_reprs(tmp_path):
    import torch

    from poisonmech.patching import PatchResult
    from poisonmech.sweeps.result import Sweep

    r = PatchResult(values=torch.zeros(2, 5, 3), axes=("layer", "pos"), site="resid_pre", mode="denoise",
                    method="exact", baseline=torch.zeros(3), reference=torch.ones(3))
    assert repr(r).count("\n") == 0 and "layer=2 x pos=5" in repr(r) and "batch=3" in repr(r)
    assert repr(Sweep(out_dir=tmp_path, runs=())) == f"Sweep({str(tmp_path)!r}, 0 runs: )"


def test_analysis_configs_travel_with_the_sweep_and_a_change_revisits_finished_runs(tmp_path, monkeypatch):
    import poisonmech.analyses as an

    calls = []
    real = an.ANALYSES["patching"]
    monkeypatch.setitem(an.ANALYSES, "patching", lambda s, out, cfg: calls.append(cfg) or real(s, out, cfg))
    sw = _tiny_sweep(tmp_path / "sw", counts=(4,), analyses={"patching": {"n": 4}})
    assert calls == [an.PatchingAnalysis(n=4)]
    assert sw.runs[0].spec.analyses == {"patching": {"n": 4}}
    _tiny_sweep(tmp_path / "sw", counts=(4,), analyses={"patching": {"n": 4}})
    assert len(calls) == 1  # finished with these analyses: nothing to do
    sw2 = _tiny_sweep(tmp_path / "sw", counts=(4,), analyses={"patching": an.PatchingAnalysis(n=6)})
    assert calls[-1] == an.PatchingAnalysis(n=6) and len(calls) == 2  # revisited: the pair reused, the analysis redone
    assert sw2.runs[0].analyses["patching"]["patching_n_examples"] <= 6
    with pytest.raises(pm.ConfigError, match="unknown field 'k'"):
        _tiny_sweep(tmp_path / "sw", counts=(4,), analyses={"patching": {"k": 4}})
