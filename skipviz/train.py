"""Training a gated CIFAR ResNet, then exporting it (weights + model card) for the registry.

One joint phase (as ConvNet-AIG trains): backbone, gate heads and probe heads together.

* Gates: Gumbel-sigmoid with a straight-through estimator; a rate loss pulls each gated block's mean execute
  rate towards ``target_rate`` (ramped down from 1 over the first ``rate_ramp`` of training, so the backbone
  first learns with every block, much as stochastic depth does).
* "Sandwich" batches: with probability ``full_batch_prob`` a batch runs every block (gates forced on, no rate
  loss), so the same weights stay a good full network: the reference the gated network is compared against.
* Probe heads: a linear classifier per block on detached pooled features (they never change the backbone);
  used by early exits and the prediction-KL heatmaps.
* Deterministic at inference: a gate runs its block iff sigmoid(logit) >= threshold.

Resumable: ``<out_dir>/last.pt`` (weights-only loadable) is written after every epoch.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ._registry import create_model, data_dir
from .data import TensorDataset, augment, batches, cifar10_root, load_split, normalize, train_val_split
from .network import FlopTable, PlanHead, SkipNetwork


@dataclass
class TrainConfig:
    arch: str = "cifar_resnet20"
    data_root: str | None = None
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    target_rate: float = 0.4
    rate_weight: float = 2.0
    rate_ramp: float = 0.4
    full_batch_prob: float = 0.25
    gate_temperature: float = 1.0
    probe_weight: float = 1.0
    val_size: int = 5000
    monitor_size: int = 2000
    seed: int = 0
    out_dir: str = "runs/cifar_resnet20"
    limit_train: int | None = None
    threads: int | None = None
    model_kwargs: dict = field(default_factory=lambda: {"gates": True, "probes": True})


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def one_cycle_lr(step: int, total: int, peak: float, warmup: float = 0.15) -> float:
    """Linear warm-up to ``peak`` then cosine down to ~0."""
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (0.1 + 0.9 * step / w)
    p = (step - w) / max(1, total - w)
    return peak * 0.5 * (1 + math.cos(math.pi * p))


def rate_target(progress: float, cfg: TrainConfig) -> float:
    """Execute-rate target at ``progress`` in [0, 1]: 1 -> ``target_rate`` over the first ``rate_ramp``."""
    if progress >= cfg.rate_ramp:
        return cfg.target_rate
    return 1.0 - (1.0 - cfg.target_rate) * progress / cfg.rate_ramp


@torch.no_grad()
def monitor(net: SkipNetwork, data: TensorDataset, device: torch.device) -> dict:
    """Quick accuracy of the full and the gated (threshold 0.5) network on a held-out subset."""
    from .evaluate import evaluate_policy
    from .policies import FullPolicy, GatePolicy

    net.eval()
    full = evaluate_policy(net, data, FullPolicy(), device=device)
    gated = evaluate_policy(net, data, GatePolicy(0.5), device=device)
    return {"val_full_acc": full.accuracy, "val_gated_acc": gated.accuracy,
            "val_gated_flops_saved": gated.flops_saved_fraction, "val_gated_blocks": gated.blocks_mean}


def load_data(cfg: TrainConfig) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, validation, test) from the configured ImageFolder root."""
    root = cfg.data_root or cifar10_root()
    if root is None:
        raise FileNotFoundError("CIFAR-10 not found: set SKIPVIZ_CIFAR10 to an ImageFolder root with train/ and test/")
    full_train = load_split(root, "train")
    test = load_split(root, "test")
    tr_idx, val_idx = train_val_split(len(full_train), cfg.val_size, cfg.seed)
    if cfg.limit_train:
        tr_idx = tr_idx[: cfg.limit_train]
    return full_train.subset(tr_idx), full_train.subset(val_idx), test


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume) and return the run folder, holding ``last.pt`` and ``log.jsonl``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    torch.manual_seed(cfg.seed)
    train_set, val_set, _ = load_data(cfg)
    monitor_set = val_set.subset(np.arange(min(cfg.monitor_size, len(val_set))))
    net = create_model(cfg.arch, **cfg.model_kwargs).to(device)
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=True)
    start_epoch = 0
    ckpt_path = out / "last.pt"
    gen = torch.Generator().manual_seed(cfg.seed)
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"]) + 1
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resumed from {ckpt_path} at epoch {start_epoch}")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    mean, std = net.meta.mean, net.meta.std
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        t0 = time.time()
        sums = {"loss": 0.0, "correct": 0, "seen": 0, "rate": 0.0, "gated_batches": 0}
        bar = tqdm(list(batches(len(train_set), cfg.batch_size, True, gen)), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress)
        for b, idx in enumerate(bar):
            step = epoch * steps_per_epoch + b
            _set_lr(opt, one_cycle_lr(step, total, cfg.lr))
            x = normalize(augment(train_set.images[idx], generator=gen), mean, std).to(device)
            y = train_set.labels[idx].to(device)
            full_batch = bool(torch.rand((), generator=gen) < cfg.full_batch_prob)
            target = rate_target(step / total, cfg)
            logits, gate_probs, probe_logits = net.forward_train(x, cfg.gate_temperature, hard=True,
                                                                 force_full=full_batch)
            loss = F.cross_entropy(logits, y)
            if gate_probs.numel() and not full_batch:
                loss = loss + cfg.rate_weight * ((gate_probs.mean(0) - target) ** 2).mean()
                sums["rate"] += float(gate_probs.detach().mean())
                sums["gated_batches"] += 1
            if probe_logits:
                loss = loss + cfg.probe_weight * sum(F.cross_entropy(p, y) for p in probe_logits) / len(probe_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += float(loss.detach()) * len(y)
            sums["correct"] += int((logits.argmax(1) == y).sum())
            sums["seen"] += len(y)
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}", acc=f"{sums['correct'] / sums['seen']:.3f}",
                            rate=f"{sums['rate'] / max(1, sums['gated_batches']):.2f}")
        record = {"epoch": epoch + 1, "train_loss": sums["loss"] / sums["seen"],
                  "train_acc": sums["correct"] / sums["seen"],
                  "gate_rate": sums["rate"] / max(1, sums["gated_batches"]), "rate_target": target,
                  "lr": one_cycle_lr(step, total, cfg.lr), "seconds": time.time() - t0}
        record.update(monitor(net, monitor_set, device))
        print(json.dumps(record))
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tmp = out / "last.pt.tmp"
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(ckpt_path)
    return out


