"""Export of heads distilled over a frozen published backbone (:mod:`skipviz.training.distill`): the plan head
fitted from the trained gates, threshold curves, the fast and faithful operating points, and the model card.
A run that fine-tuned a copy of the backbone (``backbone_lr > 0``) ships whole (:data:`STORAGE_NOTE`) as
``<arch>.imagenet_tuned_gated``, its agreement and accuracy drops measured against the published network.

Operating points are chosen on the validation split carved from ``train/`` and reported on ``val/``:

* **fast**: the largest FLOPs cut (decision heads counted) whose top-1 accuracy drop against the published
  full network is at most ``max_drop_points``;
* **faithful**: the largest FLOPs cut whose top-1 agreement with the published full network is at least
  ``min_agreement`` at the lower end of its Wilson interval at ``faithful_margin_se`` standard errors
  (:func:`~skipviz.evaluate.agreement_meets`).

Both must also save batch-1 time as predicted with the decisions' measured cost
(:mod:`skipviz.training.decision_points`): a
gate decision costs time at every gated block whatever it decides, so a threshold that cuts fewer FLOPs than its
decisions cost is no operating point (the shipped EfficientNet-Lite0's nine gates cost 3 % of a batch-1 run,
against 1.3 % of FLOPs cut at the one threshold within a point of accuracy: the gates were measurably slower than
the full network). "fast" is the gates' (and the plan head's) default threshold; without one the default is 0,
at which no gate can close and none is evaluated: the full network.

For a user's network (``DistillConfig.model``, e.g. ``timm:resnet50``) the same evaluation runs on the user's
images: reported on ``val/`` when the folder has one (else on the validation split alone); when the images
carry no labels, accuracy cannot be measured and **fast** is the largest cut keeping at least
``unlabelled_fast_agreement`` top-1 agreement with the full network. The heads file carries its card in its
safetensors metadata too, so an uploaded copy opens on the dashboard without the ``.json`` beside it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models._registry import data_dir
from ..data import TensorDataset, imagenette_root
from ..engine.heads import PlanHead
from ..engine.network import SkipNetwork
from .distill import (DistillConfig, build_network, head_state, load_training_images, split_train_val, test_images,
                      with_extra_images)
from .decision_points import decision_costs, decision_defaults, default_source, exit_card_entries, threshold_points
from .exit_points import ExitPoints, ExitPointsConfig, exit_operating_points

__all__ = ["HeadsExportConfig", "STORAGE_NOTE", "export_heads"]


@dataclass
class HeadsExportConfig:
    run_dir: str = "runs/efficientnet_lite0_heads"
    # from 0.05: heads trained towards a low target rate already skip 10 % of the FLOPs at 0.1
    gate_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    plan_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    # early exits (skipviz.training.exit_points): thresholds tried on validation; the blocks exits are checked
    # after are chosen by the batch-1 time predicted with the cost of a check measured at the start of the export
    exit_thresholds: tuple[float, ...] = ExitPointsConfig.thresholds
    check_cost_inputs: int = 8  # seeded random inputs, timed one by one
    check_cost_rounds: int = 30  # paired rounds (skipviz.measure.profile.decision_cost), for exits, gates and plan
    max_drop_points: float = 1.0
    min_agreement: float = 0.99
    faithful_margin_se: float = ExitPointsConfig.faithful_margin_se  # skipviz.evaluate.agreement_meets
    plan_teacher_threshold: float = 0.5
    plan_epochs: int = 60
    batch_size: int = 100
    unlabelled_fast_agreement: float = 0.95  # images without labels: "fast" keeps this top-1 agreement

    def exit_config(self) -> ExitPointsConfig:
        """The rules the early exits are chosen by (:mod:`skipviz.training.exit_points`), from these settings."""
        return ExitPointsConfig(thresholds=tuple(self.exit_thresholds), max_drop_points=self.max_drop_points,
                                min_agreement=self.min_agreement, faithful_margin_se=self.faithful_margin_se,
                                batch_size=self.batch_size)


#: How a fine-tuned copy's tensors are stored (about 13 MB instead of 26 MB in float32).
STORAGE_NOTE = ("float16 storage of every floating-point tensor, loaded into a float32 network; every number in "
                "this card was measured on the rounded weights")


def _storage_state(net: SkipNetwork) -> dict[str, torch.Tensor]:
    """Every tensor of ``net``, floating-point ones as float16 (see :data:`STORAGE_NOTE`)."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in net.state_dict().items()}


