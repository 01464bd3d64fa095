"""How fast does the dashboard re-render after a threshold change? (issue 6: <= 300 ms p95 on CPU)

Two measurements for the default model (random-init fallback when its weights are missing, said in the output):

1. the view functions a threshold change runs, 20 changes cycling over the slider's values:
   Inspect (skipped run + the paired latency saving at batch 1 + block map + tables) and Thresholds (skipped run
   of the current image + calibration lookup + the current setting's paired saving + Pareto and skip-rate
   figures over the latency sweep measured once before);
2. the same 20 changes through ``streamlit.testing.v1.AppTest`` (a whole-script rerun: an upper bound of the
   fragment rerun the browser does).

Usage: ``python benchmarks/dashboard_latency.py [--calib-n 256] [--out benchmarks/results]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "max_ms": float(a.max()),
            "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-n", type=int, default=256)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--skip-apptest", action="store_true")
    args = ap.parse_args()
    from skipviz import keep_heap_memory

    keep_heap_memory()  # as the dashboard does (pages/_shared.registry_model): stable CPU timings
    os.environ["SKIPVIZ_CALIB_N"] = str(args.calib_n)

    import torch

    from skipviz import CIFAR_MODEL, load_image, dashboard, figures, policies
    from skipviz.evaluate import calibration
    from skipviz.measure import clock
    from skipviz.samples import sample_bytes, sample_names

    threads = dashboard.configure_threads()
    lm = dashboard.load_model(CIFAR_MODEL)
    net = lm.net
    image, _ = load_image(sample_bytes(sample_names()[0]))
    x = dashboard.preprocess(net, image)
    full = dashboard.run_full(net, x)
    t0 = time.perf_counter()
    sweep = calibration.sweep_calibration(net, calibration.load_calibration(net, args.calib_n))
    latencies = dashboard.latency_sweep(net, sweep, 1)
    precompute_s = time.perf_counter() - t0
    profile = dashboard.block_profile(net, x)
    grid = calibration.threshold_grid()
    values = [grid[(3 + 7 * k) % len(grid)] for k in range(args.changes)]

    inspect_ms, thresholds_ms = [], []
    for t in values:
        t0 = time.perf_counter()
        policy = policies.make_policy(net, t)
        res = dashboard.inspect(net, x, policy, full)
        live = dashboard.live_latency(net, x, policy, profile)
        figures.block_map_figure(res.trace), dashboard.block_table(res.trace, live.block_ms, live.profile_device)
        dashboard.top5_side_by_side(res, net.meta.classes), figures.latency_figure(live.saving)
        inspect_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        res = dashboard.inspect(net, x, policies.make_policy(net, t), full)
        figures.block_map_figure(res.trace)
        point = sweep.point_for(net, t)
        saving = dashboard.point_saving(net, sweep.calib, policies.make_policy(net, t), 1)
        figures.pareto_figure(sweep, point, latencies, saving), figures.skip_rate_figure(point, net)
        dashboard.calibration_table(point, sweep.full, saving)
        thresholds_ms.append((time.perf_counter() - t0) * 1e3)

    result = {"model": net.meta.display_name, "weights_missing": lm.warning is not None,
              "device": clock.device_label(), "torch_threads": threads, "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version(), "calibration": sweep.calib.source,
              "precompute_s": precompute_s, "views": {"inspect": pct(inspect_ms), "thresholds": pct(thresholds_ms)},
              "load_average_1min": os.getloadavg()[0]}

    if not args.skip_apptest:
        from streamlit.testing.v1 import AppTest

        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        t0 = time.perf_counter()
        at.run()
        result["apptest_first_run_s"] = time.perf_counter() - t0
        app = {}
        for page, key in (("pages/inspect.py", "inspect_threshold"), ("pages/thresholds.py", "thresholds_threshold")):
            at.switch_page(page).run()
            times = []
            for t in values:
                t0 = time.perf_counter()
                at.slider(key=key).set_value(t).run()
                times.append((time.perf_counter() - t0) * 1e3)
            app[page] = pct(times)
        result["apptest_rerun"] = app

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dashboard_latency.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
