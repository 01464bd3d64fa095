"""End-to-end audit throughput (reading, hashing, decoding, the skipped run, the shadow run, storing) against the
skipped pass alone, for each way the shadow run can be done.

Issue 19's target: the end-to-end audit reaches at least half the images/s of the skipped pass's benchmark
(``skipviz.measure.runs.measure_throughput`` on the same images and batch size). Modes, each a fresh run in a
fresh database unless said:

* ``every input`` - the shadow full network on every input (the default on a database that has not seen them);
* ``every input, reused`` - the same images audited again into the same database under another threshold: the
  full outputs kept by the first run are reused (what re-auditing a set while tuning a threshold costs);
* ``10 % checked`` - ``--shadow 10%``: the full network on the inputs whose SHA-256 falls in the first tenth.

Method: each round audits the same ``--n`` images (symbolic links, in a temporary folder, to the first CIFAR-10
`test/` files in sorted order, or for an ImageNet model to Imagenette `val/` photos spread over its classes) in every mode, the order of the modes rotating between rounds, and measures the
skipped pass alone on the already decoded images in the same round; medians over rounds. The ratio per round is
end-to-end img/s over the skipped pass's img/s of that round. Writes
``benchmarks/results/audit_end_to_end_<device>.json`` and ``.md``.

    . .venv/bin/activate
    python benchmarks/bench_audit_end_to_end.py --model cifar_resnet56.cifar10_gated --n 2000 --rounds 5
    python benchmarks/bench_audit_end_to_end.py --model efficientnet_lite0.imagenet_gated --n 512 --rounds 3

``--policy`` picks the decision source (default: the one the model card recommends, at the card's default
threshold; the "reused" mode's first audit runs the same source at another threshold). Results of a source other
than the gates go to ``audit_end_to_end_<model>_<source>_<device>``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import create_model, keep_heap_memory  # noqa: E402
from skipviz.audit import ShadowPlan, audit_items, collect_inputs  # noqa: E402
from skipviz.cli.bench import write_results  # noqa: E402
from skipviz.cli.bench_common import report_header  # noqa: E402
from skipviz.data import cifar10_root, held_out_files  # noqa: E402
from skipviz.measure.clock import device_info  # noqa: E402
from skipviz.measure.runs import default_audit_batch_size, measure_throughput  # noqa: E402
from skipviz.policies import offered_sources, policy_for  # noqa: E402

MODES = ("every input", "every input, reused", "10 % checked")


def _image_files(net, n: int) -> tuple[list[Path], str]:
    """The first ``n`` CIFAR-10 test images in sorted order, or for an ImageNet model ``n`` Imagenette val photos
    spread over its classes; and their description."""
    if net.meta.num_classes != 1000:
        base = cifar10_root()
        if base is None:
            raise SystemExit("error: CIFAR-10 not found (../shared/datasets/cifar10, or set SKIPVIZ_CIFAR10)")
        return sorted((base / "test").rglob("*.jpg"))[:n], f"the first {n} CIFAR-10 test images in sorted order"
    try:
        return held_out_files(1000, n)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def _link_images(files: list[Path], dest: Path) -> None:
    for i, f in enumerate(files):
        os.symlink(f, dest / f"{i:05d}_{f.parent.name}{f.suffix}")


def _audit(items, net, policy, db: Path, shadow: ShadowPlan, batch_size: int) -> float:
    t0 = time.perf_counter()
    run = audit_items(items, net, policy, db, batch_size=batch_size, latency_rounds=0, thumbnails=True,
                      shadow=shadow)
    wall = time.perf_counter() - t0
    assert len(run.ok_records) == len(items), "every input must be audited"
    return len(items) / wall


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    net = create_model(args.model).eval()
    source = args.policy or net.meta.default_source(offered_sources(net))
    policy = policy_for(net, source)
    threshold = net.meta.default_threshold(source)
    other = policy_for(net, source, 0.5 if abs(threshold - 0.5) > 1e-9 else 0.3)
    batch_size = args.batch_size or default_audit_batch_size(net)
    rows: dict[str, list[float]] = {m: [] for m in MODES}
    skip_rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        files, inputs = _image_files(net, args.n)
        _link_images(files, folder)
        items = collect_inputs([folder])
        x = torch.cat([net.meta.preprocess(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())])
        _audit(items[: 2 * batch_size], net, policy, Path(tmp) / "warm.sqlite", ShadowPlan(), batch_size)  # warm-up
        for r in range(args.rounds):
            order = MODES[r % 3:] + MODES[: r % 3]
            for mode in order:
                db = Path(tmp) / f"r{r}_{mode.replace(' ', '_').replace(',', '').replace('%', 'pc')}.sqlite"
                if mode == "every input":
                    rate = _audit(items, net, policy, db, ShadowPlan(1.0, reuse=False), batch_size)
                elif mode == "every input, reused":
                    _audit(items, net, other, db, ShadowPlan(), batch_size)  # keeps the full outputs (not timed)
                    rate = _audit(items, net, policy, db, ShadowPlan(), batch_size)
                else:
                    rate = _audit(items, net, policy, db, ShadowPlan(0.1, reuse=False), batch_size)
                rows[mode].append(rate)
                print(f"round {r + 1} {mode}: {rate:.0f} img/s", flush=True)
            tp = measure_throughput(net, policy, x, batch_size=batch_size, repeats=3)
            skip_rates.append(tp["skip_images_per_s"])
            print(f"round {r + 1} skipped pass alone: {tp['skip_images_per_s']:.0f} img/s", flush=True)
    table = []
    for mode in MODES:
        ratios = [a / s for a, s in zip(rows[mode], skip_rates)]
        table.append({"mode": mode, "images_per_s": statistics.median(rows[mode]),
                      "ratio_to_skipped_pass": statistics.median(ratios), "ratios": ratios, "rates": rows[mode]})
    return {"model": args.model, "weights_sha256": net.meta.weights_sha256, "source": source,
            "policy": policy.config(), "threshold": threshold, "inputs": inputs,
            "environment": device_info("cpu").to_dict(), "batch_size": batch_size, "rounds": args.rounds,
            "skipped_pass_images_per_s": statistics.median(skip_rates), "skipped_pass_rates": skip_rates,
            "rows": table, "command": "python benchmarks/bench_audit_end_to_end.py " + shlex.join(sys.argv[1:]),
            "method": __doc__.split("Method: ", 1)[1].split("Writes", 1)[0].replace("\n", " ").strip()}


def markdown(report: dict) -> str:
    words = {"gates": "gates", "plan": "the plan", "early_exit": "early exits"}[report.get("source", "gates")]
    lines = report_header(f"Audit end to end against the skipped pass at {words} {report['threshold']}", report,
                          f"batch {report['batch_size']}; {report['rounds']} rounds") + [
        f"Skipped pass alone (`measure_throughput`, same images and batch): "
        f"**{report['skipped_pass_images_per_s']:.0f} img/s** (median over rounds).", "",
        "| shadow run | end-to-end img/s | end to end / skipped pass | per round | target (>= 0.5) |",
        "|---|---:|---:|---|:---|"]
    for r in report["rows"]:
        lines.append(f"| {r['mode']} | {r['images_per_s']:.0f} | {r['ratio_to_skipped_pass']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in r['ratios'])} | "
                     f"{'met' if r['ratio_to_skipped_pass'] >= 0.5 else 'not met'} |")
    lines += ["", report["method"], "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar_resnet56.cifar10_gated")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--policy", choices=("gates", "plan", "early_exit"), default=None,
                   help="decision source (default: the card's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    keep_heap_memory()
    report = run(args)
    source = "" if report["source"] == "gates" else f"_{report['source']}"
    stem = f"audit_end_to_end_{report['model'].split('.')[0]}{source}_{report['environment']['device_type']}"
    jp, mp = write_results(report, args.out, stem, markdown)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
