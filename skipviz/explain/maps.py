"""Attribution maps (Captum) of the full and the skipped run of one input, and how much they differ
(``"gradcam"``, ``"integrated_gradients"``; see :mod:`skipviz.explain`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

from ..policies.base import Policy
from ..policies.simple import FrozenPolicy
from .importance import IMPORTANCE_METHODS, BlockImportance, _importance_values, _share
from .runs import RunDecisions, _check_one, _check_target, replica, run_decisions

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["Explanation", "MAP_DESCRIPTIONS", "MAP_METHODS", "MapComparison", "attribution_maps", "compare_maps",
           "explain"]

MAP_METHODS: tuple[str, ...] = ("gradcam", "integrated_gradients")


MAP_DESCRIPTIONS: dict[str, str] = {
    "gradcam": "Grad-CAM (Captum LayerGradCam) on the last feature map before the classifier, upsampled.",
    "integrated_gradients": "Integrated Gradients (Captum) on the input pixels from a black image, "
                            "|attribution| summed over colour channels.",
}


@dataclass(frozen=True)
class MapComparison:
    """How much two attribution maps differ: Spearman rank correlation over pixels (1 = same ranking) and
    the overlap of their top ``top_k`` fraction of pixels (1 = same most-attributed pixels)."""

    method: str
    spearman: float
    topk_overlap: float
    top_k: float


def compare_maps(a: np.ndarray, b: np.ndarray, top_k: float = 0.1, method: str = "") -> MapComparison:
    """Compare two (H, W) maps. Constant maps carry no ranking: both constant -> Spearman 1, one -> 0."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size} pixels")
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k is a fraction in (0, 1], got {top_k}")
    const_a, const_b = np.ptp(a) == 0, np.ptp(b) == 0
    if const_a or const_b:
        rho = 1.0 if (const_a and const_b) else 0.0
    else:
        rho = float(spearmanr(a, b).statistic)
        rho = 0.0 if math.isnan(rho) else rho
    k = max(1, int(round(top_k * a.size)))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return MapComparison(method=method, spearman=rho, topk_overlap=len(top_a & top_b) / k, top_k=top_k)


def _readout_layer(model: "SkipNetwork", exit_block: int | None) -> tuple[torch.nn.Module, str]:
    """The module whose *input* is the feature map the prediction is read from."""
    if exit_block is not None:
        return model.probe(exit_block), f"probe {exit_block} input ({model.block_names[exit_block]} output)"
    return model.head, "classifier head input (last feature map)"


def _map(model: "SkipNetwork", forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: int,
         method: str, exit_block: int | None, ig_steps: int) -> tuple[np.ndarray, str]:
    """(H, W) attribution map for one run (the caller holds the replica lock)."""
    if method == "gradcam":
        layer, where = _readout_layer(model, exit_block)
        cam = LayerGradCam(forward, layer).attribute(x, target=target, attribute_to_layer_input=True,
                                                     relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return cam[0, 0].cpu().numpy().astype(np.float64), where
    attr = IntegratedGradients(forward).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=ig_steps,
                                                  internal_batch_size=ig_steps)
    return attr.detach().abs().sum(1)[0].cpu().numpy().astype(np.float64), "input pixels"


@dataclass
class Explanation:
    """Full run vs skipped run of one image.

    ``maps[method]["full" | "skipped"]``: (H, W) float arrays; ``comparisons[method]``: :class:`MapComparison`;
    ``image``: (H, W, 3) float in [0, 1] for display; ``importance``: per-block importance on the full network
    with the policy's decisions; ``seconds``: wall time of each part.
    """

    target: int
    target_label: str
    full: RunDecisions
    skipped: RunDecisions
    image: np.ndarray
    maps: dict[str, dict[str, np.ndarray]]
    layers: dict[str, str]
    comparisons: dict[str, MapComparison]
    importance: BlockImportance | None
    seconds: dict[str, float]

    def summary(self) -> pd.DataFrame:
        """One row per map method: Spearman, top-k overlap, where the map was taken."""
        return pd.DataFrame([{"method": m, "spearman": c.spearman, "topk_overlap": c.topk_overlap,
                              "top_k": c.top_k, "layer": self.layers.get(m, "")}
                             for m, c in self.comparisons.items()])