@torch.no_grad()
def _round_to_storage(net: SkipNetwork) -> None:
    """Round ``net``'s floating-point tensors in place to what :func:`_storage_state` stores."""
    for v in net.state_dict().values():
        if v.is_floating_point():
            v.copy_(v.half().to(v.dtype))


def _fit_plan(net: SkipNetwork, train_set: TensorDataset, val_set: TensorDataset, cfg: HeadsExportConfig) -> dict:
    from .plan import PlanConfig, fit_plan_head, plan_targets

    torch.manual_seed(0)
    head = PlanHead(net.blocks[0].in_channels, net.gated_blocks, 4, 128)  # the stem's output channels
    tr_f, tr_t = plan_targets(net, head, train_set, cfg.plan_teacher_threshold, batch_size=cfg.batch_size)
    va_f, va_t = plan_targets(net, head, val_set, cfg.plan_teacher_threshold, batch_size=cfg.batch_size)
    pcfg = PlanConfig(arch=net.meta.arch, teacher_threshold=cfg.plan_teacher_threshold, epochs=cfg.plan_epochs,
                      batch_size=256, hidden=128, grid=4)
    losses = fit_plan_head(head, tr_f, tr_t, pcfg)
    with torch.no_grad():
        va_logits = head.mlp(va_f)
        fit = {"val_bce": float(F.binary_cross_entropy_with_logits(va_logits, va_t)),
               "val_decision_agreement": float(((va_logits >= 0) == (va_t >= 0.5)).float().mean())}
    net.plan_head = head.eval()
    return {"head": {"grid": 4, "hidden": 128, "gated_blocks": head.gated_blocks,
                     "input": "stem output average-pooled to grid x grid"},
            "training": {"config": asdict(pcfg), "loss_per_epoch": losses,
                         "teacher": f"GatePolicy({cfg.plan_teacher_threshold}) gate probabilities, training split"},
            "validation_fit": fit}


def _curves(net: SkipNetwork, data: TensorDataset, cfg: HeadsExportConfig, published: SkipNetwork | None = None) -> dict:
    """Full run and threshold curves of ``net`` on ``data``. Agreement and accuracy drop are measured against
    ``published``'s full run when given (a fine-tuned copy is judged against the network it was tuned from),
    else against ``net``'s own; ``"published"`` holds that reference run."""
    from ..evaluate import evaluate_policy, threshold_curve
    from ..policies import FullPolicy, GatePolicy, PlanPolicy

    full = evaluate_policy(net, data, FullPolicy(), batch_size=cfg.batch_size)
    ref = full if published is None else evaluate_policy(published, data, FullPolicy(), batch_size=cfg.batch_size)
    gates, gate_evals = threshold_curve(net, data, cfg.gate_thresholds, GatePolicy, ref, cfg.batch_size)
    plan, _ = threshold_curve(net, data, cfg.plan_thresholds, PlanPolicy, ref, cfg.batch_size)
    return {"full": full, "published": ref, "gates": gates, "gate_evals": gate_evals, "plan": plan}


def _full_vs_published(curves: dict) -> dict:
    """A fine-tuned copy's full network against the published one on the same images."""
    full, pub = curves["full"], curves["published"]
    labelled = bool((full.labels >= 0).all())
    return {"n": int(len(full.labels)), "agreement": full.agreement(pub),
            "accuracy": full.accuracy if labelled else None, "published_accuracy": pub.accuracy if labelled else None}


