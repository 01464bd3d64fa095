"""Decision heads for a frozen backbone, trained by distillation from that same backbone's full network.

By default the backbone (stem, blocks, head) never changes: "full network" keeps meaning the published one
(a fine-tuned copy, ``backbone_lr > 0``, is described below). Trained:

* Gate heads, Gumbel-sigmoid with a straight-through estimator (:meth:`SkipNetwork.forward_train`), so a
  training step runs each gated block or bypasses it per input, as inference does. Loss: the KL divergence
  from the full network's class distribution (cached once per image and flip, :func:`teacher_logits`) to
  the skipped run's, plus a FLOPs-rate loss pulling the expected fraction of gated FLOPs executed towards
  ``target_rate`` (ramped down from 1 over ``rate_ramp`` of training). Labels are not used.
* Probe heads on detached block outputs, by the same KL from the full network (early exits, KL heatmaps).
* The plan head afterwards, from the trained gates' decisions (:func:`skipviz.train.fit_plan_head`).

The backbone is ``arch``'s published one (EfficientNet-Lite0 on Imagenette), or, with ``model``, a user's own
network (``model="timm:<name>"``, ``weights=PATH``: :mod:`skipviz.models.timm_wrap`) distilled on any folder of
images (:func:`skipviz.data.load_images`; class folders optional, labels never used for training).

With ``backbone_lr > 0`` a copy of the backbone trains with the heads (BatchNorm statistics kept at the
published ones): the loss adds KL(published || the copy's full run), so the copy's full network keeps the
published answers while it learns to be skipped. It ships as a second model (``<arch>.imagenet_tuned_gated``),
its operating points judged against the published network (:mod:`skipviz.training.distill_export`).

Deterministic at inference: a gate runs its block iff sigmoid(logit) >= threshold. Resumable: ``last.pt``
(weights-only loadable: head tensors, or every tensor for a fine-tuned copy, optimiser state, RNG states) after
every epoch.
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

from ..models._registry import create_model
from ..data import (IMAGENETTE_ENV, TensorDataset, batches, concat_datasets, imagenette_root, load_images,
                    load_imagenette, normalize, train_val_split)
from ..engine.network import SkipNetwork

__all__ = ["DistillConfig", "RESUME_FIELDS", "build_network", "check_resumable", "distill_heads", "head_state", "load_training_images", "split_train_val",
           "teacher_logits", "test_images", "trained_state", "with_extra_images"]

@dataclass
class DistillConfig:
    """A distillation run (:func:`distill_heads`). Which model and data, and where the run folder is:"""

    arch: str = "efficientnet_lite0"
    data_root: str | None = None  # an ImageFolder with train/ (default: imagenette_root())
    out_dir: str = "runs/efficientnet_lite0_heads"
    limit_train: int | None = None
    # schedule (AdamW on the heads, and on the backbone copy at backbone_lr when > 0; cosine learning rate)
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # the loss: KL(full || skipped) + top1_weight * CE(skipped, full's top-1)
    #           + rate_weight * (gated FLOPs executed - target)^2 + probe KL
    kl_weight: float = 1.0
    top1_weight: float = 0.5  # top-1 agreement is what a reviewer checks; the KL alone lets near-ties flip
    target_rate: float = 0.65  # fraction of the gated blocks' FLOPs executed, on average
    rate_weight: float = 2.0
    rate_ramp: float = 0.3  # the target falls from 1 to target_rate over this fraction of the steps
    gate_temperature: float = 1.0
    probe_weight: float = 0.5
    # validation split carved from train/ (seeded) and the per-epoch monitor on its first images
    val_size: int = 1000
    monitor_size: int = 500
    seed: int = 0
    # machine
    threads: int | None = None
    autocast_bf16: bool = True  # measured: fwd+bwd of a batch of 32 at 224x224 0.38-0.47 s vs 0.77-0.91 s fp32
    # a user's network instead of arch's published backbone (``skipviz train --model timm:<name>``); None: arch
    model: str | None = None  # "timm:<name>"
    weights: str | None = None  # the user's backbone weights file (required with model)
    model_kwargs: dict = field(default_factory=dict)  # to create_model: num_classes, classes, input_size, timm's
    val_fraction: float | None = None  # the validation split as a fraction of the images (instead of val_size)
    # more images to distil on, beyond the training split (labels never used; the validation split stays the
    # main data's): heads distilled on Imagenette alone learned its ten-class prior (benchmarks/ood_agreement.py)
    extra_images: str | None = None  # a folder of images, searched recursively
    extra_limit: int | None = None  # a seeded choice of this many of them
    # a jointly fine-tuned copy of the backbone (0: the backbone stays exactly the published one). The copy
    # trains at this learning rate (AdamW, BatchNorm statistics kept frozen at the published ones) and is kept
    # close to the published network by full_kl_weight * KL(published || fine-tuned full run)
    backbone_lr: float = 0.0
    full_kl_weight: float = 1.0


def build_network(cfg: DistillConfig) -> SkipNetwork:
    """The published (or the user's) backbone with untrained gate and probe heads (the plan head is fitted at
    export); training freezes it unless ``cfg.backbone_lr > 0``."""
    if cfg.model is None:
        return create_model(cfg.arch, plan=False)
    if not cfg.weights:
        raise ValueError(f"{cfg.model}: heads are distilled from your trained network: give its weights file")
    return create_model(cfg.model, weights=cfg.weights, gates=True, probes=True, plan=False, **cfg.model_kwargs)


def _image_dir(root: str | Path, split: str) -> Path:
    """``root/split`` when ``root`` is an ImageFolder with ``train/`` (and ``val/``), else ``root`` itself for
    the training images (a plain folder of images)."""
    root = Path(root)
    return root / split if (root / "train").is_dir() else root


def load_training_images(cfg: DistillConfig, net: SkipNetwork, root: str | Path, progress: bool = True) -> TensorDataset:
    """The images the heads are distilled on: Imagenette's ``train/`` for ``arch``, else every image of
    ``root/train`` (or ``root``) cropped as ``net``'s preprocessing does, labelled where its folders name classes."""
    if cfg.model is None:
        return load_imagenette(root, "train", progress)
    meta = net.meta
    return load_images(_image_dir(root, "train"), tuple(meta.input_size[-2:]), meta.resize, meta.classes, progress)


