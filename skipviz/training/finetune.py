"""Fine-tuning a published CIFAR ResNet into a gated network that agrees with its own full network.

Starts from the public checkpoint imported by :func:`~skipviz.models.cifar_import.import_cifar_resnet` (its
ImageNet normalisation kept) and trains backbone, gate heads and probe heads jointly. Every step runs the
batch twice through the same weights:

* the **full path** (every block, BatchNorm on batch statistics): cross-entropy on the labels, so the full
  network keeps improving on the JPEG training images (a "sandwich" full-path batch on every step when
  ``full_batch_prob`` is 1; otherwise that pass runs without gradients on the other steps);
* the **gated path** (Gumbel-sigmoid straight-through gates, :meth:`SkipNetwork.forward_train`): the KL
  divergence from the full path's class distribution of the same batch (detached: no gradient through the
  teacher) to the gated run's, optionally cross-entropy on the labels, and a FLOPs-rate loss pulling the
  expected fraction of the gated blocks' FLOPs executed towards ``target_rate`` (ramped down from 1 over
  ``rate_ramp`` of training). BatchNorm runs in training mode in both passes (see :func:`finetune_step`).

Probe heads learn on detached features (cross-entropy, as :func:`skipviz.training.joint.train`); gates are
deterministic at inference (a block runs iff sigmoid(logit) >= threshold). The validation split is 5,000
images carved from ``train/`` (seed 0) by :func:`skipviz.training.joint.load_data`. Resumable: ``<out_dir>/last.pt``
(weights-only loadable: model, optimiser, epoch, RNG states) after every epoch; :func:`finetune` resumes it.
Export: :func:`skipviz.training.finetune_export.export_finetuned` (threshold curves, the "fast" and "faithful"
operating points, model card).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import TensorDataset, augment, batches, normalize
from ..engine.heads import HEAD_PREFIXES
from ..engine.network import SkipNetwork
from ..evaluate.loop import evaluate_policy
from ..models._registry import create_model
from ..models.cifar_import import akamaster_file, import_cifar_resnet
from ..policies.simple import FullPolicy
from ..policies.threshold import GatePolicy
from .joint import load_data, one_cycle_lr, rate_target

__all__ = ["FinetuneConfig", "compare_precision", "finetune", "finetune_step", "init_network", "measure_step_speed",
           "monitor"]


@dataclass
class FinetuneConfig:
    arch: str = "cifar_resnet56"
    init: str | None = None  # public .th checkpoint (default: the akamaster file of this depth)
    data_root: str | None = None
    out_dir: str = "runs/cifar_resnet56_gated"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.02  # measured here: plain fine-tuning at 0.02 cosine reaches 89.6% after 2 epochs
    head_lr_mult: float = 5.0  # gate and probe heads start from scratch: 0.1, the rate skipviz.training.joint uses for them
    warmup: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4  # what the source was trained with
    target_rate: float = 0.4  # fraction of the gated blocks' FLOPs executed, on average
    rate_weight: float = 4.0
    rate_ramp: float = 0.3
    kl_weight: float = 1.0
    gated_ce_weight: float = 0.3
    full_ce_weight: float = 1.0
    full_batch_prob: float = 1.0  # probability that the full path gets gradients (CE) on a step
    gate_temperature: float = 1.0
    probe_weight: float = 0.5
    val_size: int = 5000
    seed: int = 0
    limit_train: int | None = None
    threads: int | None = None
    autocast_bf16: bool = False
    channels_last: bool = True  # SkipNetwork's own layout (weights and activations); False: contiguous NCHW
    model_kwargs: dict = field(default_factory=lambda: {"gates": True, "probes": True})


def init_network(cfg: FinetuneConfig, out: Path) -> tuple[SkipNetwork, dict]:
    """``cfg.arch`` with gate and probe heads over the imported public backbone: imports the checkpoint into
    ``out/init/`` (SkipViz weights + card: source SHA-256, licence) and loads its tensors; the heads keep
    their initialisation (gates open: every block runs at first). Returns ``(net, import card)``."""
    depth = int(cfg.arch.removeprefix("cifar_resnet"))
    src = Path(cfg.init) if cfg.init else akamaster_file(depth)
    if src is None:
        raise FileNotFoundError(f"no public ResNet-{depth} checkpoint: set SKIPVIZ_AKAMASTER or init=")
    weights, card = import_cifar_resnet(src, out / "init")
    if card["arch"] != cfg.arch:
        raise ValueError(f"{src.name} is a {card['arch']}, not {cfg.arch}")
    kwargs = {**card["model_kwargs"], **cfg.model_kwargs}
    net = create_model(cfg.arch, **kwargs)
    backbone = create_model(cfg.arch, weights=weights)
    missing, unexpected = net.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or any(not k.startswith(HEAD_PREFIXES) for k in missing):
        raise ValueError(f"backbone does not fit {cfg.arch}: {unexpected[:3]} {missing[:3]}")
    cfg.model_kwargs = kwargs
    return net, card


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the batch, from logits (N, K), in float32."""
    return F.kl_div(F.log_softmax(student.float(), 1), F.log_softmax(teacher.float(), 1), log_target=True,
                    reduction="batchmean")


