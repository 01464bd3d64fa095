"""Batch-1 efficiency on real photos against the same decisions replayed for free: how much of the gap to 1.0 is
the decision (gate heads, plan head, per-block policy work) and how much the architecture.

For each image of a held-out sample the model's policy (gates, plan or early exits, at the card default or at a
named operating point of the card) decides which blocks run. Three runs per image, each a batch of one: the full network (``FullPolicy``), the policy itself, and a
``FrozenPolicy`` replaying that image's own decisions (the same blocks skipped, no head evaluated, no policy
work: the free-decision ceiling; for an early exit, the blocks up to the exit and the one probe that answers). Per round every image goes through the three runs back to back, their order
rotating between images and rounds (``skipviz.measure.clock.measure_per_input``: pairs milliseconds apart, where
timing every image of one run before the next run's left the machine's drift in the ratios); efficiency =
time-saved fraction / FLOPs-saved fraction over the sample (heads counted as spent for the policy, not for the
replay), median of the per-round ratios with the quartiles. Writes ``benchmarks/results/batch1_decision_ceiling_<model>_cpu.json`` and
``.md``.

    . .venv/bin/activate
    python benchmarks/batch1_decision_ceiling.py --model efficientnet_lite0.imagenet_tuned_gated --n 32 --rounds 15
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import FullPolicy, create_model, keep_heap_memory  # noqa: E402
from skipviz.cli.bench import write_results  # noqa: E402
from skipviz.cli.bench_common import held_out_or_exit, report_header  # noqa: E402
from skipviz.measure.clock import device_info, measure_per_input  # noqa: E402
from skipviz.policies import DECISION_SOURCES, describe_policy, policy_for  # noqa: E402
from skipviz.policies.simple import FrozenPolicy  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.set_grad_enabled(False)
    net = create_model(args.model).eval()
    x, inputs = held_out_or_exit(net.meta, args.n)
    rows = []
    for source, point in [(s, p) for s in args.sources for p in args.points]:
        if not DECISION_SOURCES[source].offered_by(net):
            continue
        if point == "default":
            t = net.meta.default_threshold(source)
        elif point in net.meta.operating_points(source):
            t = net.meta.operating_point(point, source)
        else:
            continue
        policy = policy_for(net, source, t)
        res = net.run(x, policy)
        full_flops = float(net.run(x, FullPolicy()).flops_executed().double().sum())
        saved = 1.0 - float(res.flops_executed().double().sum()) / full_flops
        singles = [x[i:i + 1].contiguous() for i in range(x.shape[0])]

        full_policy = FullPolicy()
        # an exit is replayed as the blocks up to it and the one probe it answers from (no other probe evaluated)
        exits = res.exit_block
        replays = [FrozenPolicy(res.executed[i].tolist(), exits[i]) for i in range(len(x))]
        replay_flops = sum(float(net.run(x[i:i + 1], replays[i]).flops_executed().double().sum())
                           for i in range(x.shape[0]))
        saved_replay = 1.0 - replay_flops / full_flops
        runs = {"full": lambda i: net.run(singles[i], full_policy), "policy": lambda i: net.run(singles[i], policy),
                "replay": lambda i: net.run(singles[i], replays[i])}
        # photo by photo: each photo's three runs back to back (skipviz.measure.clock.measure_per_input)
        times = measure_per_input(runs, len(singles), rounds=args.rounds, warmup=1)
        # per round: the sample's time (sum over its photos) in ms
        tf, tp = (1e3 * times[k].sum(1) for k in ("full", "policy"))
        # the policy's time over the full run's, photo by photo (a default that skips nothing has no efficiency)
        extra = 1e3 * (times["policy"] - times["full"]).ravel()
        row = {"source": source, "point": point, "policy": describe_policy(policy), "threshold": t,
               "flops_saved": saved, "full_ms": float(np.median(tf)) / len(singles),
               "policy_ms": float(np.median(tp)) / len(singles),
               "policy_minus_full_ms": float(np.median(extra)), "policy_minus_full_iqr": _quartiles(extra),
               **_efficiency("policy", tf, tp, saved)}
        tr = 1e3 * times["replay"].sum(1)
        row.update(flops_saved_replay=saved_replay, replay_ms=float(np.median(tr)) / len(singles),
                   **_efficiency("replay", tf, tr, saved_replay))
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return {"model": args.model, "inputs": inputs, "environment": device_info("cpu").to_dict(), "rounds": args.rounds,
            "rows": rows, "command": "python benchmarks/batch1_decision_ceiling.py " + shlex.join(sys.argv[1:]),
            "method": __doc__.split("\n\n", 1)[1].split("Writes", 1)[0].replace("\n", " ").strip()}


def _quartiles(v) -> list[float]:
    q = statistics.quantiles([float(a) for a in v], n=4, method="inclusive")
    return [q[0], q[2]]


def _efficiency(name: str, full, skipped, saved: float) -> dict:
    """``efficiency_<name>`` (median of the per-round ratios of time saved to FLOPs ``saved``) and its quartiles;
    ``None`` when nothing is saved."""
    if saved <= 0:
        return {f"efficiency_{name}": None, f"efficiency_{name}_iqr": None}
    eff = [(1 - s / f) / saved for f, s in zip(full, skipped)]
    return {f"efficiency_{name}": statistics.median(eff), f"efficiency_{name}_iqr": _quartiles(eff)}


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _eff(v: float | None, iqr: list[float] | None) -> str:
    return "n/a" if v is None else f"{v:.2f} ({iqr[0]:.2f}-{iqr[1]:.2f})"


def _extra(r: dict) -> str:
    if r.get("policy_minus_full_ms") is None:  # results recorded before this column
        return "n/a"
    lo, hi = r["policy_minus_full_iqr"]
    return f"{r['policy_minus_full_ms']:+.3f} ({lo:+.2f} to {hi:+.2f})"


def markdown(report: dict) -> str:
    lines = report_header("Batch 1: the policy against its own decisions replayed for free", report,
                          f"{report['rounds']} interleaved rounds") + [
        "| policy | card's point | FLOPs saved | full ms | policy ms | policy - full, ms per photo (IQR) | replay ms | "
        "efficiency, policy (IQR) | efficiency, free replay (IQR) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        name = r.get("policy", f"{r['source']}, threshold {r['threshold']:g}")
        lines.append(f"| {name} | {r.get('point', 'default')} | {r['flops_saved']:.1%} | {r['full_ms']:.2f} | "
                     f"{r['policy_ms']:.2f} | {_extra(r)} | {_ms(r['replay_ms'])} | "
                     f"{_eff(r['efficiency_policy'], r['efficiency_policy_iqr'])} | "
                     f"{_eff(r['efficiency_replay'], r['efficiency_replay_iqr'])} |")
    lines += ["", "ms per image (median over rounds). " + report["method"], "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0.imagenet_tuned_gated")
    p.add_argument("--sources", nargs="+", default=["gates", "plan"], choices=sorted(DECISION_SOURCES))
    p.add_argument("--points", nargs="+", default=["default"], choices=["default", "fast", "faithful"],
                   help="thresholds: the card's default for each source and/or its named operating points")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    keep_heap_memory()
    report = run(args)
    jp, mp = write_results(report, args.out, f"batch1_decision_ceiling_{args.model.split('.')[0]}_"
                           f"{args.model.split('.')[-1]}_{report['environment']['device_type']}", markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
