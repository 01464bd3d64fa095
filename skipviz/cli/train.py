"""``skipviz train`` (a gated CIFAR ResNet, joint training; or, with ``--model timm:<name>``, decision heads
distilled from a user's frozen timm network), ``skipviz finetune`` (a published CIFAR ResNet fine-tuned into a
gated network that agrees with its own full network), ``skipviz train-plan`` (a plan head distilled from the
gates) and ``skipviz train-heads`` (heads distilled over a frozen published backbone)."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..training.distill import DistillConfig, distill_heads
from ..training.distill_export import HeadsExportConfig, export_heads
from ..training.export import export
from ..training.finetune import FinetuneConfig, finetune
from ..training.finetune_export import FinetuneExportConfig, export_finetuned
from ..training.joint import TrainConfig, train
from ..training.plan import PlanConfig, export_plan

__all__ = ["add_cli", "cmd_finetune", "cmd_train", "cmd_train_heads", "cmd_train_plan"]

#: ``skipviz train``'s schedule for a CIFAR ResNet (with ``--model``, DistillConfig's defaults apply)
CIFAR_DEFAULTS = {"epochs": 15, "target_rate": 0.4, "batch_size": 128, "lr": 0.1}


def _or(value, default):
    return default if value is None else value


def cmd_train(args: argparse.Namespace) -> int:
    if args.model:
        return _train_user_model(args)
    cfg = TrainConfig(arch=args.arch, epochs=_or(args.epochs, CIFAR_DEFAULTS["epochs"]), seed=args.seed,
                      target_rate=_or(args.target_rate, CIFAR_DEFAULTS["target_rate"]),
                      batch_size=_or(args.batch_size, CIFAR_DEFAULTS["batch_size"]),
                      lr=_or(args.lr, CIFAR_DEFAULTS["lr"]), data_root=args.data,
                      out_dir=args.out or f"runs/{args.arch}", limit_train=args.limit_train)
    run_dir = train(cfg)
    if args.export:
        path, card = export(cfg, run_dir, dest=Path(args.dest) if args.dest else None)
        m = card["metrics_test"]
        print(f"wrote {path}: full {m['full_accuracy']:.2%}, gated {m['gated_accuracy']:.2%} at threshold "
              f"{m['gated_threshold']}, {m['gated_flops_saved_fraction']:.1%} FLOPs saved")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune (or resume) a public CIFAR ResNet with gates, then optionally export weights + card."""
    cfg = FinetuneConfig(arch=args.arch, init=args.init, data_root=args.data, epochs=args.epochs, seed=args.seed,
                         target_rate=args.target_rate, out_dir=args.out or f"runs/{args.arch}_gated",
                         threads=args.threads, autocast_bf16=args.bf16, limit_train=args.limit_train,
                         batch_size=args.batch_size, val_size=args.val_size)
    run_dir = finetune(cfg)
    if args.export:
        path, card = export_finetuned(FinetuneExportConfig(run_dir=str(run_dir)),
                                      dest=Path(args.dest) if args.dest else None)
        m = card["metrics_test"]
        print(f"wrote {path}: full {m['full_accuracy']:.2%} on test/")
        for name, point in card["operating_points"]["gates"].items():
            print(f"  {name} (gates {point['threshold']}): {point['accuracy']:.2%}, "
                  f"{point['flops_saved_fraction']:.1%} FLOPs saved, agreement {point['agreement_with_full']:.2%}")
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


def _user_model_config(args: argparse.Namespace) -> DistillConfig:
    """``skipviz train --model timm:<name> --weights PATH --data FOLDER``: the distillation run it starts."""
    if not args.model.startswith("timm:"):
        raise SystemExit(f"--model {args.model}: only timm models (timm:<name>) are trained this way; CIFAR ResNets "
                         "take --arch")
    if not args.weights or not args.data:
        raise SystemExit("--model needs --weights (your trained network's file) and --data (a folder of images: an "
                         "ImageFolder with train/ [and val/], or any folder; class folders are optional)")
    kwargs = json.loads(args.timm_kwargs) if args.timm_kwargs else {}
    if not isinstance(kwargs, dict):
        raise SystemExit("--timm-kwargs must be a JSON object")
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.input_size is not None:
        kwargs["input_size"] = args.input_size
    if args.classes_from_folders:
        root = Path(args.data) / "train" if (Path(args.data) / "train").is_dir() else Path(args.data)
        kwargs["classes"] = sorted(p.name for p in root.iterdir() if p.is_dir())  # ImageFolder's class order
    d = DistillConfig()
    safe = args.model.replace(":", "_").replace("/", "_")
    return DistillConfig(model=args.model, weights=args.weights, model_kwargs=kwargs, data_root=args.data,
                         out_dir=args.out or f"runs/{safe}_heads",
                         epochs=_or(args.epochs, _default_epochs(Path(args.data), args.val_fraction)), seed=args.seed,
                         target_rate=_or(args.target_rate, d.target_rate), batch_size=_or(args.batch_size, d.batch_size),
                         lr=_or(args.lr, d.lr), limit_train=args.limit_train, val_fraction=args.val_fraction,
                         monitor_size=min(d.monitor_size, 200), threads=args.threads, autocast_bf16=not args.float32)