def test_images(cfg: DistillConfig, net: SkipNetwork, root: str | Path) -> TensorDataset | None:
    """The held-out split the card reports on: Imagenette's ``val/`` for ``arch``, else ``root/val`` when
    ``root`` is an ImageFolder with ``train/`` and ``val/``; ``None`` when there is none."""
    if cfg.model is None:
        return load_imagenette(root, "val", progress=False)
    root = Path(root)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        return None
    meta = net.meta
    return load_images(root / "val", tuple(meta.input_size[-2:]), meta.resize, meta.classes, progress=False)


def split_train_val(cfg: DistillConfig, full: TensorDataset) -> tuple[TensorDataset, TensorDataset]:
    """The seeded validation split carved from the training images (``val_size`` images, or ``val_fraction``
    of them) and the rest."""
    n_val = cfg.val_size if cfg.val_fraction is None else max(1, int(round(len(full) * cfg.val_fraction)))
    if n_val >= len(full):
        raise ValueError(f"{len(full)} images cannot give a validation split of {n_val}: lower val_size")
    tr_idx, val_idx = train_val_split(len(full), n_val, cfg.seed)
    return full.subset(tr_idx), full.subset(val_idx)


def with_extra_images(cfg: DistillConfig, net: SkipNetwork, train_set: TensorDataset,
                      progress: bool = True) -> TensorDataset:
    """``train_set`` plus ``cfg.extra_images`` (``extra_limit`` of them, seeded by ``cfg.seed``), cropped as
    ``net``'s preprocessing does, unlabelled (-1); ``train_set`` itself without extra images."""
    if not cfg.extra_images:
        return train_set
    meta = net.meta
    extra = load_images(cfg.extra_images, tuple(meta.input_size[-2:]), meta.resize, None, progress,
                        limit=cfg.extra_limit, seed=cfg.seed)  # no classes given: every label -1
    return concat_datasets(train_set, extra, f"extra:{Path(cfg.extra_images).name}")