def _source(dcfg: DistillConfig, net: SkipNetwork, root: str, labelled: bool) -> dict:
    """What a card says about where the backbone, the classes and the data come from: the published
    EfficientNet-Lite0 on Imagenette, or a user's network on the user's images."""
    if dcfg.model is None:
        tag = "imagenet_tuned_gated" if dcfg.backbone_lr > 0 else "imagenet_gated"
        return {"name": f"{dcfg.arch}.{tag}", "file": f"{dcfg.arch}_{tag}",
                "model_kwargs": {"gates": True, "probes": True, "plan": True, "plan_grid": 4, "plan_hidden": 128},
                "classes_source": "torchvision ResNet50_Weights.IMAGENET1K_V1.meta['categories'] (ImageNet-1k order)",
                "note": "RGB scaled to [0, 1], then (x - 0.5) / 0.5; shorter side resized, centre crop",
                "dataset": "Imagenette (imagenette2, 224x224 JPEG ImageFolder; labels as ImageNet-1k indices)",
                "test_split": "val/",
                "reproduce": f"skipviz train-heads --arch {dcfg.arch} --epochs {dcfg.epochs}"
                             + (f" --extra-images {dcfg.extra_images}" if dcfg.extra_images else "")
                             + (f" --extra-limit {dcfg.extra_limit}" if dcfg.extra_limit else "")
                             + (f" --target-rate {dcfg.target_rate:g}" if dcfg.target_rate != DistillConfig.target_rate
                                else "")
                             + (f" --backbone-lr {dcfg.backbone_lr:g} --full-kl-weight {dcfg.full_kl_weight:g}"
                                if dcfg.backbone_lr > 0 else "") + " --export"}
    timm_name = dcfg.model.split(":", 1)[-1]
    built = {k: v for k, v in dcfg.model_kwargs.items() if k != "classes"}
    known = ("num_classes", "input_size", "gate_hidden")
    return {"name": f"{dcfg.model}+heads", "file": f"{dcfg.model.replace(':', '_').replace('/', '_')}_heads",
            "model": dcfg.model,
            "model_kwargs": {"gates": True, "probes": True, "plan": True, "plan_grid": 4, "plan_hidden": 128,
                             "num_classes": net.meta.num_classes, "input_size": list(net.meta.input_size),
                             **{k: v for k, v in built.items() if k in known},
                             "timm_kwargs": {k: v for k, v in built.items() if k not in known}},
            "classes_source": "given (model_kwargs.classes)" if "classes" in dcfg.model_kwargs else
                              "ImageNet-1k (torchvision order)" if net.meta.num_classes == 1000 else "class indices",
            "note": f"timm {timm_name} pretrained_cfg: RGB scaled to [0, 1], normalised with mean/std; shorter side "
                    "resized, centre crop (PIL bilinear)",
            "dataset": f"image folder {root} ({'labels from its class folders' if labelled else 'unlabelled'})",
            "test_split": "val/",
            "reproduce": f"skipviz train --model {dcfg.model} --weights {dcfg.weights} --data {root} "
                         f"--epochs {dcfg.epochs} --export"}


def _dataset_section(dcfg: DistillConfig, splits: dict, src: dict) -> dict:
    """The card's ``dataset``: the training, validation and test splits with their files' hashes."""
    train_set, val_set, test_set = splits["train"], splits["validation"], splits["test"]
    return {"name": src["dataset"],
            "train": {"n": len(train_set), "files_sha256": train_set.files_sha256,
                      **({"extra_images": {"folder": dcfg.extra_images, "limit": dcfg.extra_limit,
                                           "n": sum(f.startswith("extra:") for f in train_set.files),
                                           "labels_used": False}} if dcfg.extra_images else {})},
            "validation": {"n": len(val_set), "seed": dcfg.seed, "files_sha256": val_set.files_sha256,
                           "carved_from": "train/"},
            "test": ({"split": src["test_split"], "n": len(test_set), "files_sha256": test_set.files_sha256}
                     if test_set is not None else None)}


