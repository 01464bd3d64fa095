"""Inference folding: BatchNorm folded into each convolution (and the gate heads' BN and mean into their first
layer) against the modules run as written, full and skipped runs, same process.

At inference the engine computes each ``bn(conv(x))`` as one convolution with folded weights
(``skipviz.engine.folding.conv_bn``, ``torch.nn.utils.fusion.fuse_conv_bn_weights``). This benchmark backs that
choice and checks what it costs in accuracy: for the default model at batch 1 (``--batch1-images`` images
timed one by one) and in batches, it times the plain full network and the skipped run at one gate threshold
with

* ``modules``: folding switched off (``skipviz.inference_folding(False)``): conv, BN, ReLU as written, and
  the gate heads as modules (which also turns off the batch-of-one host decision, ``probability_of_one``);
* ``folded``: what the engine does.

The full network has no gates, so its speedup is the BatchNorm folding alone; the skipped run's includes the
gate heads' folding and, at batch 1, their host decision.

Timing is ``skipviz.measure.clock.measure_interleaved`` (the four callables round-robin, medians and quartiles over
repeats). The largest logit difference and the gate-decision agreement between the two are recorded with the
times. Writes ``benchmarks/results/fold_bn_<device>.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/bench_fold_bn.py
    python benchmarks/bench_fold_bn.py --quick --inputs random --out /tmp/fold   # smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import GatePolicy, inference_folding  # noqa: E402
from skipviz.engine.network import SkipNetwork  # noqa: E402
from skipviz.cli.bench import BenchConfig, bench_inputs, load_bench_model, write_results
from skipviz.cli.bench_common import (add_engine_bench_arguments, engine_bench_report, report_footer, report_header,
                                      time_engine_variants)
from skipviz import keep_heap_memory

VARIANTS = {"modules": False, "folded": True}


def _caller(net: SkipNetwork, batches: list[torch.Tensor], policy: GatePolicy | None, fold: bool):
    """A callable running every batch once: the full network (``policy`` None) or the skipped run."""

    def call() -> None:
        with inference_folding(fold):
            for xb in batches:
                if policy is None:
                    net(xb)
                else:
                    net.run(xb, policy)

    return call


def _agreement(net: SkipNetwork, batches: list[torch.Tensor], policy: GatePolicy) -> tuple[float, float]:
    """(largest |logit difference| of the full network, fraction of equal gate decisions), folded vs modules."""
    diff, same, total = 0.0, 0, 0
    for xb in batches:
        out = {}
        for name, fold in VARIANTS.items():
            with inference_folding(fold):
                out[name] = (net(xb), net.run(xb, policy).executed)
        diff = max(diff, float((out["folded"][0] - out["modules"][0]).abs().max()))
        same += int((out["folded"][1] == out["modules"][1]).sum())
        total += out["folded"][1].numel()
    return diff, same / total


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = BenchConfig(model=args.model, inputs=args.inputs, seed=0)
    net, model_label = load_bench_model(cfg)
    net.eval()
    x_all, inputs_label = bench_inputs(net, cfg, max(max(args.batch_sizes), args.batch1_images))
    policy = GatePolicy(args.threshold)
    rows = []
    with torch.inference_mode():
        for bs in args.batch_sizes:
            batches = ([x_all[i:i + 1] for i in range(args.batch1_images)] if bs == 1 else [x_all[:bs]])
            fns = {f"{v}/{kind}": _caller(net, batches, policy if kind == "skipped" else None, fold)
                   for v, fold in VARIANTS.items() for kind in ("full", "skipped")}
            row = time_engine_variants(fns, bs, len(batches), args.warmup, args.repeats, "modules", "folded", "fold")
            diff, agree = _agreement(net, batches, policy)
            row.update(images_per_call=len(batches) * bs, max_abs_logit_diff=diff, decision_agreement=agree)
            rows.append(row)
            print(f"batch {bs:4d}: full {row['modules_full_ms']:.3f} -> {row['folded_full_ms']:.3f} ms, skipped "
                  f"{row['modules_skipped_ms']:.3f} -> {row['folded_skipped_ms']:.3f} ms (modules -> folded); "
                  f"max |logit diff| {diff:.1e}, decisions agree {agree:.2%}", flush=True)
    settings = {"batch_sizes": args.batch_sizes, "batch1_images": args.batch1_images, "threshold": args.threshold,
                "repeats": args.repeats, "warmup": args.warmup}
    return engine_bench_report(model_label, inputs_label, settings, "bench_fold_bn.py",
                               "skipviz.measure.clock.measure_interleaved: the four callables round-robin, medians over "
                               "repeats; batch 1 times each image one by one and reports ms per image", rows)


def markdown(report: dict) -> str:
    lines = report_header("Inference folding (BatchNorm into convolutions)", report,
                          f"skipped run at gate threshold {report['settings']['threshold']:.2f}") + [
             "| batch | full modules ms | full folded ms | speedup | skipped modules ms | skipped folded ms | speedup "
             "| max abs logit diff | decisions agree |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch_size']} | {r['modules_full_ms']:.3f} | {r['folded_full_ms']:.3f} | "
                     f"{r['full_fold_speedup']:.2f}x | {r['modules_skipped_ms']:.3f} | {r['folded_skipped_ms']:.3f} | "
                     f"{r['skipped_fold_speedup']:.2f}x | {r['max_abs_logit_diff']:.1e} | "
                     f"{r['decision_agreement']:.2%} |")
    return "\n".join(lines + report_footer(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_bench_arguments(p, ROOT / "benchmarks" / "results", warmup=2,
                               quick_help="tiny smoke setting: batch 1 (2 images) and 4, 2 repeats")
    p.add_argument("--batch1-images", type=int, default=32, help="images timed one by one at batch 1")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    keep_heap_memory()  # as the skipviz command does: stable CPU timings (skipviz._allocator)
    if args.quick:
        args.batch_sizes, args.batch1_images, args.repeats, args.warmup = [1, 4], 2, 2, 1
    report = run(args)
    jp, mp = write_results(report, args.out, f"fold_bn_{report['environment']['device_type']}", markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
