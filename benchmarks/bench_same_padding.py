"""TF "same" padding as the convolution's own symmetric padding against a padded copy of the input, full and
skipped runs of an EfficientNet-Lite, same process.

timm's ``Conv2dSame`` pads a stride-2 convolution's input by one more pixel after than before (``pad_same``: a
new, zero-filled copy of the whole map, then the convolution on the odd-sized copy). The engine can instead run
it as the convolution's own symmetric padding with a kernel widened by one leading zero tap
(``skipviz.models.efficientnet_lite.SYMMETRIC_SAME``; the results are equal, a test). This benchmark times the
variants:

* ``padded``: ``SYMMETRIC_SAME = "none"``, timm's padded copy everywhere;
* ``depthwise``: the depthwise convolutions only (what the engine does);
* ``all``: the stem's dense convolution too.

Each variant times the full network and the skipped run at the card's default decision source and threshold,
at batch 1 (``--batch1-images`` photos one by one) and in batches; the six callables run round-robin
(``skipviz.measure.clock.measure_interleaved``, one call per repeat). Writes
``benchmarks/results/same_padding_<device>.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/bench_same_padding.py
    python benchmarks/bench_same_padding.py --quick --out /tmp/same   # smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import skipviz.models.efficientnet_lite as lite  # noqa: E402
from skipviz import keep_heap_memory, policy_for  # noqa: E402
from skipviz.cli.bench import BenchConfig, bench_inputs, load_bench_model, write_results  # noqa: E402
from skipviz.cli.bench_common import engine_bench_report, report_footer, report_header  # noqa: E402
from skipviz.engine.network import SkipNetwork  # noqa: E402
from skipviz.measure.clock import measure_interleaved  # noqa: E402
from skipviz.policies import Policy, describe_policy  # noqa: E402

VARIANTS = {"padded": "none", "depthwise": "depthwise", "all": "all"}


def _caller(net: SkipNetwork, batches: list[torch.Tensor], policy: Policy | None, mode: str):
    """A callable running every batch once under one padding mode: the full network (``policy`` None) or the
    skipped run."""

    def call() -> None:
        old, lite.SYMMETRIC_SAME = lite.SYMMETRIC_SAME, mode
        try:
            for xb in batches:
                if policy is None:
                    net(xb)
                else:
                    net.run(xb, policy)
        finally:
            lite.SYMMETRIC_SAME = old

    return call


def _max_diff(net: SkipNetwork, batches: list[torch.Tensor]) -> float:
    """Largest |logit difference| of the full network on the first batch, any variant against ``padded``."""
    out = {}
    for name, mode in VARIANTS.items():
        old, lite.SYMMETRIC_SAME = lite.SYMMETRIC_SAME, mode
        try:
            out[name] = net(batches[0])
        finally:
            lite.SYMMETRIC_SAME = old
    return max(float((out[v] - out["padded"]).abs().max()) for v in VARIANTS)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = BenchConfig(model=args.model or "efficientnet_lite0.imagenet_gated", inputs=args.inputs, seed=0)
    net, model_label = load_bench_model(cfg)
    net.eval()
    x_all, inputs_label = bench_inputs(net, cfg, max(max(args.batch_sizes), args.batch1_images))
    policy = policy_for(net, net.meta.default_source())
    rows = []
    with torch.inference_mode():
        for bs in args.batch_sizes:
            batches = [x_all[i:i + 1] for i in range(args.batch1_images)] if bs == 1 else [x_all[:bs]]
            fns = {f"{v}/{kind}": _caller(net, batches, policy if kind == "skipped" else None, mode)
                   for v, mode in VARIANTS.items() for kind in ("full", "skipped")}
            stats = measure_interleaved(fns, warmup=args.warmup, repeats=args.repeats, device="cpu", batch_size=bs,
                                        batches_per_call=len(batches), min_repeat_s=0.0, number=1)
            row: dict = {"batch_size": bs, "max_abs_logit_diff": _max_diff(net, batches)}
            for name, st in stats.items():
                row[name.replace("/", "_") + "_ms"] = st.per_batch_ms
                row[name.replace("/", "_") + "_iqr_ms"] = st.iqr_ms / st.batches_per_call
            for v in VARIANTS:
                for kind in ("full", "skipped"):
                    row[f"{v}_{kind}_speedup"] = row[f"padded_{kind}_ms"] / row[f"{v}_{kind}_ms"]
            rows.append(row)
            print(f"batch {bs:3d}: full " + ", ".join(f"{v} {row[f'{v}_full_ms']:.3f}" for v in VARIANTS)
                  + " ms; skipped " + ", ".join(f"{v} {row[f'{v}_skipped_ms']:.3f}" for v in VARIANTS) + " ms",
                  flush=True)
    settings = {"batch_sizes": args.batch_sizes, "batch1_images": args.batch1_images,
                "policy": describe_policy(policy), "repeats": args.repeats, "warmup": args.warmup}
    return engine_bench_report(model_label, inputs_label, settings, "bench_same_padding.py",
                               "skipviz.measure.clock.measure_interleaved: the six callables round-robin, medians over "
                               "repeats; batch 1 times each image one by one and reports ms per image", rows)


def markdown(report: dict) -> str:
    lines = report_header('TF "same" padding: padded copy vs symmetric convolution', report,
                          f"skipped run: {report['settings']['policy']}") + [
             "| batch | run | padded ms | depthwise ms (speedup) | all ms (speedup) |", "|---:|---|---:|---:|---:|"]
    for r in report["rows"]:
        for kind in ("full", "skipped"):
            lines.append(f"| {r['batch_size']} | {kind} | {r[f'padded_{kind}_ms']:.3f} | "
                         f"{r[f'depthwise_{kind}_ms']:.3f} ({r[f'depthwise_{kind}_speedup']:.3f}x) | "
                         f"{r[f'all_{kind}_ms']:.3f} ({r[f'all_{kind}_speedup']:.3f}x) |")
    lines += ["", "Largest logit difference from the padded run: "
              + ", ".join(f"batch {r['batch_size']}: {r['max_abs_logit_diff']:.1e}" for r in report["rows"]) + "."]
    return "\n".join(lines + report_footer(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a registered EfficientNet-Lite (default: the ImageNet default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--batch1-images", type=int, default=16, help="photos timed one by one at batch 1")
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
    jp, mp = write_results(report, args.out, f"same_padding_{report['environment']['device_type']}", markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
