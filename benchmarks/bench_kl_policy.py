"""KL-redundancy policy vs learned gates vs the full network: accuracy and FLOPs cut on the same images.

What it measures (all with the real skipping engine, ``skipviz.evaluate.evaluate_policy``):

* ``full`` - every block runs (reference);
* ``gates@t`` - the trained gate heads (``GatePolicy``) at a few thresholds;
* ``kl@q`` - ``KLRedundancyPolicy`` (spatial-attention KL by default) calibrated on images of the validation
  split (carved from ``train/`` with the model card's seed, so never the test images), at several quantiles q.

Every policy is evaluated on the same CIFAR-10 ``test/`` subset (the first ``--n-test`` images in file
order). Writes ``benchmarks/results/kl_policy.json`` and ``kl_policy.md`` (table + device, software versions,
date, exact command).

Run it for real once the trained default model is in ``data/`` and no ``skipviz train`` job is running
(the script refuses to run next to one unless ``--force``)::

    . .venv/bin/activate
    python benchmarks/bench_kl_policy.py                      # default model, 2000 test images, 500 for calibration
    python benchmarks/bench_kl_policy.py --n-test 10000 --q 0.1 0.2 0.3 0.5 --thresholds 0.3 0.5 0.7

A smoke run on a randomly initialised network (numbers meaningless; never written to benchmarks/results
unless ``--out`` says so) checks the script end to end::

    python benchmarks/bench_kl_policy.py --model cifar_resnet20 --n-test 64 --n-calib 32 --out /tmp/klbench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import CIFAR_MODEL, FullPolicy, GatePolicy, create_model  # noqa: E402
from skipviz.data import cifar10_root, load_split, train_val_split  # noqa: E402
from skipviz.evaluate import evaluate_policy  # noqa: E402
from skipviz.policies.kl import KLRedundancyPolicy  # noqa: E402


def training_running() -> list[str]:
    """Command lines of running ``skipviz train`` processes (read from /proc; nothing is touched)."""
    found = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "skipviz" in cmd and " train" in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    busy = training_running()
    info["background_training"] = bool(busy)
    return info


def versions() -> dict:
    import captum
    import scipy
    import torchvision

    import skipviz

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "scipy": scipy.__version__, "captum": captum.__version__, "numpy": np.__version__,
            "skipviz": skipviz.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=CIFAR_MODEL, help=f"registry name (default {CIFAR_MODEL})")
    ap.add_argument("--n-test", type=int, default=2000, help="test images (first N in file order)")
    ap.add_argument("--n-calib", type=int, default=500, help="validation images for the KL calibration")
    ap.add_argument("--q", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--method", choices=["spatial", "prediction"], default="spatial")
    ap.add_argument("--skip-downsample", action="store_true", help="let the KL policy skip downsampling blocks")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for kl_policy.json/md")
    ap.add_argument("--force", action="store_true", help="run even while a `skipviz train` job is running")
    args = ap.parse_args(argv)

    busy = training_running()
    if busy and not args.force:
        print("a `skipviz train` job is running; benchmark numbers would be distorted. Wait for it, or --force.\n"
              + "\n".join(busy), file=sys.stderr)
        return 3
    root = cifar10_root()
    if root is None:
        print("CIFAR-10 not found: set SKIPVIZ_CIFAR10 to an ImageFolder root with train/ and test/", file=sys.stderr)
        return 2
    try:
        net = create_model(args.model)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).eval()
    seed = int(net.meta.card.get("training", {}).get("config", {}).get("seed", 0))
    val_size = int(net.meta.card.get("training", {}).get("config", {}).get("val_size", 5000))
    train = load_split(root, "train", progress=False)
    _, val_idx = train_val_split(len(train), val_size, seed)
    calib = train.subset(val_idx[: args.n_calib])
    test = load_split(root, "test", progress=False)
    test = test.subset(np.arange(min(args.n_test, len(test))))

    def row(name: str, knob: float | None, ev, skipped: list[int] | None) -> dict:
        s = ev.summary(full)
        return {"policy": name, "knob": knob, "accuracy": s["accuracy"],
                "accuracy_drop_points": s["accuracy_drop_points"], "flops_saved_fraction": s["flops_saved_fraction"],
                "blocks_mean": s["blocks_mean"], "agreement_with_full": s["agreement_with_full"],
                "skipped_blocks": skipped, "config": s["policy"]}

    t0 = time.perf_counter()
    full = evaluate_policy(net, test, FullPolicy(), args.batch_size)
    rows = [row("full", None, full, [])]
    t_cal = time.perf_counter()
    base = KLRedundancyPolicy.calibrate(net, calib, q=args.q[0], method=args.method,
                                        skip_downsample=args.skip_downsample, batch_size=args.batch_size,
                                        max_samples=args.n_calib)
    calib_s = time.perf_counter() - t_cal
    for q in args.q:
        pol = base.with_q(q)
        rows.append(row("kl_redundancy", q, evaluate_policy(net, test, pol, args.batch_size), sorted(pol.skip)))
    if net.gated_blocks:
        for t in args.thresholds:
            rows.append(row("gates", t, evaluate_policy(net, test, GatePolicy(t), args.batch_size), None))
    total_s = time.perf_counter() - t0
    table = pd.DataFrame(rows).drop(columns="config")
    result = {
        "model": args.model, "weights_sha256": net.meta.weights_sha256, "method": args.method,
        "skip_downsample": args.skip_downsample,
        "data": {"root_basename": Path(str(root)).name, "test": {"n": len(test), "files_sha256": test.files_sha256},
                 "calibration": {"n": len(calib), "split": "validation carved from train/", "seed": seed,
                                 "files_sha256": calib.files_sha256}},
        "kl_calibration": base.config() | {"q": None, "skip": None}, "calibration_seconds": calib_s,
        "rows": rows, "seconds_total": total_s,
        "device": device_info(device), "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [Path(__file__).relative_to(ROOT).as_posix(),
                                                                  *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kl_policy.json").write_text(json.dumps(result, indent=2, default=float))
    shown = table.assign(accuracy=lambda d: d["accuracy"].map("{:.2%}".format),
                         flops_saved_fraction=lambda d: d["flops_saved_fraction"].map("{:.1%}".format),
                         accuracy_drop_points=lambda d: d["accuracy_drop_points"].map("{:+.2f}".format),
                         agreement_with_full=lambda d: d["agreement_with_full"].map("{:.1%}".format),
                         blocks_mean=lambda d: d["blocks_mean"].map("{:.2f}".format))
    md = [f"# KL-redundancy policy vs learned gates vs full ({args.model})", "",
          f"Same {len(test)} CIFAR-10 test images for every row; KL policy ({args.method} KL, downsampling blocks "
          f"{'skippable' if args.skip_downsample else 'always run'}) calibrated on {len(calib)} validation images "
          f"in {calib_s:.1f} s. knob = q (KL) or gate threshold. FLOPs by torch.utils.flop_counter, gate heads "
          "included.", "", shown.to_markdown(index=False), "",
          f"Device: {result['device']}  ", f"Versions: {result['versions']}  ", f"Date: {result['date']}  ",
          f"Command: `{result['command']}`", ""]
    (args.out / "kl_policy.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