#: with --model, the heads see about this many training images (epochs x images), 6 to 20 epochs
USER_MODEL_IMAGES_SEEN = 16_000


def _default_epochs(data: Path, val_fraction: float) -> int:
    """Epochs for a user's folder: 6 (as for Imagenette's 8,469 images), more for a small folder so that the
    heads see about :data:`USER_MODEL_IMAGES_SEEN` images, at most 20 (1,000 images: 20 epochs)."""
    from ..data import IMAGE_SUFFIXES

    root = data / "train" if (data / "train").is_dir() else data
    n = sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    n_train = max(1, int(n * (1 - val_fraction)))
    return int(min(20, max(DistillConfig.epochs, -(-USER_MODEL_IMAGES_SEEN // n_train))))


def _train_user_model(args: argparse.Namespace) -> int:
    run_dir = distill_heads(_user_model_config(args))
    if args.export:
        _export_and_report(run_dir, args, USER_MODEL_EXPORT)
    return 0


#: The export of heads for a user's network (``skipviz train --model timm:...``): the early exits' curves measured
#: at 5 thresholds instead of the shipped default's 10 (each threshold is a run of the validation and the test
#: split; a lighter search kept the 1,000-image ``timm:resnet18`` run at 11.4 min end to end instead of 15.6,
#: benchmarks/timm_heads_time.py, AMD EPYC, 2 threads, before the exits' blocks were chosen by simulation).
USER_MODEL_EXPORT = HeadsExportConfig(exit_thresholds=(0.8, 0.85, 0.9, 0.95, 0.98))


def _export_and_report(run_dir: Path, args: argparse.Namespace,
                       cfg: HeadsExportConfig = HeadsExportConfig()) -> None:
    """Export a distillation run (heads + card) with ``cfg`` and print its operating points (test, else
    validation)."""
    path, card = export_heads(replace(cfg, run_dir=str(run_dir)), dest=Path(args.dest) if args.dest else None,
                              data_root=args.data)
    for name, point in card["operating_points"]["gates"].items():
        where = "test" if point["test"] is not None else "validation"
        t = point[where]
        if t is None:
            print(f"{name}: no threshold met its bound on validation")
            continue
        drop = (f"{where} accuracy {t['accuracy']:.2%} (drop {t['accuracy_drop_points']:.2f} points), "
                if card["metrics_validation"]["full_accuracy"] is not None else "")
        print(f"{name} (gates {point['threshold']}): {drop}{t['flops_saved_fraction']:.1%} FLOPs saved, agreement "
              f"{t['agreement_with_full']:.2%}")
    print(f"wrote {path}")


def cmd_train_heads(args: argparse.Namespace) -> int:
    default_out = f"runs/{args.arch}_{'tuned_heads' if args.backbone_lr > 0 else 'heads'}"
    cfg = DistillConfig(arch=args.arch, data_root=args.data, out_dir=args.out or default_out,
                        epochs=args.epochs, seed=args.seed, target_rate=args.target_rate, limit_train=args.limit_train,
                        autocast_bf16=not args.float32, extra_images=args.extra_images, extra_limit=args.extra_limit,
                        threads=args.threads, backbone_lr=args.backbone_lr, full_kl_weight=args.full_kl_weight)
    run_dir = distill_heads(cfg)
    if args.export:
        _export_and_report(run_dir, args)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``skipviz train``, ``finetune``, ``train-plan`` and ``train-heads`` to the ``skipviz`` command."""
    _add_train(sub)
    _add_finetune(sub)
    _add_train_plan(sub)
    _add_train_heads(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a gated CIFAR ResNet, or (--model timm:NAME --weights PATH --data "
                                     "FOLDER) gate, probe and plan heads for your own frozen timm network (resumable)")
    t.add_argument("--arch", default="cifar_resnet20")
    t.add_argument("--epochs", type=int, default=None, help="default 15 (CIFAR); with --model 6, or up to 20 for "
                                                            "a small folder (about 16,000 images seen)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--target-rate", type=float, default=None,
                   help="fraction of the gated FLOPs executed on average (default 0.4 CIFAR, 0.65 --model)")
    t.add_argument("--batch-size", type=int, default=None, help="default 128 (CIFAR), 64 (--model)")
    t.add_argument("--lr", type=float, default=None, help="default 0.1 (CIFAR), 0.002 (--model, AdamW on the heads)")
    t.add_argument("--data", default=None, help="ImageFolder root (default: $SKIPVIZ_CIFAR10 or ../shared); with "
                                                "--model: your images (train/ [val/], or any folder)")
    t.add_argument("--out", default=None, help="run folder (default runs/ARCH, runs/timm_NAME_heads)")
    t.add_argument("--limit-train", type=int, default=None, help="use only this many training images")
    t.add_argument("--export", action="store_true", help="evaluate and write weights + model card to data/")
    t.add_argument("--dest", default=None, help="export folder (default data/)")
    u = t.add_argument_group("your own network (distilled heads over its frozen backbone)")
    u.add_argument("--model", default=None, help="timm:NAME (a timm ResNet, EfficientNet/MobileNet, ConvNeXt or ViT)")
    u.add_argument("--weights", default=None, help="your network's weights (.safetensors or weights-only torch file)")
    u.add_argument("--num-classes", type=int, default=None, help="classifier size (default: read from --weights)")
    u.add_argument("--classes-from-folders", action="store_true",
                   help="the class names are the data's folder names in sorted order (how ImageFolder trained it)")
    u.add_argument("--input-size", type=int, default=None, help="input side in pixels (default: timm's)")
    u.add_argument("--timm-kwargs", default=None, help="timm model arguments as JSON, e.g. '{\"drop_rate\": 0.1}'")
    u.add_argument("--val-fraction", type=float, default=0.2, help="validation split carved from the training images")
    u.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    u.add_argument("--float32", action="store_true", help="train in float32 instead of bfloat16 autocast")
    t.set_defaults(func=cmd_train)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("finetune", help="fine-tune a public CIFAR ResNet checkpoint (akamaster) into a gated network: "
                                         "distillation from its own full network, FLOPs-rate loss (resumable)")
    f.add_argument("--arch", default="cifar_resnet56")
    f.add_argument("--init", default=None, help="the public .th checkpoint (default: the akamaster file of this "
                                                "depth under $SKIPVIZ_AKAMASTER or ../shared/weights)")
    f.add_argument("--epochs", type=int, default=FinetuneConfig.epochs)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--target-rate", type=float, default=FinetuneConfig.target_rate,
                   help="fraction of the gated blocks' FLOPs executed on average")
    f.add_argument("--data", default=None, help="ImageFolder root (default: $SKIPVIZ_CIFAR10 or ../shared)")
    f.add_argument("--out", default=None, help="run folder (default runs/ARCH_gated)")
    f.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    f.add_argument("--bf16", action="store_true", help="bfloat16 autocast (1.5x faster on an AVX-512 BF16 CPU, "
                                                       "benchmarks/results/train_speed_cpu.md)")
    f.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    f.add_argument("--val-size", type=int, default=FinetuneConfig.val_size,
                   help="validation images carved from train/ (the operating points are chosen on them)")
    f.add_argument("--limit-train", type=int, default=None, help="use only this many training images")
    f.add_argument("--export", action="store_true", help="evaluate, fit the plan head, write weights + card to data/")
    f.add_argument("--dest", default=None, help="export folder (default data/)")
    f.set_defaults(func=cmd_finetune)


def _add_train_plan(sub: argparse._SubParsersAction) -> None:
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


def _add_train_heads(sub: argparse._SubParsersAction) -> None:
    th = sub.add_parser("train-heads", help="train gate, probe and plan heads over a frozen published backbone "
                                            "(EfficientNet-Lite0) by distillation from its full network, or with "
                                            "--backbone-lr a fine-tuned copy with its heads (resumable)")
    th.add_argument("--arch", default="efficientnet_lite0")
    th.add_argument("--epochs", type=int, default=DistillConfig.epochs)
    th.add_argument("--seed", type=int, default=0)
    th.add_argument("--target-rate", type=float, default=DistillConfig.target_rate,
                    help="fraction of the gated blocks' FLOPs executed on average")
    th.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: $SKIPVIZ_IMAGENETTE "
                                                 "or ../shared/datasets/imagenette)")
    th.add_argument("--out", default=None, help="run folder (default runs/ARCH_heads, with --backbone-lr "
                                                "runs/ARCH_tuned_heads)")
    th.add_argument("--limit-train", type=int, default=None, help="use only this many training images")
    th.add_argument("--extra-images", default=None,
                    help="a folder of more images to distil on (searched recursively; labels not used), added to "
                         "the training split only, e.g. photos of classes beyond Imagenette's ten")
    th.add_argument("--extra-limit", type=int, default=None, help="a seeded choice of this many extra images")
    th.add_argument("--backbone-lr", type=float, default=0.0,
                    help="fine-tune a copy of the backbone jointly with the heads at this learning rate (AdamW, "
                         "BatchNorm statistics frozen); exported as ARCH.imagenet_tuned_gated, measured against the "
                         "published network. Default 0: the backbone stays the published one")
    th.add_argument("--full-kl-weight", type=float, default=DistillConfig.full_kl_weight,
                    help="with --backbone-lr: weight of KL(published || fine-tuned full run)")
    th.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    th.add_argument("--float32", action="store_true", help="train in float32 instead of bfloat16 autocast")
    th.add_argument("--export", action="store_true", help="fit the plan head, evaluate, write the heads (with "
                                                          "--backbone-lr the whole network) + card to data/")
    th.add_argument("--dest", default=None, help="export folder (default data/)")
    th.set_defaults(func=cmd_train_heads)