def trained_state(net: SkipNetwork, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """What a run trains: the heads' tensors, or every tensor when the backbone is fine-tuned too."""
    if cfg.backbone_lr > 0:
        return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return head_state(net)


def head_state(net: SkipNetwork) -> dict[str, torch.Tensor]:
    """The trainable part of ``net``: its gate, probe and plan heads' tensors (state-dict keys)."""
    from ..engine.heads import HEAD_PREFIXES

    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if k.startswith(HEAD_PREFIXES)}


@torch.no_grad()
def teacher_logits(net: SkipNetwork, data: TensorDataset, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """The full network's logits for every image and its mirror image: (2, N, K) float32 (index 1 flipped)."""
    net.eval()
    out = []
    for flip in (False, True):
        rows = []
        for i in tqdm(range(0, len(data), batch_size), desc=f"teacher{' (flipped)' if flip else ''}",
                      disable=not progress):
            x = data.images[i: i + batch_size]
            x = normalize(x.flip(3) if flip else x, net.meta.mean, net.meta.std)
            rows.append(net(x).float())
        out.append(torch.cat(rows))
    return torch.stack(out)


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the batch, from logits (N, K)."""
    return F.kl_div(F.log_softmax(student.float(), 1), F.log_softmax(teacher.float(), 1), log_target=True,
                    reduction="batchmean")


def _rate(progress: float, cfg: DistillConfig) -> float:
    return cfg.target_rate if progress >= cfg.rate_ramp else 1.0 - (1.0 - cfg.target_rate) * progress / cfg.rate_ramp


@torch.no_grad()
def _monitor(net: SkipNetwork, data: TensorDataset, teacher_pred: torch.Tensor, full_too: bool = False) -> dict:
    """Gates at 0.5 on the monitor images: agreement with the published network (``teacher_pred`` (N,)),
    accuracy, FLOPs cut; with ``full_too`` (a fine-tuned copy) its full run's agreement and accuracy as well."""
    from ..evaluate import evaluate_policy
    from ..policies import FullPolicy, GatePolicy

    net.eval()
    ev = evaluate_policy(net, data, GatePolicy(0.5), batch_size=100)
    out = {"val_agreement_t0.5": float((torch.from_numpy(ev.predictions) == teacher_pred).float().mean()),
           "val_accuracy_t0.5": ev.accuracy, "val_flops_saved_t0.5": ev.flops_saved_fraction}
    if full_too:
        full = evaluate_policy(net, data, FullPolicy(), batch_size=100)
        out.update({"val_full_agreement": float((torch.from_numpy(full.predictions) == teacher_pred).float().mean()),
                    "val_full_accuracy": full.accuracy})
    return out


def _train_mode(net: SkipNetwork) -> None:
    """Backbone in eval mode (its BatchNorm statistics stay the published ones), heads in train mode."""
    net.eval()
    net.gates.train()
    if net.probes is not None:
        net.probes.train()


@dataclass
class _DistillRun:
    """Everything a training step reads: the network, the training split and its cached teacher logits
    (2, N, K), the optimiser and generator, each gated block's share of the gated FLOPs (G,), and the monitor
    images with the full network's predictions on them."""

    net: SkipNetwork
    train_set: TensorDataset
    teacher: torch.Tensor
    opt: torch.optim.Optimizer
    gen: torch.Generator
    gated_share: torch.Tensor
    monitor_set: TensorDataset
    monitor_pred: torch.Tensor
    start_epoch: int = 0


def _prepare(cfg: DistillConfig, out: Path, progress: bool) -> _DistillRun:
    """Data, network with trainable heads (and backbone copy, with ``backbone_lr``), teacher cache, optimiser;
    resumed from ``last.pt`` if any. The teacher logits and the monitor's predictions are computed before
    ``last.pt`` is loaded, so they are always the published network's, never a fine-tuned copy's."""
    root = cfg.data_root or (imagenette_root() if cfg.model is None else None)
    if root is None:
        raise FileNotFoundError(f"Imagenette not found: set {IMAGENETTE_ENV} to an ImageFolder root with train/"
                                if cfg.model is None else f"{cfg.model}: give the folder of images to distil on")
    torch.manual_seed(cfg.seed)
    if cfg.model is None:  # the published backbone: data first, then the heads' random init (as always)
        full = load_imagenette(root, "train", progress)
        net = build_network(cfg)
    else:  # the images are cropped as the user's network wants them
        net = build_network(cfg)
        full = load_training_images(cfg, net, root, progress)
    train_set, val_set = split_train_val(cfg, full)
    if cfg.limit_train:
        train_set = train_set.subset(np.arange(min(cfg.limit_train, len(train_set))))
    train_set = with_extra_images(cfg, net, train_set, progress)
    for p in net.parameters():
        p.requires_grad_(False)
    params = list(net.gates.parameters()) + (list(net.probes.parameters()) if net.probes is not None else [])
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": params, "lr_mult": 1.0}]
    if cfg.backbone_lr > 0:
        head_ids = {id(p) for p in params}
        backbone = [p for p in net.parameters() if id(p) not in head_ids]
        for p in backbone:
            p.requires_grad_(True)
        groups.append({"params": backbone, "lr_mult": cfg.backbone_lr / cfg.lr})
    cache = out / "teacher.pt"
    cached = torch.load(cache, weights_only=True) if cache.is_file() else None
    if cached is not None and cached.get("files_sha256") == train_set.files_sha256:
        teacher = cached["logits"]
    else:  # none yet, or cached for other images (e.g. a run given extra images after it started)
        teacher = teacher_logits(net, train_set, progress=progress)
        torch.save({"logits": teacher, "files_sha256": train_set.files_sha256}, cache)
    monitor_set = val_set.subset(np.arange(min(cfg.monitor_size, len(val_set))))
    table = net.flop_table(tuple(net.meta.input_size[-2:]))
    gated_flops = torch.tensor([float(table.blocks[i]) for i in net.gated_blocks])
    run = _DistillRun(net, train_set, teacher, torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay),
                      torch.Generator().manual_seed(cfg.seed), gated_flops / gated_flops.sum(), monitor_set,
                      teacher_logits(net, monitor_set, progress=False)[0].argmax(1))
    ckpt_path = out / "last.pt"
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=True)
        net.load_state_dict(ckpt["heads"], strict=False)  # every tensor for a fine-tuned backbone
        run.opt.load_state_dict(ckpt["optimizer"])
        run.gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        run.start_epoch = int(ckpt["epoch"]) + 1
        print(f"resumed from {ckpt_path} at epoch {run.start_epoch}")
    return run


