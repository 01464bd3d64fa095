"""Latency benchmark: full vs. really skipped vs. masked (compute-all) runs of a gated network.

For the default model (``skipviz.CIFAR_MODEL`` when its weights are in data/, else a random-init
cifar_resnet20 with randomised gates, labelled as such) at several gate thresholds and batch sizes, measures
full latency, skipped latency, masked latency, time saved, FLOPs saved and efficiency = time saved / FLOPs
saved, plus the gate heads' share of FLOPs and latency and the error of the per-block latency prediction.
Writes ``latency_<device>.json`` (device, versions, date, settings, every figure) and ``latency_<device>.md``.

    python benchmarks/bench_latency.py                       # recorded settings -> benchmarks/results/
    python benchmarks/bench_latency.py --quick --out /tmp/b  # smoke test, seconds
    python benchmarks/bench_latency.py --device cuda --batch-sizes 1,256 --thresholds 0.3,0.5,0.7
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from skipviz.cli.bench import add_bench_arguments, cmd_bench  # noqa: E402
from skipviz import keep_heap_memory  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_latency", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    keep_heap_memory()  # as the skipviz command does: stable CPU timings (skipviz._allocator)
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
