"""Training a gated CIFAR ResNet: the joint phase (exported by :mod:`skipviz.training.export`).

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import TensorDataset, augment, batches, cifar10_root, load_split, normalize, train_val_split
from ..engine.network import SkipNetwork
from ..evaluate.loop import evaluate_policy
from ..measure.clock import resolve_device
from ..models._registry import create_model
from ..policies.simple import FullPolicy
from ..policies.threshold import GatePolicy

__all__ = ["TrainConfig", "load_data", "monitor", "one_cycle_lr", "pick_device", "rate_target", "train"]


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
    """CUDA when available, else CPU (:func:`~skipviz.measure.clock.resolve_device`)."""
    return resolve_device()


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
    opt = _optimizer(net, cfg)
    ckpt_path = out / "last.pt"
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch = _resume(ckpt_path, net, opt, gen, device)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        t0 = time.time()
        sums = {"loss": 0.0, "correct": 0, "seen": 0, "rate": 0.0, "gated_batches": 0}
        bar = tqdm(list(batches(len(train_set), cfg.batch_size, True, gen)), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress)
        for b, idx in enumerate(bar):
            step = epoch * steps_per_epoch + b
            _set_lr(opt, one_cycle_lr(step, total, cfg.lr))
            target = _train_step(net, opt, train_set, idx, gen, cfg, step / total, device, sums)
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


def _optimizer(net: SkipNetwork, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no weight decay on biases and BatchNorm weights (1-d parameters)."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=True)


def _resume(ckpt_path: Path, net: SkipNetwork, opt: torch.optim.Optimizer, gen: torch.Generator,
            device: torch.device) -> int:
    """Load ``last.pt`` when there is one (weights, optimizer, generator and torch RNG state); the epoch to
    start from."""
    if not ckpt_path.is_file():
        return 0
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    start_epoch = int(ckpt["epoch"]) + 1
    gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    print(f"resumed from {ckpt_path} at epoch {start_epoch}")
    return start_epoch


def _train_step(net: SkipNetwork, opt: torch.optim.Optimizer, train_set: TensorDataset, idx: torch.Tensor,
                gen: torch.Generator, cfg: TrainConfig, progress: float, device: torch.device, sums: dict) -> float:
    """One optimisation step on the batch ``idx``: augmented, a sandwich (full) batch with probability
    ``full_batch_prob``, cross-entropy plus the rate and probe losses; ``sums`` updated. Returns the rate
    target."""
    x = normalize(augment(train_set.images[idx], generator=gen), net.meta.mean, net.meta.std).to(device)
    y = train_set.labels[idx].to(device)
    full_batch = bool(torch.rand((), generator=gen) < cfg.full_batch_prob)
    target = rate_target(progress, cfg)
    logits, gate_probs, probe_logits = net.forward_train(x, cfg.gate_temperature, hard=True, force_full=full_batch)
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
    return target
