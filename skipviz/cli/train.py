"""``skipviz train`` (a gated CIFAR ResNet, joint training) and ``skipviz train-plan`` (a plan head distilled
from the gates)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..training.export import export
from ..training.joint import TrainConfig, train
from ..training.plan import PlanConfig, export_plan

__all__ = ["add_cli", "cmd_train", "cmd_train_plan"]


def cmd_train(args: argparse.Namespace) -> int:
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
    cfg = PlanConfig(arch=args.arch, weights=args.weights, data_root=args.data, epochs=args.epochs, seed=args.seed,
                     teacher_threshold=args.teacher_threshold, limit_train=args.limit_train)
    path, card = export_plan(cfg, dest=Path(args.dest) if args.dest else None)
    plan = card["plan"]
    row = next(r for r in plan["curve_test"] if r["threshold"] == plan["default_threshold"])
    print(f"wrote {path}: plan policy at threshold {plan['default_threshold']}: test accuracy {row['accuracy']:.2%}, "
          f"{row['flops_saved_fraction']:.1%} FLOPs saved; validation decision agreement with the gates "
          f"{plan['validation']['val_decision_agreement']:.1%}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``skipviz train`` and ``skipviz train-plan`` to the ``skipviz`` command."""
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