def explain(net: "SkipNetwork", x: torch.Tensor, policy: Policy, target: int | None = None,
            methods: Sequence[str] = MAP_METHODS, importance: str | None = "taylor", ig_steps: int = 16,
            top_k: float = 0.1, n_steps: int = 8) -> Explanation:
    """Attribution maps of one image for the full run and the run under ``policy``, and their difference.

    Args:
        x: (1, 3, H, W) normalised image (or (3, H, W)).
        policy: the skipping policy (its decisions for this image are frozen for the attribution).
        target: the class explained in both runs (default: the full network's prediction), so the two maps
            answer the same question.
        methods: any of ``"gradcam"``, ``"integrated_gradients"``.
        importance: per-block importance method (see :func:`block_importance`) or ``None`` to leave it out.
        ig_steps: Integrated Gradients steps; top_k: fraction of pixels for the overlap.
    """
    unknown = [m for m in methods if m not in MAP_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown or no map methods {unknown or list(methods)}; choose from {', '.join(MAP_METHODS)}")
    if importance is not None and importance not in IMPORTANCE_METHODS:
        raise ValueError(f"unknown importance method {importance!r}; choose one of {', '.join(IMPORTANCE_METHODS)}")
    if ig_steps < 2:
        raise ValueError("ig_steps must be >= 2")
    x = _check_one(net, x)
    model, lock = replica(net)
    seconds: dict[str, float] = {}
    maps: dict[str, dict[str, np.ndarray]] = {}
    layers: dict[str, str] = {}
    comparisons: dict[str, MapComparison] = {}
    with lock:
        t0 = time.perf_counter()
        full = run_decisions(model, x, None)
        skipped = run_decisions(model, x, policy)
        t = _check_target(net, full.predicted_index if target is None else target)
        frozen = FrozenPolicy(skipped.executed, skipped.exit_block)
        runs = {"full": (model, None), "skipped": (lambda inp: model.run(inp, frozen).logits, skipped.exit_block)}
        seconds["decisions"] = time.perf_counter() - t0
        for m in methods:
            t0 = time.perf_counter()
            maps[m] = {}
            for run_name, (fwd, exit_block) in runs.items():
                maps[m][run_name], where = _map(model, fwd, x, t, m, exit_block, ig_steps)
                layers[m] = where if run_name == "full" else (layers[m] if where == layers[m] else
                                                               f"{layers[m]} / skipped: {where}")
            comparisons[m] = compare_maps(maps[m]["full"], maps[m]["skipped"], top_k, m)
            seconds[m] = time.perf_counter() - t0
        imp = None
        if importance is not None:
            t0 = time.perf_counter()
            values = _importance_values(model, x, t, importance, n_steps)
            imp = BlockImportance(method=importance, target=t, target_label=net.meta.classes[t],
                                  block_names=list(net.block_names), importance=values, share=_share(values),
                                  executed=skipped.executed, reasons=skipped.reasons,
                                  downsample=[b.downsample for b in net.blocks], policy=skipped.policy)
            seconds["importance"] = time.perf_counter() - t0
    image = net.meta.denormalize(x)[0].permute(1, 2, 0).cpu().numpy().astype(np.float64)
    seconds["total"] = sum(seconds.values())
    return Explanation(target=t, target_label=net.meta.classes[t], full=full, skipped=skipped, image=image,
                       maps=maps, layers=layers, comparisons=comparisons, importance=imp, seconds=seconds)


def attribution_maps(net: "SkipNetwork", x: torch.Tensor, policy: Policy, method: str = "gradcam",
                     target: int | None = None, ig_steps: int = 16,
                     top_k: float = 0.1) -> tuple[np.ndarray, np.ndarray, MapComparison]:
    """``(full map (H, W), skipped map (H, W), comparison)`` for one method; see :func:`explain`."""
    ex = explain(net, x, policy, target=target, methods=(method,), importance=None, ig_steps=ig_steps, top_k=top_k)
    return ex.maps[method]["full"], ex.maps[method]["skipped"], ex.comparisons[method]
