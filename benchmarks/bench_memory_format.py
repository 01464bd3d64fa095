"""Memory layout: the engine's channels-last layout against NCHW, full and skipped runs, same process.

``SkipNetwork.memory_format`` is channels-last: the model's convolution weights are converted once and inputs
are laid out at the stem. This benchmark backs that choice: for the default model at batch 1, 64 and 256 it
times the plain full network and the skipped run (one gate threshold) with

* ``nchw``: weights and input NCHW (what the engine did before);
* ``channels_last``: weights and input channels-last (what the engine does).

Rounds interleave the layouts so both see the same machine load; figures are medians over rounds (ms per
batch). Writes ``benchmarks/results/memory_format_<device>.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/bench_memory_format.py
    python benchmarks/bench_memory_format.py --quick --inputs random --out /tmp/mf   # smoke run
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import GatePolicy  # noqa: E402
from skipviz.network import SkipNetwork  # noqa: E402
from skipviz.timing import (BenchConfig, add_engine_bench_arguments, bench_inputs, device_info,  # noqa: E402
                            keep_heap_memory, load_bench_model, report_header, write_results)

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _in_layout(net: SkipNetwork, fmt: torch.memory_format) -> SkipNetwork:
    """``net`` with its weights in ``fmt`` and its stem laying inputs out as ``fmt`` (an instance attribute
    shadows the class's ``memory_format``)."""
    net.to(memory_format=fmt)
    net.memory_format = fmt
    return net


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
            inputs = {name: x.contiguous(memory_format=fmt) for name, fmt in LAYOUTS.items()}
            times: dict[str, list[float]] = {f"{n}/{k}": [] for n in LAYOUTS for k in ("full", "skipped")}
            for _ in range(args.warmup):
                for name, net in nets.items():
                    net(inputs[name])
                    net.run(inputs[name], policy)
            rounds = args.rounds if bs > 1 else args.rounds * 10
            for _ in range(rounds):
                for name, net in nets.items():
                    t0 = time.perf_counter()
                    net(inputs[name])
                    t1 = time.perf_counter()
                    net.run(inputs[name], policy)
                    t2 = time.perf_counter()
                    times[f"{name}/full"].append(1e3 * (t1 - t0))
                    times[f"{name}/skipped"].append(1e3 * (t2 - t1))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"batch_size": bs, "rounds": rounds, **{f"{k.replace('/', '_')}_ms": v for k, v in med.items()}}
            for kind in ("full", "skipped"):
                row[f"{kind}_channels_last_speedup"] = med[f"nchw/{kind}"] / med[f"channels_last/{kind}"]
            rows.append(row)
            print(f"batch {bs:4d}: full {med['nchw/full']:.2f} -> {med['channels_last/full']:.2f} ms, skipped "
                  f"{med['nchw/skipped']:.2f} -> {med['channels_last/skipped']:.2f} ms (NCHW -> channels-last)",
                  flush=True)
    return {"model": model_label, "inputs": inputs_label, "environment": device_info("cpu").to_dict(),
            "settings": {"batch_sizes": args.batch_sizes, "threshold": args.threshold, "rounds": args.rounds,
                         "warmup": args.warmup},
            "command": "python benchmarks/bench_memory_format.py " + shlex.join(sys.argv[1:]),
            "method": "rounds interleave the two layouts (full then skipped run for each); medians over rounds; "
                      "batch 1 runs 10x the rounds",
            "rows": rows}


def markdown(report: dict) -> str:
    lines = report_header("Memory layout", report,
                          f"skipped run at gate threshold {report['settings']['threshold']:.2f}") + [
             "| batch | full NCHW ms | full channels-last ms | speedup | skipped NCHW ms | skipped channels-last ms "
             "| speedup |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch_size']} | {r['nchw_full_ms']:.2f} | {r['channels_last_full_ms']:.2f} | "
                     f"{r['full_channels_last_speedup']:.2f}x | {r['nchw_skipped_ms']:.2f} | "
                     f"{r['channels_last_skipped_ms']:.2f} | {r['skipped_channels_last_speedup']:.2f}x |")
    lines += ["", "ms per batch. " + report["method"] + ".", "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


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