def card_flops(table: FlopTable) -> dict:
    """The model card's ``flops`` section: headline numbers plus the whole per-part table
    (:meth:`SkipNetwork.flop_table` reads it back instead of counting again)."""
    raw = table.to_dict()
    return {"full": table.full, "per_block": raw["blocks"], "gates": raw["gates"],
            "gate_fraction_of_full": sum(table.gates.values()) / table.full,
            "counter": "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add), "
                       f"{table.input_hw[0]}x{table.input_hw[1]} input",
            "table": raw}


def refresh_card_flops(card_path: str | Path) -> dict:
    """Recount the FLOPs of a shipped model and rewrite its card's ``flops`` section (nothing else changes).

    ``python -c "from skipviz.train import refresh_card_flops as r; r('data/cifar_resnet20_cifar10_gated.json')"``
    """
    card_path = Path(card_path)
    card = json.loads(card_path.read_text())
    net = create_model(card["name"]).eval()
    card["flops"] = card_flops(net._count_flops(tuple(net.meta.input_size[-2:])))
    card_path.write_text(json.dumps(card, indent=2))
    return card["flops"]


def software_versions() -> dict:
    from ._env import package_version

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": package_version("torchvision"),
            "numpy": np.__version__, "platform": platform.platform()}


def export(cfg: TrainConfig, run_dir: Path, thresholds: list[float] | None = None, progress: bool = True,
           dest: Path | None = None) -> tuple[Path, dict]:
    """Evaluate a finished run and write ``<arch>_cifar10_gated.safetensors`` + model card JSON to ``data/``.

    The default threshold is chosen on the validation split (largest FLOPs cut with an accuracy drop
    <= 0.5 points against the full network); every number in the card is measured on ``test/``.
    """
    from safetensors.torch import save_file

    from .evaluate import (blocks_by_outcome, early_exit_policy, evaluate_policy, pick_threshold,
                           threshold_curve)
    from .policies import FullPolicy

    device = pick_device()
    train_set, val_set, test_set = load_data(cfg)
    net = create_model(cfg.arch, **cfg.model_kwargs).to(device)
    ckpt = torch.load(Path(run_dir) / "last.pt", map_location=device, weights_only=True)
    net.load_state_dict(ckpt["model"])
    net.eval()
    thresholds = thresholds or [round(t, 2) for t in np.linspace(0.1, 0.9, 9)]
    val_full = evaluate_policy(net, val_set, FullPolicy(), progress=progress)
    val_curve, _ = threshold_curve(net, val_set, thresholds, reference=val_full, progress=progress)
    default_t = pick_threshold(val_curve)
    test_full = evaluate_policy(net, test_set, FullPolicy(), progress=progress)
    test_curve, test_evals = threshold_curve(net, test_set, thresholds, reference=test_full, progress=progress)
    gated = test_evals[thresholds.index(default_t)]
    exit_thresholds = [0.6, 0.8, 0.9, 0.99]
    exit_curve, _ = threshold_curve(net, test_set, exit_thresholds, make_policy=early_exit_policy,
                                    reference=test_full, progress=progress)
    outcome, per_class = blocks_by_outcome(gated, test_set.classes)
    dest = dest or data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    weights_path = dest / f"{cfg.arch}_cifar10_gated.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(weights_path), metadata={"arch": cfg.arch, "format": "skipviz.SkipNetwork"})
    log = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    table = net.flop_table()
    card = {
        "name": f"{cfg.arch}.cifar10_gated",
        "architecture": {"arch": cfg.arch, "blocks": net.num_blocks, "gated_blocks": net.gated_blocks,
                         "block_names": net.block_names, "params": sum(p.numel() for p in net.parameters())},
        "model_kwargs": cfg.model_kwargs,
        "dataset": {"name": "CIFAR-10 (JPEG ImageFolder)", "root_basename": Path(val_set.root).name,
                    "train": {"n": len(train_set), "files_sha256": train_set.files_sha256},
                    "validation": {"n": len(val_set), "seed": cfg.seed, "files_sha256": val_set.files_sha256,
                                   "carved_from": "train/"},
                    "test": {"n": len(test_set), "files_sha256": test_set.files_sha256}},
        "training": {"config": asdict(cfg), "epochs_run": len(log), "log": log,
                     "device": str(device), "hardware_note": "trained on CPU (2 cores) - no GPU was available"
                     if device.type == "cpu" else "trained on GPU"},
        "default_policy": {"name": "gates", "threshold": default_t,
                           "rule": "largest FLOPs cut on validation with accuracy drop <= 0.5 points vs full"},
        "flops": card_flops(table),
        "metrics_test": {
            "full_accuracy": test_full.accuracy,
            "gated_accuracy": gated.accuracy,
            "gated_threshold": default_t,
            "gated_flops_mean": gated.flops_mean,
            "gated_flops_saved_fraction": gated.flops_saved_fraction,
            "gated_blocks_mean": gated.blocks_mean,
            "accuracy_drop_points": 100 * (test_full.accuracy - gated.accuracy),
            "agreement_with_full": gated.agreement(test_full),
            "blocks_mean_correct": outcome["correct"],
            "blocks_mean_wrong": outcome["wrong"],
            "per_class": per_class.to_dict(orient="records"),
            "gate_curve": test_curve.to_dict(orient="records"),
            "early_exit_curve": exit_curve.to_dict(orient="records"),
        },
        "metrics_validation": {"full_accuracy": val_full.accuracy, "gate_curve": val_curve.to_dict(orient="records")},
        "software": software_versions(),
        "weights_sha256": None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reproduce": f"skipviz train --arch {cfg.arch} --epochs {cfg.epochs} --seed {cfg.seed} --export",
    }
    from .weights import sha256_file

    card["weights_sha256"] = sha256_file(weights_path)
    card_path = weights_path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2))
    return weights_path, card