def finetune_step(net: SkipNetwork, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, target: float,
                  gated_share: torch.Tensor, full_grad: bool = True) -> tuple[torch.Tensor, dict]:
    """The loss of one training batch, ``x`` (N, 3, H, W) normalised and ``y`` (N,) labels, ``net`` in train
    mode; ``gated_share`` (G,) is each gated block's share of the gated FLOPs. Returns ``(loss, parts)``:
    parts are floats (full/gated CE, KL, executed fraction, probe CE, full/gated batch accuracy)."""
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)
    with amp, (contextlib.nullcontext() if full_grad else torch.no_grad()):
        f_logits, _, f_probes = net.forward_train(x, force_full=True)
    teacher = f_logits.detach()
    # both passes update the BatchNorm running statistics. Measured (20 steps from the public ResNet-56, 1,000
    # validation images, full network 85.5% before): 86.3% after; keeping the gated pass out of the running
    # statistics (momentum 0) gave 71.6%, and normalising it with them (eval mode) diverged within 15 steps
    with amp:
        g_logits, gate_probs, g_probes = net.forward_train(x, cfg.gate_temperature, hard=True)
    kl = _kl(teacher, g_logits)
    g_ce = F.cross_entropy(g_logits.float(), y)
    executed = (gate_probs.float() * gated_share).sum(1).mean() if gate_probs.numel() else g_ce.new_zeros(())
    loss = cfg.kl_weight * kl + cfg.gated_ce_weight * g_ce + cfg.rate_weight * (executed - target) ** 2
    probes = (f_probes if full_grad else []) + g_probes
    probe = sum(F.cross_entropy(p.float(), y) for p in probes) / len(probes) if probes else g_ce.new_zeros(())
    loss = loss + cfg.probe_weight * probe
    f_ce = F.cross_entropy(f_logits.float(), y)
    if full_grad:
        loss = loss + cfg.full_ce_weight * f_ce
    parts = {"full_ce": float(f_ce.detach()), "gated_ce": float(g_ce.detach()), "kl": float(kl.detach()),
             "executed": float(executed.detach()), "probe_ce": float(probe.detach()),
             "full_acc": float((teacher.argmax(1) == y).float().mean()),
             "gated_acc": float((g_logits.detach().argmax(1) == y).float().mean())}
    return loss, parts


def _gated_share(net: SkipNetwork) -> torch.Tensor:
    """(G,): each gated block's share of the gated blocks' FLOPs."""
    table = net.flop_table(tuple(net.meta.input_size[-2:]))
    flops = torch.tensor([float(table.blocks[i]) for i in net.gated_blocks])
    return flops / flops.sum()