def _card(net: SkipNetwork, dcfg: DistillConfig, cfg: HeadsExportConfig, run: Path, splits: dict, ev: dict,
          t_start: float) -> dict:
    """The model card of exported heads: backbone identity and licence, classes, preprocessing, data split
    hashes, training log with CPU and hours, operating points, FLOPs, curves (validation and test)."""
    from ..measure.clock import cpu_name, software_versions
    from .export import card_flops

    plan, val, test, points, fast_t = ev["plan"], ev["val"], ev["test"], ev["points"], ev["fast"]
    outcome, per_class, classes, src = ev["outcome"], ev["per_class"], ev["classes"], ev["source"]
    exits: ExitPoints = ev["exits"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    labelled = ev["labelled"]
    card = {
        "name": src["name"],
        "architecture": {"arch": net.meta.arch if dcfg.model else dcfg.arch, "blocks": net.num_blocks,
                         "gated_blocks": net.gated_blocks, "block_names": net.block_names,
                         "head_params": sum(v.numel() for v in head_state(net).values())},
        "model_kwargs": src["model_kwargs"],
        "backbone": net.meta.card["backbone"],
        "classes": classes,
        "classes_source": src["classes_source"],
        "preprocessing": {"input_size": list(net.meta.input_size), "resize": net.meta.resize,
                          "mean": list(net.meta.mean), "std": list(net.meta.std), "note": src["note"]},
        "dataset": _dataset_section(dcfg, splits, src),
        "training": {"config": asdict(dcfg), "epochs_run": len(log), "log": log,
                     "hours": sum(r["seconds"] for r in log) / 3600, "cpu": cpu_name(), "device": "cpu",
                     "labels_used": False},
        "default_policy": ev["defaults"][0],
        "operating_points": points,
        "default_source": default_source(points),
        "flops": card_flops(net._count_flops(tuple(net.meta.input_size[-2:]))),
        "metrics_test": ({"full_accuracy": test["full"].accuracy,
                          **({"published_full_accuracy": test["published"].accuracy} if dcfg.backbone_lr > 0 else {}),
                          "gate_curve": test["gates"].to_dict("records"),
                          "early_exit_curve": exits.test.to_dict("records") if exits.test is not None else [],
                          "blocks_mean_correct": outcome["correct"], "blocks_mean_wrong": outcome["wrong"],
                          "outcome_threshold": fast_t,
                          "per_class": per_class.to_dict("records")} if outcome is not None else {}),
        "metrics_validation": {"full_accuracy": val["full"].accuracy if labelled else None,
                               **({"published_full_accuracy": val["published"].accuracy if labelled else None}
                                  if dcfg.backbone_lr > 0 else {}),
                               "gate_curve": val["gates"].to_dict("records"),
                               "early_exit_curve": exits.validation.to_dict("records")},
        "early_exit": ev["exit_section"],
        "plan": {**plan, **ev["defaults"][1],
                 "validation": {"curve": val["plan"].to_dict("records")},
                 "curve_test": test["plan"].to_dict("records") if test is not None else None},
        "software": software_versions(),
        "export_seconds": time.time() - t_start,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reproduce": src["reproduce"],
    }
    if dcfg.model is not None:
        card["model"] = dcfg.model
        if test is not None and outcome is None:  # a test split without labels: the curves, no accuracy
            card["metrics_test"] = {"gate_curve": test["gates"].to_dict("records")}
    return card


def _write(net: SkipNetwork, card: dict, dcfg: DistillConfig, src: dict, dest: Path, val: dict,
           test: dict | None) -> Path:
    """Write the heads (for a fine-tuned copy every tensor, the card measuring its full network against the
    published one on the ``val`` and ``test`` curves) and the card beside them into ``dest``; the card gains the
    weights file's sha256."""
    from safetensors.torch import save_file

    from ..models.timm_wrap import CARD_METADATA_KEY
    from ..models.weights import sha256_file

    tuned = dcfg.backbone_lr > 0
    dest.mkdir(parents=True, exist_ok=True)
    weights_path = dest / f"{src['file']}.safetensors"
    metadata = {"arch": dcfg.arch, "format": "skipviz.heads"}
    if dcfg.model is not None:
        metadata = {"arch": dcfg.model, "format": "skipviz.heads", CARD_METADATA_KEY: json.dumps(card)}
    if tuned:
        card["backbone"] = {**card["backbone"], "fine_tuned": {
            "how": "a copy of the published backbone trained jointly with the heads (skipviz train-heads "
                   f"--backbone-lr {dcfg.backbone_lr:g}): KL from the published network to the copy's gated run "
                   f"and, weighted {dcfg.full_kl_weight:g}, to its full run; BatchNorm statistics frozen",
            "storage": STORAGE_NOTE,
            "full_vs_published": {"validation": _full_vs_published(val),
                                  "test": _full_vs_published(test) if test is not None else None}}}
        metadata = {**metadata, "format": "skipviz.network"}
        save_file(_storage_state(net), str(weights_path), metadata=metadata)
    else:
        save_file(head_state(net), str(weights_path), metadata=metadata)
    card["weights_sha256"] = sha256_file(weights_path)
    weights_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return weights_path


def export_heads(cfg: HeadsExportConfig, dest: Path | None = None, data_root: str | None = None) -> tuple[Path, dict]:
    """Evaluate a finished distillation run and write its heads and their card to ``dest`` (default
    ``data/``): ``<arch>_imagenet_gated.safetensors`` (heads only) for the published backbone,
    ``<arch>_imagenet_tuned_gated.safetensors`` (every tensor) for a fine-tuned copy,
    ``timm_<name>_heads.safetensors`` for a user's network (the card in its metadata too)."""
    from ..evaluate import blocks_by_outcome
    from ..models.efficientnet_lite import imagenet_classes

    t_start = time.time()
    run = Path(cfg.run_dir)
    dcfg = DistillConfig(**json.loads((run / "config.json").read_text()))
    root = data_root or dcfg.data_root or imagenette_root()
    net = build_network(dcfg)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    tuned = dcfg.backbone_lr > 0
    if tuned and not set(net.state_dict()) <= set(ckpt["heads"]):
        raise ValueError(f"{run}: the run says its backbone was fine-tuned (backbone_lr {dcfg.backbone_lr:g}) but "
                         "last.pt holds only heads: it would ship the published backbone as a fine-tuned copy")
    net.load_state_dict(ckpt["heads"], strict=False)  # every tensor for a fine-tuned backbone
    net.eval()
    published = build_network(dcfg).eval() if tuned else None  # what the fine-tuned copy is judged against
    if tuned:
        _round_to_storage(net)  # the card's numbers are measured on exactly what ships (the plan head: below)
    # first, while the machine is quiet: the exits' blocks are chosen by the batch-1 time predicted with it
    costs = decision_costs(net, ("early_exit", "gates"), cfg)
    train_set, val_set = split_train_val(dcfg, load_training_images(dcfg, net, root, progress=False))
    train_set = with_extra_images(dcfg, net, train_set, progress=False)  # the plan head learns from them too
    test_set = test_images(dcfg, net, root)
    labelled = bool((val_set.labels >= 0).all())
    plan = _fit_plan(net, train_set, val_set, cfg)
    if tuned:
        _round_to_storage(net)  # the plan head just fitted, before anything is measured
    costs.update(decision_costs(net, ("plan",), cfg))  # the head just fitted
    val = _curves(net, val_set, cfg, published)
    test = _curves(net, test_set, cfg, published) if test_set is not None else None
    points = threshold_points(val, test, cfg, labelled, costs)
    exits = exit_operating_points(net, val_set, val["published"], costs["early_exit"], test_set,
                                  test["published"] if test is not None else None, cfg.exit_config())
    exit_section, points["early_exit"] = exit_card_entries(net, exits, cfg.exit_config(), val_set)
    # the outcome tables at the gates' fast point; without one at the most cautious threshold measured
    fast_t = points["gates"]["fast"]["threshold"] or cfg.gate_thresholds[0]
    classes = imagenet_classes() if dcfg.model is None else list(net.meta.classes)
    outcome, per_class = None, None
    if test is not None and bool((test_set.labels >= 0).all()):
        outcome, per_class = blocks_by_outcome(test["gate_evals"][list(cfg.gate_thresholds).index(fast_t)], classes)
    src = _source(dcfg, net, str(root), labelled)
    card = _card(net, dcfg, cfg, run, {"train": train_set, "validation": val_set, "test": test_set},
                 {"plan": plan, "val": val, "test": test, "points": points, "fast": fast_t, "labelled": labelled,
                  "exits": exits, "exit_section": exit_section, "defaults": decision_defaults(points, costs, cfg, labelled),
                  "outcome": outcome, "per_class": per_class, "classes": classes, "source": src}, t_start)
    weights_path = _write(net, card, dcfg, src, dest or data_dir(), val, test)
    return weights_path, card