# ------------------------------------------------------------------------------------------ plan head
@dataclass
class PlanConfig:
    """Training a plan head (:class:`~skipviz.network.PlanHead`) for a trained gated model, by distillation.

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
    from .policies import GatePolicy

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
    from safetensors.torch import save_file

    from .evaluate import evaluate_policy, pick_threshold, threshold_curve
    from .policies import FullPolicy, PlanPolicy
    from .weights import read_card, sha256_file

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
    tr_f, tr_t = plan_targets(net, head, train_set, cfg.teacher_threshold, progress=progress)
    va_f, va_t = plan_targets(net, head, val_set, cfg.teacher_threshold, progress=progress)
    losses = fit_plan_head(head.cpu(), tr_f, tr_t, cfg, progress=progress)
    with torch.no_grad():
        va_logits = head.mlp(va_f)
        fit = {"val_bce": float(F.binary_cross_entropy_with_logits(va_logits, va_t)),
               "val_decision_agreement": float(((va_logits >= 0) == (va_t >= 0.5)).float().mean()),
               "val_mean_abs_error": float((torch.sigmoid(va_logits) - va_t).abs().mean())}
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
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(weights_path), metadata={"arch": cfg.arch, "format": "skipviz.SkipNetwork"})
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
    card["flops"] = card_flops(net._count_flops(tuple(net.meta.input_size[-2:])))
    card["weights_sha256"] = sha256_file(weights_path)
    weights_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return weights_path, card
