"""Sub-batches for memory-bound blocks: EfficientNet-Lite's MBConv blocks at inference run a batch in sub-batches
whose expanded map stays within ``MBConvBlock.chunk_bytes`` (cache-sized), against the whole batch at once.

For an EfficientNet-Lite0 model on Imagenette val photos, at each batch size, four callables are timed
round-robin (``skipviz.measure.clock.measure_interleaved``, one call per round): the plain full network and the
skipped run (gates at the card default) of the engine with sub-batches (``chunked``) and of the same weights with
``chunk_bytes`` set beyond any batch (``whole``). Also the efficiency of skipping in each (time-saved fraction /
FLOPs-saved fraction of the skipped run against the full one, from the medians): what issue 18's batch-32 target
reads. Writes ``benchmarks/results/chunked_blocks_<device>.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/bench_chunked_blocks.py --model efficientnet_lite0.imagenet_tuned_gated --batch-sizes 1 16 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import FullPolicy, create_model, keep_heap_memory  # noqa: E402
from skipviz.cli.bench import write_results  # noqa: E402
from skipviz.cli.bench_common import (engine_bench_report, held_out_or_exit, report_footer, report_header,  # noqa: E402
                                      time_engine_variants)
from skipviz.models.efficientnet_lite import MBConvBlock  # noqa: E402
from skipviz.policies import policy_for  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    chunked = create_model(args.model).eval()
    whole = create_model(args.model).eval()
    for m in whole.modules():
        if isinstance(m, MBConvBlock):
            m.chunk_bytes = 1 << 62  # every batch in one piece
    x_all, inputs = held_out_or_exit(chunked.meta, max(args.batch_sizes))
    t = chunked.meta.default_threshold("gates")
    policy = policy_for(chunked, "gates", t)
    rows = []
    with torch.inference_mode():
        for bs in args.batch_sizes:
            x = x_all[:bs].contiguous(memory_format=torch.channels_last)
            saved = 1.0 - float(chunked.run(x, policy).flops_executed().double().sum()
                                / chunked.run(x, FullPolicy()).flops_executed().double().sum())
            fns = {}
            for name, net in (("whole", whole), ("chunked", chunked)):
                fns[f"{name}/full"] = lambda net=net: net(x)
                fns[f"{name}/skipped"] = lambda net=net: net.run(x, policy)
            repeats = args.rounds if bs > 1 else args.rounds * 5
            row = time_engine_variants(fns, bs, 1, args.warmup, repeats, "whole", "chunked", "chunked")
            row.update(rounds=repeats, flops_saved=saved)
            for name in ("whole", "chunked"):
                row[f"{name}_efficiency"] = (1 - row[f"{name}_skipped_ms"] / row[f"{name}_full_ms"]) / saved
            rows.append(row)
            print(f"batch {bs:3d}: full {row['whole_full_ms']:.1f} -> {row['chunked_full_ms']:.1f} ms, skipped "
                  f"{row['whole_skipped_ms']:.1f} -> {row['chunked_skipped_ms']:.1f} ms, efficiency "
                  f"{row['whole_efficiency']:.2f} -> {row['chunked_efficiency']:.2f}", flush=True)
    settings = {"batch_sizes": args.batch_sizes, "threshold": t, "rounds": args.rounds, "warmup": args.warmup,
                "chunk_bytes": MBConvBlock.chunk_bytes}
    return engine_bench_report(args.model, inputs, settings, "bench_chunked_blocks.py",
                               "skipviz.measure.clock.measure_interleaved: both variants' full and skipped runs "
                               "round-robin, medians over rounds; batch 1 runs 5x the rounds", rows)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = report_header("MBConv blocks in cache-sized sub-batches", report,
                          f"skipped run: gates at the card default {s['threshold']}; sub-batch budget "
                          f"{s['chunk_bytes'] >> 20} MiB") + [
        "| batch | FLOPs saved | full, whole ms | full, sub-batches ms | speedup | skipped, whole ms | skipped, "
        "sub-batches ms | speedup | efficiency, whole | efficiency, sub-batches |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch_size']} | {r['flops_saved']:.1%} | {r['whole_full_ms']:.1f} | "
                     f"{r['chunked_full_ms']:.1f} | {r['full_chunked_speedup']:.2f}x | {r['whole_skipped_ms']:.1f} | "
                     f"{r['chunked_skipped_ms']:.1f} | {r['skipped_chunked_speedup']:.2f}x | "
                     f"{r['whole_efficiency']:.2f} | {r['chunked_efficiency']:.2f} |")
    return "\n".join(lines + report_footer(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0.imagenet_tuned_gated")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    keep_heap_memory()
    report = run(args)
    jp, mp = write_results(report, args.out, f"chunked_blocks_{report['environment']['device_type']}", markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
