"""Do the decision heads keep the full network's answer on images unlike the ones they were distilled on?

The ImageNet default's heads (gates, probes, plan) were distilled on Imagenette ``train/`` only: ten ImageNet
classes. A user uploads any photo. This script measures, for each decision source, top-1 agreement with the same
model's full network and the FLOPs cut on three image sets:

* ``in-distribution``: a seeded sample of Imagenette ``val/`` (``$SKIPVIZ_IMAGENETTE``), the card's test split;
* ``CIFAR-10 upscaled``: a seeded sample of CIFAR-10 ``test/`` (``$SKIPVIZ_CIFAR10``), 32x32 photos of ten other
  object kinds (airplane ... truck) put through the model's own preprocessing (shorter side to 256, centre
  crop 224): blurry, and mostly classes the heads never saw;
* ``built-in samples``: the dashboard's sample images (:mod:`skipviz.samples`: scikit-image's photos and the
  drawn ones), one by one as the dashboard runs them.

Policies: the gates and the plan at the card's operating points, and early exits (probe confidence) at
``--exit-thresholds``. A copy fine-tuned from a published network (its card's ``backbone.fine_tuned``) is
judged against the published network's answers (``--reference``, default ``<arch>`` with its published weights),
its own full run listed as one more policy. Nothing is timed (agreement and FLOPs do not depend on the machine). Writes
``benchmarks/results/ood_agreement.{json,md}``.

    python benchmarks/ood_agreement.py [--model efficientnet_lite0.imagenet_gated] [--n 1000]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import DEFAULT_MODEL, create_model, load_image  # noqa: E402
from skipviz.data import TensorDataset, cifar10_root, imagenette_root, load_images  # noqa: E402
from skipviz.evaluate.loop import evaluate_policy  # noqa: E402
from skipviz.measure.clock import cpu_name, software_versions  # noqa: E402
from skipviz.policies import DECISION_SOURCES, EarlyExitPolicy, FullPolicy, describe_policy, policy_for  # noqa: E402
from skipviz.samples import sample_bytes, sample_names  # noqa: E402


def image_set(net, src: Path, n: int, seed: int) -> TensorDataset:
    """``n`` images of ``src`` (a seeded choice) decoded as the model's preprocessing crops them (uint8,
    (N, 3, H, W))."""
    return load_images(src, tuple(net.meta.input_size[-2:]), net.meta.resize, net.meta.classes, progress=False,
                       limit=n, seed=seed)


def policies(net, exit_thresholds: list[float], gate_thresholds: list[float] = (),
             card_points: bool = True) -> list[tuple[str, object]]:
    """(label, policy): each decision source at each operating point the card names (``card_points``), the gates
    at ``gate_thresholds``, then the exits."""
    out = []
    for source in DECISION_SOURCES if card_points else ():
        for point in net.meta.operating_point_records(source):
            policy = policy_for(net, source, point.threshold)  # the exits: after the card's exit blocks
            out.append((f"{source} {point.name} ({describe_policy(policy)})", policy))
    out += [(f"gates {t:g}", policy_for(net, "gates", t)) for t in gate_thresholds]
    if net.probes is not None:
        out += [(f"early exit >= {t:g} (from block 0)", EarlyExitPolicy(t)) for t in exit_thresholds]
    return out


def agreement_on_set(net, data: TensorDataset, pols, reference=None) -> list[dict]:
    """Per policy: top-1 agreement with the full run of ``reference`` (default ``net`` itself) and FLOPs cut."""
    full = evaluate_policy(reference or net, data, FullPolicy(), batch_size=100)
    return [{"policy": label, "agreement": ev.agreement(full), "flops_saved": ev.flops_saved_fraction}
            for label, pol in pols for ev in [evaluate_policy(net, data, pol, batch_size=100)]]


def agreement_on_samples(net, pols, reference=None) -> tuple[list[dict], list[dict]]:
    """Per policy: agreement over the built-in samples; and per sample, the full (``reference``'s, default
    ``net``'s) and each policy's top-1."""
    names, classes = sample_names(), net.meta.classes
    tops: dict[str, list[str]] = {"full": []}
    with torch.inference_mode():
        for name in names:
            x = net.meta.preprocess(load_image(sample_bytes(name))[0])  # (1, 3, H, W)
            tops["full"].append(classes[int((reference or net).run(x, FullPolicy()).logits.argmax(1))])
            for label, pol in pols:
                tops.setdefault(label, []).append(classes[int(net.run(x, pol).logits.argmax(1))])
    rows = [{"policy": label, "agreement": float(np.mean([a == b for a, b in zip(tops[label], tops["full"])])),
             "n": len(names)} for label, _ in pols]
    per_sample = [{"sample": n, **{k: v[i] for k, v in tops.items()}} for i, n in enumerate(names)]
    return rows, per_sample


def markdown(report: dict) -> str:
    lines = [f"# Agreement with the full network off the distillation data: `{report['model']}`", "",
             f"Measured {report['date']} on {report['cpu']} (CPU; nothing here depends on timing), torch "
             f"{report['software']['torch']}. `{report['command']}`", "",
             *([f"Agreement is with the full network of `{report['reference']}` (the published network).", ""]
               if report.get("reference") else []),
             "| policy | " + " | ".join(f"{s}: agreement | {s}: FLOPs cut" for s in report["sets"]) + " |",
             "|---|" + "---:|---:|" * len(report["sets"])]
    labels = [r["policy"] for r in next(iter(report["sets"].values()))]
    for i, label in enumerate(labels):
        cells = []
        for rows in report["sets"].values():
            cells += [f"{rows[i]['agreement']:.1%}", f"{rows[i]['flops_saved']:.1%}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Built-in samples ({len(report['samples_per_sample'])} images, the dashboard's picker), top-1 agreement "
              "with the full network:", "", "| policy | agreement |", "|---|---:|"]
    lines += [f"| {r['policy']} | {r['agreement']:.0%} |" for r in report["samples"]]
    cols = list(report["samples_per_sample"][0])
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in report["samples_per_sample"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=1000, help="images per data set (seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exit-thresholds", default="0.8,0.95,0.99")
    ap.add_argument("--gate-thresholds", default="", help="gate thresholds to check besides the card's points")
    ap.add_argument("--heads", default=None, help="a distillation run's last.pt: its gate and probe heads replace "
                                                   "the model's (a run not exported yet)")
    ap.add_argument("--reference", default=None, help="judge against this model's full network (default: a "
                                                      "fine-tuned copy against the published one, else the model's own)")
    ap.add_argument("--stem", default="ood_agreement", help="file name of the results (.json, .md)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net = create_model(args.model).eval()
    if args.heads:
        heads = torch.load(args.heads, map_location="cpu", weights_only=True)["heads"]
        from skipviz.engine.heads import HEAD_PREFIXES

        if not all(k.startswith(HEAD_PREFIXES) for k in heads):
            raise SystemExit(f"{args.heads}: a fine-tuned run (it holds backbone tensors too); export it and pass "
                             "--model ARCH.imagenet_tuned_gated, which is judged against the published network")
        missing, unexpected = net.load_state_dict(heads, strict=False)
        if unexpected or any(k.startswith(("gates.", "probes.")) for k in missing):
            raise SystemExit(f"{args.heads}: heads that do not fit {args.model}")
    floats = lambda text: [float(t) for t in text.split(",") if t.strip()]  # noqa: E731
    # the card's operating points belong to its own heads, not to a run's
    pols = policies(net, floats(args.exit_thresholds), floats(args.gate_thresholds), card_points=not args.heads)
    reference = args.reference
    if reference is None and (net.meta.card.get("backbone") or {}).get("fine_tuned"):
        reference = net.meta.arch  # the architecture with its published weights (full run: heads unused)
    ref_net = create_model(reference).eval() if reference else None
    if ref_net is not None:
        pols = [("full network (this model)", FullPolicy())] + pols
    sets = {}
    for label, root, split in (("in-distribution (Imagenette val)", imagenette_root(), "val"),
                               ("CIFAR-10 test upscaled", cifar10_root(), "test")):
        if root is None:
            print(f"skipping {label}: data set not found (set SKIPVIZ_IMAGENETTE / SKIPVIZ_CIFAR10)")
            continue
        sets[label] = agreement_on_set(net, image_set(net, Path(root) / split, args.n, args.seed), pols, ref_net)
        print(label, json.dumps(sets[label]), flush=True)
    samples, per_sample = agreement_on_samples(net, pols, ref_net)
    report = {"model": args.model + (f" + heads of {args.heads}" if args.heads else ""), "reference": reference,
              "n": args.n, "seed": args.seed, "cpu": cpu_name(),
              "software": software_versions(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "sets": sets, "samples": samples, "samples_per_sample": per_sample,
              "command": "python benchmarks/ood_agreement.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
