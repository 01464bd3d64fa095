"""Where the time of a batch-1 early-exit check goes, inside real runs of the shipped ImageNet model.

An exit check after a block is a probe head (the map's channel sums, a linear layer to 1,000 classes) and a
confidence (softmax, maximum, comparison, a read-back). Timed alone on warm caches it takes 20-40 us; inside a
run it costs several times that. This benchmark times, one photo at a time, the plain forward and runs of the
engine that add one piece of the check at a time after each of the card's exit blocks, and lets no input leave
(every block runs, so each run's extra time over the forward is the engine's and the checks'):

* ``engine, no checks``: ``SkipNetwork.run`` with an early-exit policy that checks nowhere (the per-block policy
  work and records);
* ``map sums``: the channel sums of the probe's input only;
* ``probe logits``: the probe head (sums and the linear layer);
* ``probe + confidence on the host``: the engine's batch-1 check (``ProbeHead.confidence_of_one``);
* ``probe + confidence as tensors``: the batched path at batch 1 (softmax, maximum, comparison, ``any``, one
  read-back), as every check ran before the host path;
* ``10-class probe + confidence on the host``: the same check with a probe of 10 classes in place of 1,000 (its
  weight 100 times smaller), separating the weight's read from the operations' fixed costs.

Each photo goes through every variant back to back in every round, the order rotating
(``skipviz.measure.clock.measure_per_input``); the extra time is the median over photos and rounds of each
variant's time minus the plain forward's on the same photo in the same round. Writes
``benchmarks/results/exit_check_breakdown_cpu.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/exit_check_breakdown.py
    python benchmarks/exit_check_breakdown.py --quick --out /tmp/checks   # smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import create_model, keep_heap_memory  # noqa: E402
from skipviz.cli.bench import write_results  # noqa: E402
from skipviz.cli.bench_common import engine_bench_report, held_out_or_exit, report_footer, report_header  # noqa: E402
from skipviz.engine.heads import ProbeHead  # noqa: E402
from skipviz.engine.network import SkipNetwork  # noqa: E402
from skipviz.measure.clock import measure_per_input  # noqa: E402
from skipviz.policies import EarlyExitPolicy  # noqa: E402


class _Piece(EarlyExitPolicy):
    """Checks after ``blocks`` and computes one piece of an exit check there; no input ever leaves."""

    def __init__(self, blocks: list[int], piece: str, small: dict[int, ProbeHead] | None = None) -> None:
        super().__init__(0.9, blocks=blocks)
        self.piece, self.small = piece, small or {}

    def exit_after(self, net: SkipNetwork, index: int, h: torch.Tensor):
        if self.piece == "none" or not self.exits_possible_after(net, index):
            return None
        probe = self.small.get(index) or net.probe(index)
        if self.piece == "sums":
            sums = h.sum((2, 3))
            return False, sums, 0.0
        if self.piece == "logits":
            return False, probe(h), 0.0
        if self.piece == "host":
            logits, top = probe.confidence_of_one(h)
            return False, logits, top
        logits = probe(h)  # "tensors": the batched path at batch 1
        conf = torch.softmax(logits, dim=1).amax(1)
        leave = conf >= 2.0
        bool(leave.any())
        return leave, logits, conf


#: variant -> (piece, small probes)
VARIANTS = {"engine, no checks": ("none", False), "map sums": ("sums", False), "probe logits": ("logits", False),
            "probe + confidence on the host": ("host", False),
            "probe + confidence as tensors": ("tensors", False),
            "10-class probe + confidence on the host": ("host", True)}


def _small_probes(net: SkipNetwork, blocks: list[int]) -> dict[int, ProbeHead]:
    """A 10-class probe in place of each checked block's probe (its first ten classes' weights)."""
    out = {}
    for b in blocks:
        big = net.probe(b)
        small = ProbeHead(big.fc.in_features, 10).eval()
        with torch.no_grad():
            small.fc.weight.copy_(big.fc.weight[:10])
            small.fc.bias.copy_(big.fc.bias[:10])
        out[b] = small
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    net = create_model(args.model).eval()
    blocks = sorted(net.meta.source_options("early_exit").get("blocks") or [])
    if not blocks:
        raise SystemExit(f"{args.model}: its card lists no exit blocks")
    x, inputs_label = held_out_or_exit(net.meta, args.images)
    small = _small_probes(net, blocks)
    photos = [x[i:i + 1] for i in range(len(x))]

    def caller(policy: EarlyExitPolicy | None):
        if policy is None:
            return lambda i: net(photos[i])
        return lambda i: net.run(photos[i], policy)

    fns = {"forward": caller(None)}
    for name, (piece, tiny) in VARIANTS.items():
        fns[name] = caller(_Piece(blocks, piece, small if tiny else None))
    with torch.inference_mode():
        # photo by photo: each photo through every variant back to back (pairs about 12 ms apart; calls of every
        # photo at once, 0.1 s, left differences of +-0.6 ms per photo on this machine)
        times = measure_per_input(fns, len(photos), rounds=args.repeats, warmup=args.warmup)
    base = times["forward"].ravel()
    rows = [{"variant": "forward", "ms": 1e3 * float(np.median(base)), "extra_us": 0.0, "extra_q25_us": 0.0,
             "extra_q75_us": 0.0, "per_check_us": 0.0}]
    for name in VARIANTS:
        extra = (times[name].ravel() - base) * 1e6
        q25, med, q75 = (float(v) for v in np.percentile(extra, [25, 50, 75]))
        ms = 1e3 * float(np.median(times[name]))
        rows.append({"variant": name, "ms": ms, "extra_us": med, "extra_q25_us": q25,
                     "extra_q75_us": q75, "per_check_us": med / len(blocks)})
        print(f"{name}: {ms:.3f} ms, +{med:.0f} us per photo", flush=True)
    settings = {"model": args.model, "blocks": blocks, "images": len(photos), "repeats": args.repeats,
                "warmup": args.warmup}
    return engine_bench_report(f"{args.model} (trained weights)", inputs_label, settings,
                               "exit_check_breakdown.py", "skipviz.measure.clock.measure_per_input: each photo "
                               "through the plain forward and every variant back to back, the order rotating; extra = "
                               "median over photos and rounds of the variant's time minus the forward's on the same "
                               "photo in the same round", rows)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = report_header("Where a batch-1 exit check's time goes", report,
                          f"checks after blocks {', '.join(map(str, s['blocks']))}, no input leaves") + [
        "| run | ms per photo | extra over the forward, us (quartiles) | per check, us |", "|---|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r['extra_us']:.0f} ({r['extra_q25_us']:.0f} to "
                     f"{r['extra_q75_us']:.0f}) | {r['per_check_us']:.0f} |")
    return "\n".join(lines + report_footer(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0.imagenet_gated")
    p.add_argument("--images", type=int, default=8, help="held-out photos, each through every variant per round")
    p.add_argument("--repeats", type=int, default=50, help="rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny smoke setting: 2 photos, 3 repeats")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    keep_heap_memory()  # as the skipviz command does: stable CPU timings (skipviz._allocator)
    if args.quick:
        args.images, args.repeats, args.warmup = 2, 3, 1
    report = run(args)
    jp, mp = write_results(report, args.out, f"exit_check_breakdown_{report['environment']['device_type']}",
                           markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