def _step(run: _DistillRun, cfg: DistillConfig, idx: torch.Tensor,
          target: float) -> tuple[float, float, float, float]:
    """One optimiser step on the training images ``idx`` (B,), each flipped at random with its teacher.
    Returns (KL, gated FLOPs executed, probe KL, full KL) of the batch; the full KL (published || fine-tuned
    full run) is 0 for a frozen backbone."""
    flip = torch.rand(len(idx), generator=run.gen) < 0.5
    imgs = run.train_set.images[idx]
    imgs = torch.where(flip[:, None, None, None], imgs.flip(3), imgs)
    t_logits = torch.where(flip[:, None], run.teacher[1, idx], run.teacher[0, idx])
    x = normalize(imgs, run.net.meta.mean, run.net.meta.std)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
        logits, gate_probs, probe_logits = run.net.forward_train(x, cfg.gate_temperature, hard=True)
    kl = _kl(t_logits, logits)
    top1 = F.cross_entropy(logits.float(), t_logits.argmax(1))
    executed = (gate_probs.float() * run.gated_share).sum(1).mean()
    probe = sum(_kl(t_logits, p) for p in probe_logits) / max(1, len(probe_logits))
    loss = cfg.kl_weight * kl + cfg.top1_weight * top1 + cfg.rate_weight * (executed - target) ** 2 + cfg.probe_weight * probe
    full_kl = torch.zeros(())
    if cfg.backbone_lr > 0:  # the fine-tuned copy's full network stays the published one's answer
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            full_logits, _, _ = run.net.forward_train(x, force_full=True)
        full_kl = _kl(t_logits, full_logits)
        loss = loss + cfg.full_kl_weight * full_kl
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    return float(kl.detach()), float(executed.detach()), float(probe.detach()), float(full_kl.detach())