def _optimizer(net: SkipNetwork, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov): weight decay on weights, not on biases and norms; the heads (new, from scratch) at
    ``head_lr_mult`` times the backbone's rate (each group's ``lr_mult``, applied by :func:`_set_lr`)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in net.named_parameters():
        groups.setdefault((name.startswith(HEAD_PREFIXES), p.ndim <= 1), []).append(p)
    return torch.optim.SGD([{"params": ps, "weight_decay": 0.0 if flat else cfg.weight_decay,
                             "lr_mult": cfg.head_lr_mult if head else 1.0} for (head, flat), ps in groups.items()],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def _prepare(net: SkipNetwork, cfg: FinetuneConfig) -> SkipNetwork:
    """``net`` in the configured layout: channels-last is SkipNetwork's default; contiguous NCHW is kept as an
    option for the speed comparison (benchmarks/results/train_speed_cpu.md)."""
    if not cfg.channels_last:
        net.memory_format = torch.contiguous_format  # the stem lays its input out in this format
        net = net.to(memory_format=torch.contiguous_format)
    return net


def _batch(data: TensorDataset, idx: torch.Tensor, net: SkipNetwork, cfg: FinetuneConfig,
           gen: torch.Generator) -> torch.Tensor:
    """Augmented (crop + flip), normalised batch (N, 3, H, W) (the stem lays it out in the net's format)."""
    return normalize(augment(data.images[idx], generator=gen), net.meta.mean, net.meta.std)


@torch.no_grad()
def monitor(net: SkipNetwork, data: TensorDataset, threshold: float = 0.5) -> dict:
    """Validation accuracy of the full and the gated (``threshold``) network, their top-1 agreement and the
    FLOPs the gated run saves (decision heads counted)."""
    net.eval()
    full = evaluate_policy(net, data, FullPolicy())
    gated = evaluate_policy(net, data, GatePolicy(threshold))
    t = f"t{threshold:g}"
    return {"val_full_acc": full.accuracy, f"val_gated_acc_{t}": gated.accuracy,
            f"val_agreement_{t}": gated.agreement(full), f"val_flops_saved_{t}": gated.flops_saved_fraction,
            f"val_blocks_{t}": gated.blocks_mean}


def _save(path: Path, net: SkipNetwork, opt: torch.optim.Optimizer, epoch: int, gen: torch.Generator) -> None:
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    torch.save({"model": state, "optimizer": opt.state_dict(), "epoch": epoch, "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)


def _resume(path: Path, net: SkipNetwork, opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
    """Load ``last.pt`` when present; returns the first epoch still to run."""
    if not path.is_file():
        return 0
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    print(f"resumed from {path} after epoch {int(ckpt['epoch']) + 1}", flush=True)
    return int(ckpt["epoch"]) + 1


def _run_epoch(net, opt, train_set, cfg, epoch, gen, gated_share, progress) -> dict:
    """One epoch of :func:`finetune_step` under the cosine schedule over ``cfg.epochs``; the mean parts."""
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    net.train()
    sums: dict[str, float] = {}
    bar = tqdm(list(batches(len(train_set), cfg.batch_size, True, gen)), desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not progress)
    for b, idx in enumerate(bar):
        step = epoch * steps_per_epoch + b
        lr = one_cycle_lr(step, total, cfg.lr, cfg.warmup)
        _set_lr(opt, lr)
        x, y = _batch(train_set, idx, net, cfg, gen), train_set.labels[idx]
        full_grad = cfg.full_batch_prob >= 1 or bool(torch.rand((), generator=gen) < cfg.full_batch_prob)
        target = rate_target(step / total, cfg)
        loss, parts = finetune_step(net, x, y, cfg, target, gated_share, full_grad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(kl=f"{sums['kl'] / (b + 1):.3f}", rate=f"{sums['executed'] / (b + 1):.2f}",
                        target=f"{target:.2f}")
    n = max(1, steps_per_epoch)
    return {**{f"train_{k}": v / n for k, v in sums.items()}, "rate_target": target, "lr": lr}


def finetune(cfg: FinetuneConfig, progress: bool = True) -> Path:
    """Train (or resume) and return the run folder: ``last.pt``, ``log.jsonl`` (one record per epoch with the
    validation metrics of :func:`monitor`), ``config.json``, ``init/`` (the imported public weights)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_set, val_set, _ = load_data(cfg)
    net, _ = init_network(cfg, out)
    net = _prepare(net, cfg)
    opt = _optimizer(net, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_path = out / "last.pt"
    start = _resume(ckpt_path, net, opt, gen)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    gated_share = _gated_share(net)
    if start == 0 and not (out / "log.jsonl").is_file():
        record = {"epoch": 0, **monitor(net, val_set)}
        print(json.dumps(record), flush=True)
        (out / "log.jsonl").write_text(json.dumps(record) + "\n")
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        record = {"epoch": epoch + 1, **_run_epoch(net, opt, train_set, cfg, epoch, gen, gated_share, progress)}
        record["seconds"] = time.time() - t0
        record.update(monitor(net, val_set))
        print(json.dumps(record), flush=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        _save(ckpt_path, net, opt, epoch, gen)
    return out


# ------------------------------------------------------------------------------------ speed and precision
def measure_step_speed(cfg: FinetuneConfig, steps: int = 20, warmup: int = 3) -> dict:
    """Training images per second of :func:`finetune_step` (forward, backward, SGD step) on this machine with
    ``cfg``'s precision and memory format, on random data of the model's input size (the public weights are
    loaded, so the gates see real features). Returns ``{"img_per_s", "s_per_step", ...}``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    net, _ = init_network(cfg, Path(cfg.out_dir))
    net = _prepare(net, cfg).train()
    opt = _optimizer(net, cfg)
    gated_share = _gated_share(net)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (cfg.batch_size, *net.meta.input_size), dtype=torch.uint8, generator=gen)
    data = TensorDataset(images, torch.randint(0, net.meta.num_classes, (cfg.batch_size,), generator=gen),
                         net.meta.classes, [], "", "")
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        idx = torch.arange(cfg.batch_size)
        loss, _ = finetune_step(net, _batch(data, idx, net, cfg, gen), data.labels, cfg, 0.5, gated_share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"img_per_s": cfg.batch_size / med, "s_per_step": med, "s_per_step_min": float(min(times)),
            "s_per_step_max": float(max(times)), "steps": steps, "batch_size": cfg.batch_size,
            "threads": torch.get_num_threads(), "autocast_bf16": cfg.autocast_bf16, "channels_last": cfg.channels_last}


def compare_precision(cfg: FinetuneConfig, steps: int = 300, progress: bool = True) -> list[dict]:
    """Accuracy check of bf16 autocast + channels-last against float32: ``steps`` training steps of each from
    the same start (same weights, batches, augmentation and gate noise seeds, the schedule of a ``cfg.epochs``
    run), then both evaluated on the validation split (:func:`monitor`). One row per precision: validation
    metrics, seconds and images per second."""
    import dataclasses

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_set, val_set, _ = load_data(cfg)
    rows = []
    for bf16 in (False, True):
        run = dataclasses.replace(cfg, autocast_bf16=bf16)
        torch.manual_seed(cfg.seed)
        net, _ = init_network(run, Path(cfg.out_dir))
        net = _prepare(net, run)
        opt, gen, gated_share = _optimizer(net, run), torch.Generator().manual_seed(cfg.seed), _gated_share(net)
        total = math.ceil(len(train_set) / cfg.batch_size) * cfg.epochs
        net.train()
        t0 = time.time()
        order = list(batches(len(train_set), cfg.batch_size, True, gen))[:steps]
        for step, idx in enumerate(tqdm(order, desc=f"{'bf16' if bf16 else 'fp32'} steps", disable=not progress)):
            _set_lr(opt, one_cycle_lr(step, total, cfg.lr, cfg.warmup))
            x = _batch(train_set, idx, net, run, gen)
            loss, _ = finetune_step(net, x, train_set.labels[idx], run, rate_target(step / total, cfg), gated_share)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time.time() - t0
        rows.append({"precision": "bf16 autocast" if bf16 else "float32", "channels_last": cfg.channels_last,
                     "steps": len(order),
                     "seconds": seconds, "img_per_s": len(order) * cfg.batch_size / seconds,
                     **monitor(net, val_set)})
    return rows
