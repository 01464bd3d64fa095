"""Memory layout: the engine's channels-last layout against NCHW, full and skipped runs, same process.

``SkipNetwork.memory_format`` is channels-last: the model's convolution weights are converted once and inputs
are laid out at the stem. This benchmark backs that choice: for the default model at batch 1, 64 and 256 it
times the plain full network and the skipped run (one gate threshold) with

* ``nchw``: weights and input NCHW (what the engine did before);
* ``channels_last``: weights and input channels-last (what the engine does).

Timing is ``skipviz.measure.clock.measure_interleaved`` (the four callables round-robin, so both layouts see the same
machine load); figures are medians over rounds (ms per batch). Writes ``benchmarks/results/memory_format_<device>.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/bench_memory_format.py
    python benchmarks/bench_memory_format.py --quick --inputs random --out /tmp/mf   # smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import GatePolicy  # noqa: E402
from skipviz.engine.network import SkipNetwork  # noqa: E402
from skipviz.cli.bench import BenchConfig, bench_inputs, load_bench_model, write_results
from skipviz.cli.bench_common import (add_engine_bench_arguments, engine_bench_report, report_footer, report_header,
                                      time_engine_variants)
from skipviz import keep_heap_memory

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _in_layout(net: SkipNetwork, fmt: torch.memory_format) -> SkipNetwork:
    """``net`` with its weights in ``fmt`` and its stem laying inputs out as ``fmt`` (an instance attribute
    shadows the class's ``memory_format``)."""
    net.to(memory_format=fmt)
    net.memory_format = fmt
    return net


def _caller(net: SkipNetwork, x: torch.Tensor, policy: GatePolicy | None):
    """A callable running ``x`` once: the full network (``policy`` None) or the skipped run."""
    return (lambda: net(x)) if policy is None else (lambda: net.run(x, policy))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = BenchConfig(model=args.model, inputs=args.inputs, seed=0)
    nets = {}
    for name, fmt in LAYOUTS.items():
        net, model_label = load_bench_model(cfg)
        nets[name] = _in_layout(net.eval(), fmt)
    x_all, inputs_label = bench_inputs(nets["nchw"], cfg, max(args.batch_sizes))
    policy = GatePolicy(args.threshold)
    rows = []
    with torch.inference_mode():
        for bs in args.batch_sizes:
            x = x_all[:bs]
            fns = {f"{name}/{kind}": _caller(net, x.contiguous(memory_format=LAYOUTS[name]),
                                             policy if kind == "skipped" else None)
                   for name, net in nets.items() for kind in ("full", "skipped")}
            repeats = args.rounds if bs > 1 else args.rounds * 10
            row = time_engine_variants(fns, bs, 1, args.warmup, repeats, "nchw", "channels_last", "channels_last")
            row["rounds"] = repeats
            rows.append(row)
            print(f"batch {bs:4d}: full {row['nchw_full_ms']:.2f} -> {row['channels_last_full_ms']:.2f} ms, skipped "
                  f"{row['nchw_skipped_ms']:.2f} -> {row['channels_last_skipped_ms']:.2f} ms (NCHW -> channels-last)",
                  flush=True)
    settings = {"batch_sizes": args.batch_sizes, "threshold": args.threshold, "rounds": args.rounds,
                "warmup": args.warmup}
    return engine_bench_report(model_label, inputs_label, settings, "bench_memory_format.py",
                               "skipviz.measure.clock.measure_interleaved: the two layouts' full and skipped runs "
                               "round-robin, medians over rounds; batch 1 runs 10x the rounds", rows)


def markdown(report: dict) -> str:
    lines = report_header("Memory layout", report,
                          f"skipped run at gate threshold {report['settings']['threshold']:.2f}") + [
             "| batch | full NCHW ms | full channels-last ms | speedup | skipped NCHW ms | skipped channels-last ms "
             "| speedup |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch_size']} | {r['nchw_full_ms']:.2f} | {r['channels_last_full_ms']:.2f} | "
                     f"{r['full_channels_last_speedup']:.2f}x | {r['nchw_skipped_ms']:.2f} | "
                     f"{r['channels_last_skipped_ms']:.2f} | {r['skipped_channels_last_speedup']:.2f}x |")
    return "\n".join(lines + report_footer(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_bench_arguments(p, ROOT / "benchmarks" / "results", warmup=3,
                               quick_help="tiny smoke setting: batch 1 and 4, 1 round")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    keep_heap_memory()  # as the skipviz command does: stable CPU timings (skipviz._allocator)
    if args.quick:
        args.batch_sizes, args.rounds, args.warmup = [1, 4], 1, 1
    report = run(args)
    jp, mp = write_results(report, args.out, f"memory_format_{report['environment']['device_type']}", markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