def _train_epoch(run: _DistillRun, cfg: DistillConfig, epoch: int, progress: bool) -> dict:
    """One pass over the training split (cosine learning rate, ramped rate target); the epoch's log record."""
    _train_mode(run.net)
    t0 = time.time()
    steps_per_epoch = math.ceil(len(run.train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sums, seen = np.zeros(4), 0
    bar = tqdm(list(batches(len(run.train_set), cfg.batch_size, True, run.gen)),
               desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
    for b, idx in enumerate(bar):
        step = epoch * steps_per_epoch + b
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        for g in run.opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        target = _rate(step / total, cfg)
        sums += np.asarray(_step(run, cfg, idx, target)) * len(idx)
        seen += len(idx)
        bar.set_postfix(kl=f"{sums[0] / seen:.3f}", rate=f"{sums[1] / seen:.2f}", target=f"{target:.2f}")
    return {"epoch": epoch + 1, "train_kl": sums[0] / seen, "train_probe_kl": sums[2] / seen,
            "train_gated_flops_executed": sums[1] / seen, "train_full_kl": sums[3] / seen, "rate_target": target, "lr": lr,
            "seconds": time.time() - t0}


#: What a resumed run must share with the run that wrote its ``last.pt``: another value would train another kind of
#: model (heads only against a whole network) or silently keep the saved optimiser's rates.
RESUME_FIELDS = ("arch", "model", "weights", "backbone_lr", "full_kl_weight", "lr")


def check_resumable(cfg: DistillConfig, out: Path) -> None:
    """Refuse to resume ``out/last.pt`` under a configuration that differs in :data:`RESUME_FIELDS` from the
    one saved beside it (``ValueError`` naming the field and the way out)."""
    saved_path = out / "config.json"
    if not ((out / "last.pt").is_file() and saved_path.is_file()):
        return
    saved = json.loads(saved_path.read_text())
    for name in RESUME_FIELDS:
        if name in saved and saved[name] != getattr(cfg, name):
            raise ValueError(f"{out} holds a run with {name}={saved[name]!r}, not {getattr(cfg, name)!r}: resuming "
                             "it would mix the two; give another run folder (--out)")


def distill_heads(cfg: DistillConfig, progress: bool = True) -> Path:
    """Train (or resume) the gate and probe heads of ``cfg.arch`` over its published backbone, frozen or (with
    ``backbone_lr``) a fine-tuned copy (or of ``cfg.model`` over the user's frozen network); returns the run
    folder (``last.pt``, ``log.jsonl``, ``config.json``, ``teacher.pt``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(cfg, out)
    run = _prepare(cfg, out, progress)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    for epoch in range(run.start_epoch, cfg.epochs):
        record = _train_epoch(run, cfg, epoch, progress)
        record.update(_monitor(run.net, run.monitor_set, run.monitor_pred, full_too=cfg.backbone_lr > 0))
        print(json.dumps(record), flush=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tmp = out / "last.pt.tmp"
        torch.save({"heads": trained_state(run.net, cfg), "optimizer": run.opt.state_dict(), "epoch": epoch,
                    "generator": run.gen.get_state(), "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(out / "last.pt")
    return out
