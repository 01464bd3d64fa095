"""``skipviz train`` (a gated CIFAR ResNet, joint training), ``skipviz train-plan`` (a plan head distilled
from the gates) and ``skipviz train-heads`` (heads distilled over a frozen published backbone)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..training.distill import DistillConfig, distill_heads
from ..training.distill_export import HeadsExportConfig, export_heads
from ..training.export import export
from ..training.joint import TrainConfig, train
from ..training.plan import PlanConfig, export_plan

__all__ = ["add_cli", "cmd_train", "cmd_train_heads", "cmd_train_plan"]


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


def cmd_train_heads(args: argparse.Namespace) -> int:
    cfg = DistillConfig(arch=args.arch, data_root=args.data, out_dir=args.out or f"runs/{args.arch}_heads",
                        epochs=args.epochs, seed=args.seed, target_rate=args.target_rate, limit_train=args.limit_train,
                        autocast_bf16=not args.float32)
    run_dir = distill_heads(cfg)
    if args.export:
        path, card = export_heads(HeadsExportConfig(run_dir=str(run_dir)), dest=Path(args.dest) if args.dest else None,
                                  data_root=args.data)
        for name, point in card["operating_points"]["gates"].items():
            t = point["test"]
            if t is None:
                print(f"{name}: no threshold met its bound on validation")
                continue
            print(f"{name} (gates {point['threshold']}): test accuracy {t['accuracy']:.2%} (drop "
                  f"{t['accuracy_drop_points']:.2f} points), {t['flops_saved_fraction']:.1%} FLOPs saved, agreement "
                  f"{t['agreement_with_full']:.2%}")
        print(f"wrote {path}")
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

    th = sub.add_parser("train-heads", help="train gate, probe and plan heads over a frozen published backbone "
                                            "(EfficientNet-Lite0) by distillation from its full network (resumable)")
    th.add_argument("--arch", default="efficientnet_lite0")
    th.add_argument("--epochs", type=int, default=DistillConfig.epochs)
    th.add_argument("--seed", type=int, default=0)
    th.add_argument("--target-rate", type=float, default=DistillConfig.target_rate,
                    help="fraction of the gated blocks' FLOPs executed on average")
    th.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: $SKIPVIZ_IMAGENETTE "
                                                 "or ../shared/datasets/imagenette)")
    th.add_argument("--out", default=None, help="run folder (default runs/ARCH_heads)")
    th.add_argument("--limit-train", type=int, default=None, help="use only this many training images")
    th.add_argument("--float32", action="store_true", help="train in float32 instead of bfloat16 autocast")
    th.add_argument("--export", action="store_true", help="fit the plan head, evaluate, write heads + card to data/")
    th.add_argument("--dest", default=None, help="export folder (default data/)")
    th.set_defaults(func=cmd_train_heads)
