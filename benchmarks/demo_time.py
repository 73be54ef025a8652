"""Wall time of the main job, ``poisonmech demo``, against its 10-minute target on 2 CPU cores.

Runs the demo into a fresh folder (nothing cached), checks that the report it printed renders
in headless Chromium (when one is installed), and prints

    demo_seconds: 273.5
    demo_fraction_of_10_min_target: 0.46

Run: ``.venv/bin/python benchmarks/demo_time.py [--out runs/bench_demo]`` (the folder is emptied first).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 600.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_demo")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("poisonmech")
    t0 = time.perf_counter()
    subprocess.run([str(exe), "demo", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    print(f"demo_seconds: {seconds:.1f}")
    print(f"demo_fraction_of_10_min_target: {seconds / TARGET_SECONDS:.2f}")
    from poisonmech.viz import check_report, find_chrome

    if find_chrome() is None:
        print("report check skipped: no Chromium/Chrome (apt-get install chromium)")
        return
    state = check_report(out / "report.html")
    print(f"demo_report_figures_rendered: {state['rendered']}/{state['figures']}  errors: {state['errors'] or 'none'}")


if __name__ == "__main__":
    main()
