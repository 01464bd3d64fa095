"""Accuracy against compute of a shipped model, recomputed from its weights on the held-out split its card
reports on (CIFAR-10 ``test/`` for the CIFAR model, Imagenette ``val/`` 1000-way for the ImageNet model).

    python benchmarks/bench_default_model.py [--model cifar_resnet20.cifar10_gated] [--limit N] [--out DIR]
    python benchmarks/bench_default_model.py --model efficientnet_lite0.imagenet_gated --thresholds 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 --exits 0.8 0.95

Prints and writes (``benchmarks/results/default_model.{json,md}``, for another model
``benchmarks/results/<model>.{json,md}``): the full network's accuracy, the gated
network at the model card's default threshold (accuracy, drop, FLOPs cut, blocks run), the whole gate curve
(threshold -> accuracy, FLOPs cut), the plan head's curve when the model carries one (every gated block
decided at the stem, ``PlanPolicy``), the early-exit curve, mean blocks executed for correct vs wrong
predictions and per class. Runs in a few minutes on 2 CPU cores.

A copy fine-tuned from a published network (its card's ``backbone.fine_tuned``, e.g.
``efficientnet_lite0.imagenet_tuned_gated``) is judged as its card judges it: agreement and accuracy drop
against the published network's full run (``--reference``, default: the family's frozen-backbone model
``<arch>`` with its published weights), its own full run reported beside it.

    python benchmarks/bench_default_model.py --model efficientnet_lite0.imagenet_tuned_gated --thresholds 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 --exits 0.8 0.95
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skipviz import CIFAR_MODEL, FullPolicy, PlanPolicy, create_model, policy_for  # noqa: E402
from skipviz.evaluate.calibration import load_card_test_set  # noqa: E402
from skipviz.evaluate import blocks_by_outcome, evaluate_policy, threshold_curve  # noqa: E402
from skipviz.measure.clock import software_versions  # noqa: E402


def run(model: str, limit: int | None, out_dir: Path, thresholds: list[float], exits: list[float],
        reference: str | None = None) -> dict:
    net = create_model(model)
    published = reference is None and bool((net.meta.card.get("backbone") or {}).get("fine_tuned"))
    if published:
        reference = net.meta.arch  # the architecture with its published weights (heads untrained: unused by full)
    try:
        test, split_name = load_card_test_set(net)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    if limit:
        test = test.subset(np.random.default_rng(0).permutation(len(test))[:limit])
    default_t = net.meta.default_threshold("gates")
    if default_t not in thresholds:
        thresholds = sorted(thresholds + [default_t])
    own_full = evaluate_policy(net, test, FullPolicy(), progress=True)
    full = own_full if reference is None else evaluate_policy(create_model(reference), test, FullPolicy(), progress=True)
    curve, evals = threshold_curve(net, test, thresholds, reference=full, progress=True)
    gated = evals[thresholds.index(default_t)]
    # the exits after the card's exit blocks (early_exit.blocks), as the card's exit curve and the dashboard run them
    exit_curve = (threshold_curve(net, test, exits, make_policy=lambda t: policy_for(net, "early_exit", t),
                                  reference=full, progress=True)[0] if net.probes is not None else pd.DataFrame())
    plan_section: list[str] = []
    plan_result = None
    if net.plan_head is not None:
        plan_t = net.meta.default_threshold("plan")
        plan_ts = sorted(set(thresholds) | {plan_t})
        plan_curve, plan_evals = threshold_curve(net, test, plan_ts, make_policy=PlanPolicy, reference=full,
                                                 progress=True)
        planned = plan_evals[plan_ts.index(plan_t)]
        plan_result = {"default_threshold": plan_t, "at_default": planned.summary(full),
                       "curve": plan_curve.to_dict(orient="records")}
        plan_section = ["## Plan threshold curve (plan head at the stem, every gated block decided up front)", "",
                        f"At the plan's default threshold {plan_t}: **{planned.accuracy:.2%}** (drop "
                        f"{100 * (full.accuracy - planned.accuracy):.2f} points), "
                        f"**{planned.flops_saved_fraction:.1%}** of FLOPs skipped (plan head counted), agreement "
                        f"with full {planned.agreement(full):.2%}.",
                        "", plan_curve.to_markdown(index=False, floatfmt=".4f"), ""]
    outcome, per_class = blocks_by_outcome(gated, net.meta.classes)
    result = {
        "model": model, "weights_sha256": net.meta.weights_sha256, "test_split": split_name, "test_images": len(test),
        "test_files_sha256": test.files_sha256, "device": "cpu", "threads": torch.get_num_threads(),
        "software": software_versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "full_accuracy": full.accuracy, "reference": reference,
        "own_full": ({"accuracy": own_full.accuracy, "agreement_with_reference": own_full.agreement(full)}
                     if reference else None),
        "default_threshold": default_t, "gated": gated.summary(full),
        "blocks_mean_correct": outcome["correct"], "blocks_mean_wrong": outcome["wrong"],
        "gate_curve": curve.to_dict(orient="records"), "plan": plan_result,
        "early_exit_curve": exit_curve.to_dict(orient="records"),
        "per_class": per_class.to_dict(orient="records"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "default_model" if model == CIFAR_MODEL else model.replace(".", "_")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = [f"# `{model}` on {split_name} ({len(test)} JPEG images, {len(net.meta.classes)}-way top-1)", "",
          f"Model `{model}` (weights sha256 `{(net.meta.weights_sha256 or '')[:16]}`), measured {result['date']} on CPU "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}.", "",
          (f"- Full network: **{full.accuracy:.2%}**" if reference is None else
           f"- Reference: the full network of `{reference}`{' (the published one)' if published else ''}: "
           f"**{full.accuracy:.2%}**; this "
           f"model's own full network **{own_full.accuracy:.2%}**, agreement with the reference "
           f"{own_full.agreement(full):.2%}. Drops and agreements below are against the reference."),
          f"- Gated at the default threshold {default_t}: **{gated.accuracy:.2%}** "
          f"(drop {100 * (full.accuracy - gated.accuracy):.2f} points), **{gated.flops_saved_fraction:.1%}** of FLOPs "
          f"skipped (gate heads counted), {gated.blocks_mean:.2f} of {net.num_blocks} blocks run, agreement with full "
          f"{gated.agreement(full):.2%}",
          f"- Mean blocks run: correct {outcome['correct']:.2f}, wrong {outcome['wrong']:.2f}", "",
          "## Gate threshold curve", "", curve.to_markdown(index=False, floatfmt=".4f"), "", *plan_section,
          "## Early-exit curve (probe heads)", "", exit_curve.to_markdown(index=False, floatfmt=".4f"), "",
          "## Per class at the default threshold", "", per_class.to_markdown(index=False, floatfmt=".3f"), ""]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=CIFAR_MODEL)
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of this many test images")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--thresholds", type=float, nargs="+", default=[round(t, 2) for t in np.linspace(0.1, 0.9, 9)])
    p.add_argument("--exits", type=float, nargs="+", default=[0.6, 0.8, 0.9, 0.99])
    p.add_argument("--reference", default=None, help="judge against this model's full network (default: a "
                                                     "fine-tuned copy against the published one, else the model's own)")
    args = p.parse_args(argv)
    run(args.model, args.limit, Path(args.out), list(args.thresholds), list(args.exits), args.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
