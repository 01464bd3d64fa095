"""``skipviz reprice-card`` and ``skipviz card-exits``: a shipped model card's decision points chosen again on
this machine, with what its decisions cost here (:mod:`skipviz.training.decision_points`). Run them on an idle
machine: both time the decisions."""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

__all__ = ["add_cli", "cmd_card_exits", "cmd_reprice_card"]


def _shipped_card(name: str):
    """The registry entry of a shipped model with its card beside it, or the command ends naming the ones there
    are."""
    from ..models._registry import list_pretrained

    pre = next((w for w in list_pretrained() if w.name == name), None)
    if pre is None or not pre.card_path.is_file():
        known = ", ".join(w.name for w in list_pretrained() if w.card_path.is_file())
        raise SystemExit(f"{name}: not a shipped model with a card here (shipped: {known})")
    return pre


def cmd_reprice_card(args: argparse.Namespace) -> int:
    import torch

    from ..models._registry import create_model
    from ..training.decision_points import reprice_decisions

    pre = _shipped_card(args.model)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    net = create_model(args.model).eval()
    if not net.gated_blocks or net.plan_head is None:
        raise SystemExit(f"{args.model}: its card has no gate and plan heads to price")
    try:
        card = reprice_decisions(net, pre.card_path)
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {pre.card_path}: {e}") from None
    for source, fields in (("gates", card["default_policy"]), ("plan", card["plan"])):
        cost = fields["time_model"]["decision_cost"]
        threshold = fields["threshold"] if source == "gates" else fields["default_threshold"]
        print(f"{source}: {cost['checks']} decision(s) per input at {cost['fraction']:.2%} of the run each "
              f"({cost['device']}); default threshold {threshold:g}")
    print(f"wrote {pre.card_path}")
    return 0


def _card_splits(card: dict, net, data: str | None):
    """``(validation, test, exit rules, reference network)`` a card's exits are chosen with: its own splits,
    rebuilt and checked against the file-list hashes it records, the rules of the export that wrote it, and the
    network its agreement is judged against (a fine-tuned copy: the published one). The command ends when the
    splits are not there."""
    from ..data import cifar10_root, imagenette_root, load_split, load_validation_subset
    from ..training.distill import DistillConfig, build_network, load_training_images, split_train_val, test_images
    from ..training.distill_export import HeadsExportConfig
    from ..training.exit_points import ExitPointsConfig
    from ..training.finetune_export import FinetuneExportConfig

    split = card.get("dataset") or {}
    recorded = ((split.get("validation") or {}).get("files_sha256"), (split.get("test") or {}).get("files_sha256"))
    if "backbone" in card:  # a distilled card (skipviz train-heads)
        dcfg = DistillConfig(**card["training"]["config"])
        root = data or dcfg.data_root or imagenette_root()
        val = split_train_val(dcfg, load_training_images(dcfg, net, root))[1] if root else None
        test = test_images(dcfg, net, root) if val is not None else None
        rules, reference = HeadsExportConfig().exit_config(), build_network(dcfg).eval() if dcfg.backbone_lr else net
    else:  # a CIFAR card (skipviz train / finetune)
        root, size = data or cifar10_root(), tuple(net.meta.input_size[-2:])
        n = int((split.get("validation") or {}).get("n", 0))
        val = load_validation_subset(root, split.get("validation"), n, size=size) if root else None
        test = load_split(root, "test", size=size) if val is not None else None
        rules, reference = ExitPointsConfig(max_drop_points=FinetuneExportConfig.max_drop_points), net
    if val is None or (val.files_sha256, test.files_sha256 if test is not None else None) != recorded:
        raise SystemExit(f"error: the card's validation and test splits are not in {root} (--data): its exits are "
                         "chosen on its own splits")
    return val, test, rules, reference


def cmd_card_exits(args: argparse.Namespace) -> int:
    import torch

    from ..measure.clock import software_versions
    from ..models._registry import create_model
    from ..training.decision_points import add_exit_points, default_source

    pre = _shipped_card(args.model)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    net = create_model(args.model).eval()
    card = json.loads(pre.card_path.read_text())
    if net.probes is None or "early_exit" in card:
        raise SystemExit(f"{args.model}: {'no probe heads' if net.probes is None else 'its card has exit points'}")
    val, test, rules, reference = _card_splits(card, net, args.data)
    card = add_exit_points(net, card, val, test, rules, reference=reference)
    if "backbone" in card:  # a distilled card recommends its source from its points (a CIFAR card: its profile)
        card["default_source"] = default_source(card["operating_points"])
    card["exits_added"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "software": software_versions(), "reproduce": f"skipviz card-exits --model {args.model}",
                           "what": "early_exit chosen on the card's validation split with the rules of the export "
                                   f"that wrote it (accuracy drop <= {rules.max_drop_points:g} points)"}
    pre.card_path.write_text(json.dumps(card, indent=2))
    for name, point in card["operating_points"]["early_exit"].items():
        print(f"{name}: threshold {point['threshold']} after blocks {point['blocks']}, "
              f"{point['test']['flops_saved_fraction']:.1%} of FLOPs cut on test" if point["test"] else
              f"{name}: no point ({point['rule'].rsplit('; ', 1)[-1]})")
    section = card["early_exit"]
    check = section.get("batch1_check")
    timed = f", timed at batch 1: {check['saved_fraction']:+.1%} of the full run saved" if check else ""
    print(f"default: {section['default_threshold']} after blocks {section['blocks'] or 'none'}{timed}; "
          f"wrote {pre.card_path}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``skipviz reprice-card`` and ``skipviz card-exits`` to the ``skipviz`` command."""
    rp = sub.add_parser("reprice-card", help="price a shipped card's gate and plan decisions on this machine: a "
                                             "distilled card's points are chosen again, a CIFAR card's defaults that "
                                             "save no time are set to 0 (run it on an idle machine)")
    rp.add_argument("--model", required=True, help="a shipped model with gate and plan heads")
    rp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    rp.set_defaults(func=cmd_reprice_card)
    ce = sub.add_parser("card-exits", help="choose the early exits of a shipped card written without them (the CIFAR "
                                           "cards, the fine-tuned ImageNet copy) on its own validation split, with "
                                           "a check's cost measured on this machine (run it on an idle machine)")
    ce.add_argument("--model", required=True, help="a shipped model with probe heads and no exit points")
    ce.add_argument("--data", default=None, help="the data set root its card was made on (default: $SKIPVIZ_CIFAR10 "
                                                 "or $SKIPVIZ_IMAGENETTE, else under ../shared/datasets)")
    ce.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ce.set_defaults(func=cmd_card_exits)
