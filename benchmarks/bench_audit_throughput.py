"""Audit throughput: images/s of the skipped run against the plain full network on the same batches.

The audit issue's target: on CPU, for the default model, the skipped run processes at least
0.9 x (1 / fraction of FLOPs executed) times the images/s of the plain full network in the same batches
(``efficiency`` = measured speedup x fraction executed >= 0.9). The shadow run (the full network on every
input, for agreement) is paid separately, so images/s with it are reported too.

Method: ``skipviz.measure.runs.measure_throughput``. Each round times one pass of the full network and one of the
skipped run over all batches, back to back; images/s are medians over rounds and the speedup is the median of
the per-round ratios. Inputs are the first ``--n`` CIFAR-10 test images (random tensors when the data set is not
here, which the report says). Writes ``benchmarks/results/audit_throughput_<device>.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/bench_audit_throughput.py                  # default model, 1024 images, batch 32, 64, 128, 256
    python benchmarks/bench_audit_throughput.py --quick --inputs random --out /tmp/tp   # smoke run
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz.policies import THRESHOLD_POLICIES, policy_for  # noqa: E402
from skipviz.measure.runs import default_audit_batch_size, measure_throughput  # noqa: E402
from skipviz.cli.bench import BenchConfig, bench_inputs, load_bench_model, write_results
from skipviz.measure.clock import device_info
from skipviz import keep_heap_memory
from skipviz.cli.bench_common import report_header


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = BenchConfig(model=args.model, inputs=args.inputs, seed=0)
    net, model_label = load_bench_model(cfg)
    net.eval()
    try:
        policy_for(net, args.policy)  # a plan on a network without a plan head fails here, before any timing
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    x, inputs_label = bench_inputs(net, cfg, args.n)
    card_default = net.meta.default_threshold(args.policy)
    thresholds = args.thresholds or sorted({0.1, 0.5, 0.7, card_default})
    rows = []
    for bs in args.batch_sizes:
        for t in thresholds:
            r = measure_throughput(net, policy_for(net, args.policy, t), x, batch_size=bs, repeats=args.rounds)
            r["threshold"] = t
            rows.append(r)
            print(f"batch {bs:4d} threshold {t:.2f}: full {r['full_images_per_s']:7.1f} img/s, skipped "
                  f"{r['skip_images_per_s']:7.1f} img/s, speedup {r['speedup']:.2f} of ideal {r['ideal_speedup']:.2f}"
                  f" -> efficiency {r['efficiency']:.2f}", flush=True)
    return {"model": model_label, "policy": args.policy, "weights_sha256": net.meta.weights_sha256,
            "inputs": inputs_label,
            "environment": device_info("cpu").to_dict(),
            "settings": {"images": args.n, "batch_sizes": args.batch_sizes, "thresholds": thresholds,
                         "rounds": args.rounds},
            "card_default_threshold": card_default,
            "audit_default_batch_size": default_audit_batch_size(net),
            "command": "python benchmarks/bench_audit_throughput.py " + shlex.join(sys.argv[1:]),
            "method": "skipviz.measure.runs.measure_throughput: per round one full pass and one skipped pass over the "
                      "same batches, back to back, which goes first alternating; medians over rounds; speedup = "
                      "median of per-round ratios; IQR = quartiles of the per-round efficiencies",
            "rows": rows}


def markdown(report: dict) -> str:
    lines = report_header(f"Audit throughput, policy {report.get('policy', 'gates')}", report,
                          f"{report['settings']['rounds']} rounds") + [
             "| batch | threshold | FLOPs executed | full img/s | skipped img/s | with shadow img/s | speedup "
             "| ideal | efficiency (IQR) | target met |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|"]
    default, card = report.get("audit_default_batch_size"), report.get("card_default_threshold")
    for r in report["rows"]:
        mark = " (audit default)" if r["batch_size"] == default else ""
        tmark = " (card default)" if card is not None and abs(r["threshold"] - card) < 1e-9 else ""
        lines.append(f"| {r['batch_size']}{mark} | {r['threshold']:.2f}{tmark} | {r['flops_fraction_executed']:.1%} | "
                     f"{r['full_images_per_s']:.0f} | {r['skip_images_per_s']:.0f} | "
                     f"{r['skip_with_shadow_images_per_s']:.0f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                     f"{r['efficiency']:.2f} ({r['efficiency_quartiles'][0]:.2f}-{r['efficiency_quartiles'][1]:.2f}) | "
                     f"{'yes' if r['meets_target'] else 'no'} |")
    lines += ["", "efficiency = speedup x fraction of FLOPs executed (1.0: time saved exactly as FLOPs saved; "
              "target >= 0.9). " + report["method"] + ".", "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="registered model (default: the default model, else random init)")
    p.add_argument("--n", type=int, default=1024, help="number of input images")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="default: 0.1, 0.5, 0.7 and the model card's default threshold for the policy")
    p.add_argument("--policy", default="gates", choices=sorted(THRESHOLD_POLICIES),
                   help="gates, or plan (the plan head; writes audit_throughput_plan_<device>)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--inputs", default="auto", choices=["auto", "cifar10", "random"])
    p.add_argument("--quick", action="store_true", help="tiny smoke setting: 16 images, batch 8, 1 round")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    keep_heap_memory()  # as the skipviz command does: stable CPU timings (skipviz._allocator)
    if args.quick:
        args.n, args.batch_sizes, args.rounds = 16, [8], 1
    report = run(args)
    kind = "" if args.policy == "gates" else f"{args.policy}_"
    jp, mp = write_results(report, args.out, f"audit_throughput_{kind}{report['environment']['device_type']}", markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
