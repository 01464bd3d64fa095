"""Training a plan head (:class:`~skipviz.engine.heads.PlanHead`) for a trained gated model, by distillation
from its gates, and writing the model again with the plan head and a ``plan`` section in its card."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import TensorDataset, batches, normalize
from ..engine.flops import count_network_flops
from ..engine.heads import PlanHead
from ..engine.network import SkipNetwork
from ..evaluate.loop import evaluate_policy, pick_threshold, threshold_curve
from ..models._registry import create_model, data_dir
from ..models.weights import read_card, sha256_file
from ..policies.simple import FullPolicy
from ..policies.threshold import GatePolicy, PlanPolicy
from .export import card_flops, save_weights
from .joint import TrainConfig, load_data, pick_device

__all__ = ["PlanConfig", "export_plan", "fit_plan_head", "plan_targets"]


@dataclass
class PlanConfig:
    """Training a plan head (:class:`~skipviz.engine.heads.PlanHead`) for a trained gated model, by distillation.

    Targets: the gate probabilities the model's own gate heads give each training image in a skipped run at
    ``teacher_threshold`` (what the block-by-block gates would decide); inputs: the stem's output pooled to
    ``grid`` x ``grid``. The backbone, gates and probes are not changed.
    """

    arch: str = "cifar_resnet20"
    weights: str | None = None  # the gated model's .safetensors (default: data/<arch>_cifar10_gated.safetensors)
    data_root: str | None = None
    teacher_threshold: float = 0.5
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 128
    grid: int = 4
    val_size: int = 5000
    seed: int = 0
    limit_train: int | None = None


@torch.no_grad()
def plan_targets(net: SkipNetwork, head: PlanHead, data: TensorDataset, teacher_threshold: float,
                 batch_size: int = 500, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, C0 * grid^2), targets (N, G))``: what ``head`` reads for each image
    (:meth:`PlanHead.features` of the stem output) and the gate probabilities of the G gated blocks in a
    skipped run of ``net`` under ``GatePolicy(teacher_threshold)``."""
    device = next(net.parameters()).device
    gated = net.gated_blocks
    feats, targets = [], []
    for i in tqdm(range(0, len(data), batch_size), desc="plan targets", disable=not progress, leave=False):
        x = normalize(data.images[i: i + batch_size].to(device), net.meta.mean, net.meta.std)
        feats.append(head.features(net._stem(x)).float().cpu())
        targets.append(net.run(x, GatePolicy(teacher_threshold)).scores[:, gated].float().cpu())
    return torch.cat(feats), torch.cat(targets)


