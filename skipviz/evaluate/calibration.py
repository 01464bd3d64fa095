"""The calibration sweep behind the dashboard's Thresholds page: a small fixed image set, one point per
threshold (accuracy, agreement with the full network, measured latency, FLOPs), the Pareto front."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import (TensorDataset, cifar10_root, file_list_sha256, imagenet_labels, imagenette_root, load_split,
                    load_validation_subset, normalize)
from ..measure.clock import device_label
from ..policies.base import Override, Policy, normalise_overrides
from ..policies.simple import FullPolicy
from ..policies.threshold import make_policy
from .loop import run_images

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["CalibrationPoint", "CalibrationSet", "CalibrationSweep", "calibration_dataset", "load_card_test_set",
           "calibration_summary", "compare_points", "evaluate_calibration", "generated_images", "load_calibration",
           "pareto_mask", "sweep_calibration", "threshold_grid"]


@dataclass
class CalibrationSet:
    """A small fixed image set: ``images`` (N, 3, H, W) uint8, ``labels`` (N,) long.

    ``labelled`` is False for generated images, whose "labels" are the full network's predictions (so the
    accuracy shown is agreement with full).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str
    labelled: bool

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def generated_images(n: int, hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Seeded smooth random colour images: (n, 3, H, W) uint8 (bicubic upsampled 4x4 noise plus shapes)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=hw, mode="bicubic", align_corners=False)
    img = img + 0.15 * torch.randn(n, 3, *hw, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def _card_data(net: "SkipNetwork") -> tuple[Path | None, str, str, Callable[[TensorDataset], TensorDataset | None]] | None:
    """Where this model's data lives on this machine: ``(root, test split, name, fit)``, for a CIFAR-10 model
    (32x32, 10 classes) or an ImageNet-1k model whose card was made on Imagenette; else ``None``. ``fit`` maps a
    loaded split onto the model's labels, or gives ``None`` when its classes are not the model's."""
    hw, k = tuple(net.meta.input_size[-2:]), len(net.meta.classes)
    dataset = str(((net.meta.card or {}).get("dataset") or {}).get("name", ""))
    if hw == (32, 32) and k == 10:
        classes = list(net.meta.classes)
        return cifar10_root(), "test", "CIFAR-10", lambda d: d if d.classes == classes else None
    if k == 1000 and "imagenette" in dataset.lower():
        return imagenette_root(), "val", "Imagenette", imagenet_labels
    return None


def load_card_test_set(net: "SkipNetwork", progress: bool = True) -> tuple[TensorDataset, str]:
    """The held-out split the model card reports on (CIFAR-10 ``test/`` or Imagenette ``val/``, labels in the
    model's class order) and its name; ``FileNotFoundError`` naming the environment variable when it is not on
    this machine, ``ValueError`` when the model's card records no data set SkipViz can rebuild."""
    found = _card_data(net)
    if found is None:
        raise ValueError(f"{net.meta.arch}: the model card names no data set SkipViz can rebuild (CIFAR-10, Imagenette)")
    root, split, name, fit = found
    if root is None:
        raise FileNotFoundError(f"{name} is not on this machine: set {'SKIPVIZ_CIFAR10' if name == 'CIFAR-10' else 'SKIPVIZ_IMAGENETTE'}")
    data = fit(load_split(root, split, size=tuple(net.meta.input_size[-2:]), progress=progress))
    if data is None:
        raise ValueError(f"{root}/{split}: its classes are not the model's")
    return data, f"{name} {split}/"


def load_calibration(net: "SkipNetwork", n: int = 256, seed: int = 0) -> CalibrationSet:
    """The images thresholds are tuned on, when the model's data set (CIFAR-10, or Imagenette for an ImageNet
    model) is on this machine: ``n`` images (seeded choice) of the validation split the model card records
    (carved from ``train/``, as the card's default thresholds were chosen), or, when the card records none or
    its split cannot be rebuilt here, ``n`` test images, the description saying why. Else ``n`` generated
    images labelled by the full network."""
    hw = tuple(net.meta.input_size[-2:])
    found = _card_data(net)
    if found is not None and found[0] is not None:
        root, test_split, name, relabel = found
        validation = net.meta.card_validation_split()
        why = "the model card records no validation split"
        if validation is not None:
            try:
                val = load_validation_subset(root, validation, n, seed, size=hw)
                val = relabel(val) if val is not None else None
            except (OSError, RuntimeError, ValueError):
                val = None
            if val is not None:
                return CalibrationSet(val.images, val.labels, list(net.meta.classes),
                                      f"{name} validation subset (the model card's split, carved from train/): "
                                      f"{len(val)} images (seed {seed})", True)
            why = "the model card's validation split cannot be rebuilt from this machine's train/"
        try:
            split = relabel(load_split(root, test_split, size=hw, progress=False))
            if split is None:
                raise ValueError("the test split's classes are not the model's")
            idx = np.sort(np.random.default_rng(seed).choice(len(split), size=min(n, len(split)), replace=False))
            sub = split.subset(idx)
            return CalibrationSet(sub.images, sub.labels, list(net.meta.classes),
                                  f"{name} {test_split} subset: {len(sub)} images (seed {seed}; {why})", True)
        except (OSError, RuntimeError, ValueError):
            pass
    images = generated_images(n, hw, seed)
    with torch.no_grad():
        dev = next(net.parameters()).device
        labels = net(normalize(images.to(dev), net.meta.mean, net.meta.std)).argmax(1).cpu()
    return CalibrationSet(images, labels, list(net.meta.classes),
                          f"generated images: {n} seeded random images (no data set on this machine); labels are "
                          "the full network's predictions, so accuracy = agreement with full", False)


@dataclass
class CalibrationPoint:
    """One policy over the calibration set.

    ``predictions`` (N,), ``executed`` (N, L) bool; ``latency_ms``: measured wall time per image of the batched
    skipped run; ``flops_fraction``: mean FLOPs executed / full.
    """

    policy: dict
    accuracy: float
    agreement: float
    latency_ms: float
    flops_fraction: float
    predictions: np.ndarray
    executed: np.ndarray
    threshold: float | None = None
    predicted_latency_ms: float | None = None

    @property
    def skip_rate(self) -> np.ndarray:
        """(L,) fraction of inputs that bypassed each block."""
        return 1.0 - self.executed.mean(0)


@torch.no_grad()
def evaluate_calibration(net: "SkipNetwork", calib: CalibrationSet, policy: Policy,
                         reference: np.ndarray | None = None, batch_size: int = 256) -> CalibrationPoint:
    """Run ``policy`` over the calibration set with the real skipping engine, timing it
    (:func:`~skipviz.evaluate.loop.run_images`).

    ``reference``: (N,) the full network's predictions (agreement is 1.0 when omitted and the policy is full).
    """
    runs = run_images(net, calib.images, policy, batch_size, timed=True)
    full_flops = net.flop_table(tuple(calib.images.shape[-2:])).full
    p = runs.predictions
    ref = p if reference is None else reference
    return CalibrationPoint(policy=policy.config(), accuracy=float((p == calib.labels.numpy()).mean()),
                            agreement=float((p == ref).mean()), latency_ms=1e3 * runs.seconds / len(calib),
                            flops_fraction=float(runs.flops.double().mean() / full_flops), predictions=p,
                            executed=runs.executed, threshold=getattr(policy, "threshold", None))


def threshold_grid(step: float = 0.05) -> list[float]:
    """The slider's values: 0, step, ..., 1 (rounded so keys match the slider exactly)."""
    n = int(round(1.0 / step))
    return [round(i * step, 4) for i in range(n + 1)]


@dataclass
class CalibrationSweep:
    """The precomputed Thresholds-page data: the full network and one point per grid threshold (no overrides),
    plus a lock-guarded memo of points for policies with overrides (computed on demand)."""

    calib: CalibrationSet
    full: CalibrationPoint
    points: dict[float, CalibrationPoint]
    device: str
    source: str = "gates"  # the decision source of every point (see :func:`~skipviz.policies.threshold.make_policy`)
    _memo: dict[str, CalibrationPoint] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def frame(self) -> pd.DataFrame:
        """One row per grid threshold: accuracy, agreement, latency, FLOPs fraction."""
        return pd.DataFrame([{"threshold": t, "accuracy": p.accuracy, "agreement with full": p.agreement,
                              "latency ms/image": p.latency_ms, "predicted ms/image": p.predicted_latency_ms,
                              "FLOPs fraction": p.flops_fraction, "blocks run (mean)": float(p.executed.sum(1).mean())}
                             for t, p in sorted(self.points.items())])

    def point_for(self, net: "SkipNetwork", threshold: float, overrides: Mapping[int, Override] | None = None,
                  batch_size: int = 256) -> CalibrationPoint:
        """The precomputed point for a grid threshold without overrides, else computed once and memoised."""
        ov = normalise_overrides(overrides, auto=True)
        t = round(float(threshold), 4)
        if not ov and t in self.points:
            return self.points[t]
        key = json.dumps({"t": t, "ov": {str(k): v for k, v in sorted(ov.items())}})
        with self._lock:
            if key not in self._memo:
                self._memo[key] = evaluate_calibration(net, self.calib, make_policy(net, t, ov, self.source),
                                                       self.full.predictions, batch_size)
            return self._memo[key]


def sweep_calibration(net: "SkipNetwork", calib: CalibrationSet, thresholds: Sequence[float] | None = None,
                      progress: Callable[[float, str], None] | None = None, batch_size: int = 256,
                      source: str = "gates") -> CalibrationSweep:
    """Precompute the full network and every grid threshold over the calibration set (``progress(frac, text)``),
    decisions from ``source`` (see :func:`~skipviz.policies.threshold.make_policy`)."""
    thresholds = list(thresholds) if thresholds is not None else threshold_grid()
    total = len(thresholds) + 1
    if progress:
        progress(0.0, "full network")
    full = evaluate_calibration(net, calib, FullPolicy(), None, batch_size)
    points = {}
    for k, t in enumerate(thresholds, start=1):
        if progress:
            progress(k / total, f"threshold {t:.2f}")
        points[round(float(t), 4)] = evaluate_calibration(net, calib, make_policy(net, t, source=source),
                                                          full.predictions, batch_size)
    if progress:
        progress(1.0, "done")
    return CalibrationSweep(calib=calib, full=full, points=points, device=device_label(next(net.parameters()).device),
                            source=source)


def pareto_mask(latency: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
    """(P,) bool: points not dominated (no other point is at least as fast and strictly more accurate, or
    strictly faster and at least as accurate)."""
    lat, acc = np.asarray(latency, float), np.asarray(accuracy, float)
    keep = np.ones(len(lat), dtype=bool)
    for i in range(len(lat)):
        dominated = ((lat <= lat[i]) & (acc >= acc[i]) & ((lat < lat[i]) | (acc > acc[i])))
        keep[i] = not dominated.any()
    return keep


def calibration_summary(point: CalibrationPoint, full: CalibrationPoint) -> pd.DataFrame:
    """Current setting vs full network over the calibration set, one row each."""
    rows = []
    for name, p in (("current", point), ("full", full)):
        rows.append({"run": name, "accuracy": p.accuracy, "agreement with full": p.agreement,
                     "latency ms/image": p.latency_ms, "FLOPs fraction": p.flops_fraction,
                     "blocks run (mean)": float(p.executed.sum(1).mean())})
    return pd.DataFrame(rows)


def compare_points(points: Mapping[str, CalibrationPoint]) -> pd.DataFrame:
    """Several policies over the same calibration set: accuracy, agreement, FLOPs cut, measured latency."""
    return pd.DataFrame([{"policy": name, "accuracy": p.accuracy, "agreement with full": p.agreement,
                          "FLOPs cut": 1.0 - p.flops_fraction, "latency ms/image": p.latency_ms,
                          "blocks run (mean)": float(p.executed.sum(1).mean())} for name, p in points.items()])


def calibration_dataset(calib: CalibrationSet):
    """The calibration set as a :class:`skipviz.data.TensorDataset` (for the redundancy/audit functions)."""
    files = [f"calibration/{i}" for i in range(len(calib))]
    return TensorDataset(calib.images, calib.labels, calib.classes, files, calib.source, file_list_sha256(files))
