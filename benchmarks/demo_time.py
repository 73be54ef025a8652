"""Wall time of the main job, ``poisonmech demo``, alone and beside one other torch job.

Runs the demo into a fresh folder (nothing cached), checks that the report it printed renders
in headless Chromium (when one is installed), then runs it again into another fresh folder
while a second process trains a small torch model with two intra-op threads for the whole
time (the kind of job a researcher has running beside it: a test run, a notebook), and prints

    demo_seconds: 273.5
    demo_fraction_of_5_min_target: 0.91
    demo_seconds_beside_one_job: 410.2
    demo_slowdown_beside_one_job: 1.50   (target <= 2)

Two processes that each spin two OpenMP threads on two cores collapse (each one's idle threads
spin on the cores the other needs); the demo runs one one-thread run per core, so it has no
threads to spin.

Run: ``.venv/bin/python benchmarks/demo_time.py [--out runs/bench_demo] [--skip-beside]``
(the folders are emptied first).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 300.0

#: the other job: a small MLP trained on random data with 2 threads until killed
OTHER_JOB = """
import torch
torch.set_num_threads(2)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
opt = torch.optim.AdamW(net.parameters(), 1e-3)
x = torch.randn(64, 256)
while True:
    loss = (net(x) - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def run_demo(out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("poisonmech")
    t0 = time.perf_counter()
    subprocess.run([str(exe), "demo", "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_demo")
    ap.add_argument("--skip-beside", action="store_true", help="only time the demo alone")
    args = ap.parse_args()
    out = Path(args.out)
    seconds = run_demo(out)
    print(f"demo_seconds: {seconds:.1f}")
    print(f"demo_fraction_of_5_min_target: {seconds / TARGET_SECONDS:.2f}")
    from poisonmech.viz import check_report, find_chrome

    if find_chrome() is None:
        print("report check skipped: no Chromium/Chrome (apt-get install chromium)")
    else:
        state = check_report(out / "report.html")
        print(f"demo_report_figures_rendered: {state['rendered']}/{state['figures']}  "
              f"errors: {state['errors'] or 'none'}")
    if args.skip_beside:
        return
    # a SIGTERM must not leave the other job running (it would load every later measurement)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    other = subprocess.Popen([sys.executable, "-c", OTHER_JOB])
    try:
        time.sleep(2)  # let it start
        beside = run_demo(out.with_name(out.name + "_beside"))
    finally:
        other.kill()
        other.wait()
    print(f"demo_seconds_beside_one_job: {beside:.1f}")
    print(f"demo_slowdown_beside_one_job: {beside / seconds:.2f}   (target <= 2)")


if __name__ == "__main__":
    main()