def fit_plan_head(head: PlanHead, feats: torch.Tensor, targets: torch.Tensor, cfg: PlanConfig,
                  progress: bool = False) -> list[float]:
    """Fit ``head``'s two layers to ``targets`` (N, G) in [0, 1] from ``feats`` (N, C0 * grid^2) with binary
    cross-entropy, on standardised features; the standardisation is then folded into ``fc1``, so the head
    reads raw pooled features. Returns the mean training loss of every epoch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head.train()
    losses = []
    for _ in tqdm(range(cfg.epochs), desc="plan head", disable=not progress):
        total = 0.0
        for idx in batches(len(z), cfg.batch_size, shuffle=True, generator=gen):
            loss = F.binary_cross_entropy_with_logits(head.mlp(z[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(z))
    with torch.no_grad():  # fc1(standardised f) == (W / std) f + (b - (W / std) mean)
        w = head.fc1.weight / std
        head.fc1.bias.sub_(w @ mean)
        head.fc1.weight.copy_(w)
    head.eval()
    return losses


def export_plan(cfg: PlanConfig, progress: bool = True, dest: Path | None = None) -> tuple[Path, dict]:
    """Train a plan head for a shipped gated model and write the model again, plan head included, with its
    card extended by a ``plan`` section: the training configuration and data hashes, the validation fit, the
    default threshold (chosen on validation as for the gates: largest FLOPs cut with <= 0.5 points of accuracy
    drop) and the accuracy/FLOPs curve on ``test/`` next to the gates'. Weights land in ``dest`` (default
    ``data/``) under the source file's name; the backbone, gates and probes are copied unchanged."""
    device = pick_device()
    source = Path(cfg.weights) if cfg.weights else data_dir() / f"{cfg.arch}_cifar10_gated.safetensors"
    card = read_card(source.with_suffix(".json"))
    if not card:
        raise FileNotFoundError(f"{source.with_suffix('.json')}: the gated model's card is missing")
    net = create_model(cfg.arch, weights=source, **card.get("model_kwargs", {})).to(device).eval()
    net.plan_head = None  # trained afresh (the source may already carry one)
    if not net.gated_blocks:
        raise ValueError(f"{source}: the model has no gate heads to learn a plan from")
    torch.manual_seed(cfg.seed)
    channels = net._stem(torch.zeros((1, *net.meta.input_size), device=device)).shape[1]
    head = PlanHead(channels, net.gated_blocks, cfg.grid, cfg.hidden).to(device)
    train_set, val_set, test_set = load_data(TrainConfig(arch=cfg.arch, data_root=cfg.data_root,
                                                         val_size=cfg.val_size, seed=cfg.seed,
                                                         limit_train=cfg.limit_train))
    losses, fit = _distill(net, head, train_set, val_set, cfg, progress)
    net.plan_head = head.to(device)
    thresholds = [round(t, 2) for t in np.linspace(0.1, 0.9, 9)]
    val_curve, _ = threshold_curve(net, val_set, thresholds, make_policy=PlanPolicy,
                                   reference=evaluate_policy(net, val_set, FullPolicy()), progress=progress)
    default_t = pick_threshold(val_curve)
    test_curve, _ = threshold_curve(net, test_set, thresholds, make_policy=PlanPolicy,
                                    reference=evaluate_policy(net, test_set, FullPolicy()), progress=progress)
    dest = dest or data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    weights_path = dest / source.name
    save_weights(net, weights_path, cfg.arch)
    card = dict(card)
    card["model_kwargs"] = {**card.get("model_kwargs", {}), "plan": True, "plan_grid": cfg.grid,
                            "plan_hidden": cfg.hidden}
    card["architecture"] = {**card.get("architecture", {}), "params": sum(p.numel() for p in net.parameters())}
    card["plan"] = {
        "head": {"grid": cfg.grid, "hidden": cfg.hidden, "gated_blocks": head.gated_blocks,
                 "input": "stem output average-pooled to grid x grid"},
        "training": {"config": asdict(cfg), "loss_per_epoch": losses, "device": str(device),
                     "teacher": f"GatePolicy({cfg.teacher_threshold}) gate probabilities on the training split",
                     "train_n": len(train_set), "train_files_sha256": train_set.files_sha256},
        "validation": {**fit, "curve": val_curve.to_dict(orient="records")},
        "default_threshold": default_t,
        "rule": "largest FLOPs cut on validation with accuracy drop <= 0.5 points vs full",
        "curve_test": test_curve.to_dict(orient="records"),
        "reproduce": f"skipviz train-plan --arch {cfg.arch} --epochs {cfg.epochs} --seed {cfg.seed}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    card["flops"] = card_flops(count_network_flops(net, tuple(net.meta.input_size[-2:])))
    card["weights_sha256"] = sha256_file(weights_path)
    weights_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return weights_path, card


def _distill(net: SkipNetwork, head: PlanHead, train_set: TensorDataset, val_set: TensorDataset, cfg: PlanConfig,
             progress: bool) -> tuple[list[float], dict]:
    """Fit ``head`` (on the CPU) to the gates' probabilities on ``train_set``; the loss per epoch and the fit on
    ``val_set`` (BCE, decision agreement with the gates, mean absolute error of the probabilities)."""
    tr_f, tr_t = plan_targets(net, head, train_set, cfg.teacher_threshold, progress=progress)
    va_f, va_t = plan_targets(net, head, val_set, cfg.teacher_threshold, progress=progress)
    losses = fit_plan_head(head.cpu(), tr_f, tr_t, cfg, progress=progress)
    with torch.no_grad():
        va_logits = head.mlp(va_f)
        fit = {"val_bce": float(F.binary_cross_entropy_with_logits(va_logits, va_t)),
               "val_decision_agreement": float(((va_logits >= 0) == (va_t >= 0.5)).float().mean()),
               "val_mean_abs_error": float((torch.sigmoid(va_logits) - va_t).abs().mean())}
    return losses, fit
