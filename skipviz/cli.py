"""The ``skipviz`` command: ``predict``, ``train``, ``audit`` (skipviz.audit) and ``bench`` (skipviz.timing)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def _load_model(name: str, weights: str | None):
    from . import create_model

    return create_model(name, weights=weights) if weights else create_model(name)


def add_policy_argument(parser: argparse.ArgumentParser) -> None:
    """``--policy gates|plan`` (skipviz predict, audit)."""
    from .policies import THRESHOLD_POLICIES

    parser.add_argument("--policy", default="gates", choices=sorted(THRESHOLD_POLICIES),
                        help="decisions from the per-block gates or the plan head at the stem (default: gates)")


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from . import DEFAULT_MODEL
    from ._checkpoint import CheckpointError
    from ._imageio import ImageLoadError, load_image
    from .policies import policy_for

    try:
        net = _load_model(args.model or DEFAULT_MODEL, args.weights)
        policy = policy_for(net, args.policy, args.threshold)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = 0
    for path in args.images:
        try:
            image, info = load_image(path)
        except ImageLoadError as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            status = 1
            continue
        with torch.no_grad():
            trace = net.run(net.meta.preprocess(image), policy).traces()[0]
        print(f"\n{path}  ({info.width}x{info.height} {info.format}, sha256 {info.sha256[:12]})")
        print(f"model {net.meta.display_name}, policy {policy.config()}")
        print(f"prediction: {trace.predicted_label} ({trace.confidence:.1%})")
        table = pd.DataFrame([{"block": b.name, "executed": "yes" if b.executed else "no",
                               "gate": "" if b.score is None else f"{b.score:.3f}", "reason": b.reason,
                               "MFLOPs": b.flops / 1e6} for b in trace.blocks])
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        print(f"blocks run {trace.blocks_executed}/{trace.blocks_total}; FLOPs {trace.flops_executed / 1e6:.2f}M of "
              f"{trace.flops_full / 1e6:.2f}M full: {trace.flops_saved_fraction:.1%} saved")
    return status


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, export, train

    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, seed=args.seed, target_rate=args.target_rate,
                      batch_size=args.batch_size, lr=args.lr, data_root=args.data,
                      out_dir=args.out or f"runs/{args.arch}", limit_train=args.limit_train)
    run_dir = train(cfg)
    if args.export:
        path, card = export(cfg, run_dir, dest=Path(args.dest) if args.dest else None)
        m = card["metrics_test"]
        print(f"wrote {path}: full {m['full_accuracy']:.2%}, gated {m['gated_accuracy']:.2%} at threshold "
              f"{m['gated_threshold']}, {m['gated_flops_saved_fraction']:.1%} FLOPs saved")
    return 0


def cmd_train_plan(args: argparse.Namespace) -> int:
    from .train import PlanConfig, export_plan

    cfg = PlanConfig(arch=args.arch, weights=args.weights, data_root=args.data, epochs=args.epochs, seed=args.seed,
                     teacher_threshold=args.teacher_threshold, limit_train=args.limit_train)
    path, card = export_plan(cfg, dest=Path(args.dest) if args.dest else None)
    plan = card["plan"]
    row = next(r for r in plan["curve_test"] if r["threshold"] == plan["default_threshold"])
    print(f"wrote {path}: plan policy at threshold {plan['default_threshold']}: test accuracy {row['accuracy']:.2%}, "
          f"{row['flops_saved_fraction']:.1%} FLOPs saved; validation decision agreement with the gates "
          f"{plan['validation']['val_decision_agreement']:.1%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipviz", description="Layer-skipping networks: run, inspect, audit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="classify images and show every block's decision")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=None, help="registered name (default: the embedded default model)")
    p.add_argument("--weights", default=None, help="a .safetensors or weights-only torch file")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold (default: the card's threshold for the chosen --policy)")
    add_policy_argument(p)
    p.set_defaults(func=cmd_predict)

    t = sub.add_parser("train", help="train a gated CIFAR ResNet (resumable)")
    t.add_argument("--arch", default="cifar_resnet20")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--target-rate", type=float, default=0.4)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--data", default=None, help="ImageFolder root (default: $SKIPVIZ_CIFAR10 or ../shared)")
    t.add_argument("--out", default=None, help="run folder (default runs/ARCH)")
    t.add_argument("--limit-train", type=int, default=None, help="use only this many training images")
    t.add_argument("--export", action="store_true", help="evaluate and write weights + model card to data/")
    t.add_argument("--dest", default=None, help="export folder (default data/)")
    t.set_defaults(func=cmd_train)

    tp = sub.add_parser("train-plan", help="train a plan head (every gated block decided up front) for a "
                                           "trained gated model, by distillation from its gates")
    tp.add_argument("--arch", default="cifar_resnet20")
    tp.add_argument("--weights", default=None, help="the gated model's .safetensors (default: data/)")
    tp.add_argument("--epochs", type=int, default=40)
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--teacher-threshold", type=float, default=0.5, help="gate threshold of the teacher run")
    tp.add_argument("--data", default=None, help="ImageFolder root (default: $SKIPVIZ_CIFAR10 or ../shared)")
    tp.add_argument("--limit-train", type=int, default=None, help="use only this many training images")
    tp.add_argument("--dest", default=None, help="output folder (default data/, the source file's name)")
    tp.set_defaults(func=cmd_train_plan)

    from . import audit, timing

    audit.add_cli(sub)
    timing.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import keep_heap_memory

    args = build_parser().parse_args(argv)
    keep_heap_memory()  # activations are not page-faulted in again on every batch (skipviz._allocator)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
