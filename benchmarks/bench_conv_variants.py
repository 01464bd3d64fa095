"""How the engine runs EfficientNet-Lite's convolutions, variant against variant, full and skipped runs, same
process.

Two switches (the results are equal up to float rounding; tests):

* TF "same" padding (``skipviz.models.efficientnet_lite.SYMMETRIC_SAME``): timm's ``Conv2dSame`` pads a
  stride-2 convolution's input by one more pixel after than before, with a new zero-filled copy of the map
  (``"none"``); the engine runs the depthwise ones as the convolution's own symmetric padding with a kernel widened
  by one leading zero tap (``"depthwise"``), or the dense stem too (``"all"``);
* the fused oneDNN convolution (``skipviz.engine._onednn.ENABLED``): prepacked weights with the bias and the
  activation in one primitive, against ``F.conv2d`` then the activation.

Variants: ``plain`` (depthwise symmetric, ``F.conv2d``: the engine before the fused path, the baseline),
``padded`` (padded copies everywhere, ``F.conv2d``), ``fused`` (depthwise symmetric, fused: what the engine does)
and ``fused_all`` (the stem symmetric too, fused). Each variant times the full network and the skipped runs of the
card's default decision source at its default threshold and its fast operating point, at batch 1 (``--batch1-images`` photos one by one) and in batches;
all callables run round-robin (``skipviz.measure.clock.measure_interleaved``, one call per repeat). With the
FLOPs the skipped run saves on the same inputs, each variant's efficiency (time saved fraction / FLOPs saved
fraction, per round) shows how the variant moves the skipping's payoff. Writes
``benchmarks/results/conv_variants_<device>.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/bench_conv_variants.py
    python benchmarks/bench_conv_variants.py --quick --out /tmp/conv   # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import skipviz.engine._onednn as onednn  # noqa: E402
import skipviz.models.efficientnet_lite as lite  # noqa: E402
from skipviz import keep_heap_memory, policy_for  # noqa: E402
from skipviz.cli.bench import BenchConfig, bench_inputs, load_bench_model, write_results  # noqa: E402
from skipviz.cli.bench_common import engine_bench_report, report_footer, report_header  # noqa: E402
from skipviz.engine.network import SkipNetwork  # noqa: E402
from skipviz.measure.clock import measure_interleaved  # noqa: E402
from skipviz.policies import Policy, describe_policy  # noqa: E402

#: variant -> (SYMMETRIC_SAME, fused oneDNN convolutions); the first is the baseline of the speed-ups
VARIANTS: dict[str, tuple[str, bool]] = {"plain": ("depthwise", False), "padded": ("none", False),
                                         "fused": ("depthwise", True), "fused_all": ("all", True)}
BASE = "plain"


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    """The engine switched to one variant for the context."""
    old = lite.SYMMETRIC_SAME, onednn.ENABLED
    lite.SYMMETRIC_SAME, onednn.ENABLED = VARIANTS[name]
    try:
        yield
    finally:
        lite.SYMMETRIC_SAME, onednn.ENABLED = old


def _caller(net: SkipNetwork, batches: list[torch.Tensor], policy: Policy | None, variant: str):
    """A callable running every batch once as one variant: the full network (``policy`` None) or the skipped
    run."""

    def call() -> None:
        with _variant(variant):
            for xb in batches:
                if policy is None:
                    net(xb)
                else:
                    net.run(xb, policy)

    return call


def _max_diff(net: SkipNetwork, batches: list[torch.Tensor]) -> float:
    """Largest |logit difference| of the full network on the first batch, any variant against the baseline."""
    out = {}
    for name in VARIANTS:
        with _variant(name):
            out[name] = net(batches[0])
    return max(float((out[v] - out[BASE]).abs().max()) for v in VARIANTS)


def _flops_saved(net: SkipNetwork, batches: list[torch.Tensor], policy: Policy) -> float:
    """The fraction of the full network's FLOPs the skipped run saves over ``batches`` (decision heads counted as
    spent)."""
    results = [net.run(xb, policy) for xb in batches]
    spent = sum(float(r.flops_executed().sum()) for r in results)
    full = sum(r.flops_full() * r.batch_size for r in results)
    return 1.0 - spent / full


def _points(net: SkipNetwork, names: list[str]) -> dict[str, Policy]:
    """The skipped runs timed: the card's default decision source at its default threshold (``default``) and at
    its named operating points (``fast``, ``faithful``) the card has."""
    source = net.meta.default_source()
    known = net.meta.operating_points(source)
    return {name: policy_for(net, source, None if name == "default" else known[name])
            for name in names if name == "default" or name in known}


def _paired_efficiency(full: list[float], skipped: list[float], flops_saved: float) -> list[float]:
    """Median and quartiles over repeats of (1 - skipped / full) / flops_saved, the two timed in the same
    round-robin round (drifts of the machine cancel)."""
    ratios = [(1.0 - s / f) / flops_saved for f, s in zip(full, skipped)]
    return [float(v) for v in np.percentile(ratios, [50, 25, 75])]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = BenchConfig(model=args.model or "efficientnet_lite0.imagenet_gated", inputs=args.inputs, seed=0)
    net, model_label = load_bench_model(cfg)
    net.eval()
    x_all, inputs_label = bench_inputs(net, cfg, max(max(args.batch_sizes), args.batch1_images))
    points = _points(net, args.points)
    runs = ["full", *points]
    rows = []
    with torch.inference_mode():
        for bs in args.batch_sizes:
            batches = [x_all[i:i + 1] for i in range(args.batch1_images)] if bs == 1 else [x_all[:bs]]
            fns = {f"{v}/{kind}": _caller(net, batches, points.get(kind), v) for v in VARIANTS for kind in runs}
            stats = measure_interleaved(fns, warmup=args.warmup, repeats=args.repeats, device="cpu", batch_size=bs,
                                        batches_per_call=len(batches), min_repeat_s=0.0, number=1)
            row: dict = {"batch_size": bs, "max_abs_logit_diff": _max_diff(net, batches)}
            for kind, policy in points.items():
                row[f"{kind}_flops_saved"] = _flops_saved(net, batches, policy)
            for name, st in stats.items():
                row[name.replace("/", "_") + "_ms"] = st.per_batch_ms
                row[name.replace("/", "_") + "_iqr_ms"] = st.iqr_ms / st.batches_per_call
            for v in VARIANTS:
                for kind in runs:
                    row[f"{v}_{kind}_speedup"] = row[f"{BASE}_{kind}_ms"] / row[f"{v}_{kind}_ms"]
                for kind in points:
                    saved = row[f"{kind}_flops_saved"]
                    row[f"{v}_{kind}_efficiency"] = (1.0 - row[f"{v}_{kind}_ms"] / row[f"{v}_full_ms"]) / saved
                    row[f"{v}_{kind}_paired_efficiency"] = _paired_efficiency(
                        stats[f"{v}/full"].times_ms, stats[f"{v}/{kind}"].times_ms, saved)
            rows.append(row)
            print(f"batch {bs:3d}: " + "; ".join(
                f"{kind} " + ", ".join(f"{v} {row[f'{v}_{kind}_ms']:.3f}" for v in VARIANTS) for kind in runs)
                + " ms", flush=True)
    settings = {"batch_sizes": args.batch_sizes, "batch1_images": args.batch1_images,
                "points": {k: describe_policy(p) for k, p in points.items()}, "repeats": args.repeats,
                "warmup": args.warmup}
    return engine_bench_report(model_label, inputs_label, settings, "bench_conv_variants.py",
                               "skipviz.measure.clock.measure_interleaved: every variant's full and skipped runs "
                               "round-robin, medians over repeats; batch 1 times each image one by one and reports ms "
                               "per image", rows)


def markdown(report: dict) -> str:
    points = report["settings"]["points"]
    runs = ["full", *points]
    lines = report_header("Convolution variants of the engine", report, "skipped runs: " + "; ".join(
        f"{k}: {v}" for k, v in points.items())) + [
        f"Speed-ups against `{BASE}` (the engine before the fused path: depthwise symmetric padding, `F.conv2d`). "
        "Efficiency = time saved fraction / FLOPs saved fraction of a skipped run: the median (quartiles) of the "
        "per-round ratios, full and skipped timed in the same round.", "",
        "| batch | run | " + " | ".join(f"{v} ms" + ("" if v == BASE else " (speed-up)") for v in VARIANTS) + " |",
        "|---:|---|" + "---:|" * len(VARIANTS)]
    for r in report["rows"]:
        for kind in runs:
            cells = [f"{r[f'{v}_{kind}_ms']:.3f}" + ("" if v == BASE else f" ({r[f'{v}_{kind}_speedup']:.3f}x)")
                     for v in VARIANTS]
            lines.append(f"| {r['batch_size']} | {kind} | " + " | ".join(cells) + " |")
        for kind in points:
            cells = ["{:.2f} ({:.2f}-{:.2f})".format(*r[f"{v}_{kind}_paired_efficiency"]) for v in VARIANTS]
            lines.append(f"| {r['batch_size']} | {kind}: efficiency ({100 * r[f'{kind}_flops_saved']:.1f}% FLOPs "
                         "saved) | " + " | ".join(cells) + " |")
    lines += ["", "Largest logit difference from the baseline: "
              + ", ".join(f"batch {r['batch_size']}: {r['max_abs_logit_diff']:.1e}" for r in report["rows"]) + "."]
    return "\n".join(lines + report_footer(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a registered EfficientNet-Lite (default: the ImageNet default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--batch1-images", type=int, default=16, help="photos timed one by one at batch 1")
    p.add_argument("--points", nargs="+", default=["default", "fast"], choices=["default", "fast", "faithful"],
                   help="skipped runs: the card's default and/or its named operating points")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--inputs", default="auto", choices=["auto", "cifar10", "random"])
    p.add_argument("--quick", action="store_true", help="tiny smoke setting: batch 1 (2 images) and 2, 2 repeats")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    keep_heap_memory()  # as the skipviz command does: stable CPU timings (skipviz._allocator)
    if args.quick:
        args.batch_sizes, args.batch1_images, args.repeats, args.warmup = [1, 2], 2, 2, 1
    report = run(args)
    jp, mp = write_results(report, args.out, f"conv_variants_{report['environment']['device_type']}", markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
