"""Interleaved A/B of a wrapped timm model's full forward against timm's own forward (issue 21): does wrapping
a timm network as a skippable network cost anything when nothing is skipped?

Method: one process, one model at a time, random init (timing does not depend on the weights), inputs
``torch.randn`` (seed 0) at the model's input size. Three ways to compute the same logits (checked equal bit for
bit before timing): ``timm`` = timm's ``model(x)``; ``forward`` = ``SkipNetwork.forward`` of the wrapper (the
same modules); ``run`` = ``SkipNetwork.run(x, FullPolicy())`` (the policy loop with its per-block records). Each
round times every (way, batch size) once, the order of the three ways rotating from round to round; batch 1 =
``--batch1-calls`` back-to-back calls (ms per call), batch 32 = ``--batch32-calls`` calls. The result per
setting is the median over rounds of the per-round ratio wrapped / timm (drifts of the machine cancel within a
round) with its quartiles, and each way's median time. The load average and the CPU model are recorded,
because the machine may be shared.

    python benchmarks/timm_wrap_ab.py --rounds 15 --threads 2
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import FullPolicy, create_model, keep_heap_memory  # noqa: E402
from skipviz.measure.clock import cpu_name  # noqa: E402

MODELS = ("resnet18", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224")
WAYS = ("timm", "forward", "run")


def quartiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def time_calls(fn, x: torch.Tensor, calls: int) -> float:
    """ms per call of ``fn(x)`` over ``calls`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) * 1e3 / calls


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    net = create_model(f"timm:{name}")
    model = net.timm_model
    policy = FullPolicy()
    ways = {"timm": model, "forward": net, "run": lambda x: net.run(x, policy)}
    size = net.meta.input_size
    inputs = {bs: torch.randn(bs, *size, generator=torch.Generator().manual_seed(0)) for bs in (1, 32)}
    calls = {1: args.batch1_calls, 32: args.batch32_calls}
    with torch.inference_mode():
        for bs, x in inputs.items():
            ref = model(x)
            assert torch.equal(net(x), ref) and torch.equal(net.run(x, policy).logits, ref), f"{name}: not equal"
            for fn in (model, net):  # warm-up
                fn(x)
        times: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            order = WAYS[r % 3:] + WAYS[: r % 3]
            for bs, x in inputs.items():
                for way in order:
                    times.setdefault((way, bs), []).append(time_calls(ways[way], x, calls[bs]))
    rows = []
    for bs in (1, 32):
        base = times[("timm", bs)]
        for way in ("forward", "run"):
            mine = times[(way, bs)]
            q25, med, q75 = quartiles([m / b for m, b in zip(mine, base)])
            rows.append({"model": name, "batch": bs, "way": way, "timm_ms": statistics.median(base),
                         "wrapped_ms": statistics.median(mine), "ratio_wrapped_over_timm": med, "ratio_q25": q25,
                         "ratio_q75": q75, "timm_times_ms": base, "wrapped_times_ms": mine,
                         "input_size": list(size), "blocks": net.num_blocks,
                         "bypassable_blocks": sum(b.bypassable for b in net.blocks)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch1-calls", type=int, default=10)
    p.add_argument("--batch32-calls", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--machine-note", default="")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_heap_memory()
    load_start = os.getloadavg()
    t0 = time.time()
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args)
        print(f"{name} done ({time.time() - t0:.0f} s, load {os.getloadavg()})", flush=True)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "timm": __import__("timm").__version__,
              "python": platform.python_version(), "threads": args.threads, "rounds": args.rounds,
              "batch1_calls": args.batch1_calls, "batch32_calls": args.batch32_calls,
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "seconds": time.time() - t0, "machine_note": args.machine_note, "rows": rows,
              "method": " ".join(__doc__.split("\n\n")[1].split()).removeprefix("Method: ")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timm_wrap_ab_cpu.json").write_text(json.dumps(report, indent=1))
    la0, la1 = load_start, report["load_average_end"]
    lines = ["# timm wrapper A/B (issue 21): the wrapped full forward against timm's own", "",
             f"{report['date']}; CPU {report['cpu']} ({os.cpu_count()} cores); torch {torch.__version__}, timm "
             f"{report['timm']}; {args.threads} thread(s); {args.rounds} interleaved rounds; random init, "
             "randn inputs at each model's input size.", "",
             f"Load average (1, 5, 15 min) at the start {la0[0]:.2f}, {la0[1]:.2f}, {la0[2]:.2f}; at the end "
             f"{la1[0]:.2f}, {la1[1]:.2f}, {la1[2]:.2f}. {args.machine_note}", "",
             "| model | batch | wrapped way | timm ms | wrapped ms | wrapped / timm (median of per-round ratios) | "
             "IQR of the ratio |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['way']} | {r['timm_ms']:.2f} | {r['wrapped_ms']:.2f} | "
                     f"{r['ratio_wrapped_over_timm']:.3f} | {r['ratio_q25']:.3f}-{r['ratio_q75']:.3f} |")
    lines += ["", "ms per call (batch 1: one image per call; batch 32: one batch per call). `forward` = "
              "`SkipNetwork.forward`, `run` = `SkipNetwork.run(x, FullPolicy())`; both give timm's logits bit "
              "for bit (checked before timing).", "", "Method: " + report["method"], ""]
    (out / "timm_wrap_ab_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
