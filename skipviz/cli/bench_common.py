"""What the benchmark scripts share (``benchmarks/*.py`` and :mod:`skipviz.cli.bench`): the Markdown lines
saying where a benchmark ran, the JSON of an engine-variant benchmark, its interleaved timing and its options."""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Callable, Mapping

from .._allocator import keep_heap_memory
from ..measure.clock import device_info, measure_interleaved

__all__ = ["add_engine_bench_arguments", "engine_bench_report", "environment_markdown", "held_out_or_exit",
           "keep_heap_memory", "report_footer", "report_header", "time_engine_variants"]


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def environment_markdown(env: dict) -> str:
    """One Markdown line saying where a benchmark ran (a :meth:`DeviceInfo.to_dict`)."""
    return (f"Device: **{env['device_type']}** ({env['device_name']}), {env['threads']} threads, {env['dtype']}; "
            f"torch {env['torch_version']}, torchvision {env['torchvision_version']}, Python "
            f"{env['python_version']}; {env['date']}; 1-min load average at the end {env['load_average_1min']}"
            + (f"; CPU allocator: {env['allocator']}." if env.get("allocator") else "."))


def report_header(title: str, report: dict, inputs_note: str) -> list[str]:
    """The first lines every benchmark's Markdown shares: ``# title: model``, where it ran, the inputs."""
    return [f"# {title}: {report['model']}", "", environment_markdown(report["environment"]),
            f"Inputs: {report['inputs']}; {inputs_note}.", ""]


def report_footer(report: dict) -> list[str]:
    """The last lines of an engine-variant benchmark's Markdown: units, method, the command that wrote it."""
    return ["", "ms per batch. " + report["method"] + ".", "", f"Command: `{report['command']}`", ""]


def engine_bench_report(model: str, inputs: str, settings: dict, script: str, method: str, rows: list) -> dict:
    """The JSON of an engine-variant benchmark (``benchmarks/bench_<script>.py``): model, inputs, where it ran,
    settings, the command line, the method and one row per batch size."""
    return {"model": model, "inputs": inputs, "environment": device_info("cpu").to_dict(), "settings": settings,
            "command": f"python benchmarks/{script} " + shlex.join(sys.argv[1:]), "method": method, "rows": rows}


def time_engine_variants(callers: Mapping[str, Callable[[], object]], batch_size: int, batches_per_call: int,
                         warmup: int, repeats: int, base: str, new: str, speedup: str) -> dict:
    """Time two engine variants of the full and the skipped run round-robin (:func:`measure_interleaved`, one
    call per repeat) and return one result row: ``<variant>_<kind>_ms`` and ``_iqr_ms`` (per batch) for every
    ``callers`` key ``"<variant>/<kind>"`` (kind ``full`` or ``skipped``), and ``<kind>_<speedup>_speedup`` =
    ``base`` time / ``new`` time."""
    stats = measure_interleaved(callers, warmup=warmup, repeats=repeats, device="cpu", batch_size=batch_size,
                                batches_per_call=batches_per_call, min_repeat_s=0.0, number=1)
    row: dict = {"batch_size": batch_size}
    for name, st in stats.items():
        key = name.replace("/", "_")
        row[f"{key}_ms"] = st.per_batch_ms
        row[f"{key}_iqr_ms"] = st.iqr_ms / st.batches_per_call
    for kind in ("full", "skipped"):
        row[f"{kind}_{speedup}_speedup"] = row[f"{base}_{kind}_ms"] / row[f"{new}_{kind}_ms"]
    return row


def add_engine_bench_arguments(p: argparse.ArgumentParser, out_dir: str | Path, warmup: int = 3,
                               quick_help: str = "tiny smoke setting") -> None:
    """The options shared by the engine-variant benchmarks (``bench_memory_format.py``, ``bench_fold_bn.py``):
    model, batch sizes, gate threshold of the skipped run, warm-up, threads, inputs, ``--quick``, output folder."""
    p.add_argument("--model", default=None, help="registered model (default: the default model, else random init)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--threshold", type=float, default=0.5, help="gate threshold of the skipped run")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--inputs", default="auto", choices=["auto", "cifar10", "random"])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=str(out_dir))


def held_out_or_exit(meta, n: int):
    """:func:`skipviz.data.held_out_images` for a benchmark script: ``((N, 3, H, W) batch, description)``, or the
    script ends with a one-line error naming where the data set is looked for."""
    from ..data import held_out_images

    try:
        return held_out_images(meta, n)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
