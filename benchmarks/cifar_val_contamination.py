"""Is the CIFAR-10 validation split (carved from ``train/``) a fair stand-in for ``test/``? The public ResNet-56 the
gated default starts from was trained on all 50,000 original CIFAR-10 training images, so it has seen every
validation image in its original form. This measures that: the public checkpoint and the shipped gated network's
full run on the card's validation split and on ``test/``, and the gates at the card's fast point on both.

Accuracy only (no timing): it can share the CPU. Writes ``benchmarks/results/cifar_val_contamination.{json,md}``.

    . .venv/bin/activate
    python benchmarks/cifar_val_contamination.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import CIFAR_MODEL, FullPolicy, create_model, policy_for  # noqa: E402
from skipviz.data import cifar10_root, load_split, load_validation_subset  # noqa: E402
from skipviz.evaluate import evaluate_policy  # noqa: E402
from skipviz.measure.clock import cpu_name, software_versions  # noqa: E402
from skipviz.models.cifar_import import akamaster_file, import_cifar_resnet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=CIFAR_MODEL)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    root, public = cifar10_root(), akamaster_file(56)
    if root is None or public is None:
        raise SystemExit("needs ../shared/datasets/cifar10 and ../shared/weights/cifar10-resnet-akamaster "
                         "(SKIPVIZ_CIFAR10, SKIPVIZ_AKAMASTER)")
    gated = create_model(args.model).eval()
    validation = gated.meta.card_validation_split()
    val = load_validation_subset(root, validation, int(validation["n"])) if validation else None
    if val is None:
        raise SystemExit(f"{args.model}: its card's validation split cannot be rebuilt from {root}/train")
    test = load_split(root, "test", progress=False)
    out_dir = Path(args.out)
    weights, card = import_cifar_resnet(public, out_dir / "_public_resnet56.safetensors")
    reference = create_model(card["arch"], weights=weights).eval()
    weights.unlink()
    weights.with_suffix(".json").unlink()
    fast = gated.meta.operating_point("fast", "gates")
    rows = []
    for label, net, policy in (("public ResNet-56 (trained on the original train images)", reference, FullPolicy()),
                               (f"{args.model}, full", gated, FullPolicy()),
                               (f"{args.model}, gates at the fast point {fast:g}", gated,
                                policy_for(gated, "gates", fast))):
        acc = {name: evaluate_policy(net, data, policy, batch_size=500).accuracy
               for name, data in (("validation", val), ("test", test))}
        rows.append({"network": label, "validation": acc["validation"], "test": acc["test"],
                     "gap_points": 100 * (acc["validation"] - acc["test"])})
        print(rows[-1], flush=True)
    report = {"model": args.model, "validation_n": len(val), "test_n": len(test), "rows": rows,
              "cpu": cpu_name(), "software": software_versions(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/cifar_val_contamination.py"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cifar_val_contamination.json").write_text(json.dumps(report, indent=1))
    lines = [f"# CIFAR-10: the validation split carved from `train/` against `test/` ({args.model})", "",
             f"Measured {report['date']} on {report['cpu']} (accuracy only, no timing). `{report['command']}`", "",
             f"Validation: the card's split ({len(val)} images of `train/`); test: `test/` ({len(test)} images).", "",
             "| network | validation | test | gap (points) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['network']} | {r['validation']:.2%} | {r['test']:.2%} | {r['gap_points']:+.1f} |" for r in rows]
    lines += ["", "The public checkpoint was trained on every original CIFAR-10 training image, so the validation "
              "images (their JPEG copies) are not unseen for it or for anything fine-tuned from it: accuracy and "
              "accuracy drops measured there are optimistic for `test/`.", ""]
    (out_dir / "cifar_val_contamination.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
