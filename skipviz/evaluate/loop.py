"""Accuracy and compute of a policy over a data set, and threshold curves (threshold -> accuracy, FLOPs cut).

:func:`run_images` is the one loop that runs a policy over an image set with the real skipping engine; the
evaluation here (:func:`evaluate_policy`) and the dashboard's calibration sweep
(:mod:`skipviz.evaluate.calibration`) both read their numbers from it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..data import TensorDataset, normalize
from ..measure.clock import synchronize
from ..policies.base import Policy
from ..policies.simple import EarlyExitPolicy, FullPolicy
from ..policies.threshold import GatePolicy

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["ImageRuns", "PolicyEval", "agreement_margin_words", "agreement_meets", "blocks_by_outcome", "curve_row",
           "early_exit_policy", "evaluate_policy", "operating_point", "pick_threshold", "run_images",
           "threshold_curve", "within_drop"]


@dataclass
class ImageRuns:
    """A policy run over N images: ``predictions`` (N,) and ``executed`` (N, L) numpy arrays, ``flops`` (N,) the
    FLOPs each image spent (a tensor), ``seconds`` the wall time of the engine's runs (0 when not timed)."""

    predictions: np.ndarray
    executed: np.ndarray
    flops: torch.Tensor
    seconds: float


@torch.no_grad()
def run_images(net: "SkipNetwork", images: torch.Tensor, policy: Policy, batch_size: int,
               device: torch.device | str | None = None, progress: bool = False, timed: bool = False) -> ImageRuns:
    """Run ``policy`` over ``images`` (N, 3, H, W) uint8 in batches of ``batch_size`` (normalised with the model's
    mean and std) with the real skipping engine. ``timed``: each run is timed on the host clock, the device
    synchronised around it."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    preds, executed, flops, elapsed = [], [], [], 0.0
    for i in tqdm(range(0, len(images), batch_size), desc=policy.name, disable=not progress, leave=False):
        x = normalize(images[i: i + batch_size].to(device), net.meta.mean, net.meta.std)
        if timed:
            synchronize(device)
        t0 = time.perf_counter()
        res = net.run(x, policy)
        if timed:
            synchronize(device)
            elapsed += time.perf_counter() - t0
        preds.append(res.logits.argmax(1).cpu())
        executed.append(res.executed)
        flops.append(res.flops_executed())
    return ImageRuns(torch.cat(preds).numpy(), torch.cat(executed).numpy(), torch.cat(flops), elapsed)


@dataclass
class PolicyEval:
    """One policy over one data set. Arrays: ``predictions``/``labels``/``flops`` (N,), ``executed`` (N, L)."""

    policy: dict
    predictions: np.ndarray
    labels: np.ndarray
    executed: np.ndarray
    flops: np.ndarray
    flops_full: int

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def flops_mean(self) -> float:
        return float(self.flops.mean())

    @property
    def flops_saved_fraction(self) -> float:
        return 1.0 - self.flops_mean / self.flops_full

    @property
    def blocks_mean(self) -> float:
        return float(self.executed.sum(1).mean())

    def agreement(self, other: "PolicyEval") -> float:
        return float((self.predictions == other.predictions).mean())

    def summary(self, reference: "PolicyEval | None" = None) -> dict:
        out = {"policy": self.policy, "accuracy": self.accuracy, "flops_mean": self.flops_mean,
               "flops_full": self.flops_full, "flops_saved_fraction": self.flops_saved_fraction,
               "blocks_mean": self.blocks_mean, "n": int(len(self.labels))}
        if reference is not None:
            out["agreement_with_full"] = self.agreement(reference)
            out["accuracy_drop_points"] = 100.0 * (reference.accuracy - self.accuracy)
        return out


@torch.no_grad()
def evaluate_policy(net: "SkipNetwork", data: TensorDataset, policy: Policy, batch_size: int = 500,
                    device: torch.device | str | None = None, progress: bool = False) -> PolicyEval:
    """Run ``policy`` over every image of ``data`` with the real skipping engine."""
    runs = run_images(net, data.images, policy, batch_size, device, progress)
    return PolicyEval(policy=policy.config(), predictions=runs.predictions, labels=data.labels.numpy(),
                      executed=runs.executed, flops=runs.flops.numpy(),
                      flops_full=net.flop_table(tuple(data.images.shape[-2:])).full)


def threshold_curve(net: "SkipNetwork", data: TensorDataset, thresholds: Sequence[float],
                    make_policy: Callable[[float], Policy] = GatePolicy, reference: PolicyEval | None = None,
                    batch_size: int = 500, progress: bool = False) -> tuple[pd.DataFrame, list[PolicyEval]]:
    """Accuracy and FLOPs cut at each threshold. Returns (table, the per-threshold evaluations)."""
    reference = reference or evaluate_policy(net, data, FullPolicy(), batch_size)
    rows, evals = [], []
    for t in tqdm(thresholds, desc="thresholds", disable=not progress):
        ev = evaluate_policy(net, data, make_policy(float(t)), batch_size)
        evals.append(ev)
        rows.append({"threshold": float(t), **{k: v for k, v in ev.summary(reference).items() if k != "policy"}})
    return pd.DataFrame(rows), evals


def early_exit_policy(t: float) -> Policy:
    return EarlyExitPolicy(t)


def within_drop(drop_points, max_drop_points: float):
    """Whether an accuracy drop (points; a float or a Series) meets the bound: a drop of exactly the bound (10 of
    1,000 images for 1 point) does, whatever the float arithmetic of ``100 * (a - b)`` makes of it."""
    return drop_points <= max_drop_points + 1e-9


def agreement_meets(agreement, n, min_agreement: float, margin_se: float = 0.0):
    """Whether a top-1 agreement measured on ``n`` inputs (floats, or Series of both) meets ``min_agreement``
    with ``margin_se`` standard errors to spare: the lower end of the agreement's Wilson score interval at
    ``z = margin_se`` must reach the bound (``margin_se`` 0: the measured agreement itself).

    Why a margin: a bound near the ceiling is close to the validation split's noise. On 1,000 images an agreement
    of 99.1 % is 9 changed answers with a standard error of 0.3 points; the shipped ImageNet exits chosen at that
    estimate kept 98.6 % on the 3,025 test photos."""
    if margin_se <= 0:
        return agreement >= min_agreement - 1e-12
    if n is None:
        raise ValueError("a margin in standard errors needs the number of inputs the agreement was measured on")
    from scipy.stats import binomtest, norm

    level = 2 * norm.cdf(margin_se) - 1  # two-sided level whose lower end is one-sided at z = margin_se

    def low(a: float, m: float) -> float:
        k, m = int(round(float(a) * float(m))), int(m)
        return float(binomtest(k, m).proportion_ci(confidence_level=level, method="wilson").low) if m else 0.0

    if isinstance(agreement, pd.Series):
        counts = n if isinstance(n, pd.Series) else pd.Series(n, index=agreement.index)
        return pd.Series([low(a, m) for a, m in zip(agreement, counts)], index=agreement.index) >= min_agreement - 1e-12
    return low(agreement, n) >= min_agreement - 1e-12


def agreement_margin_words(margin_se: float) -> str:
    """How a card's rule says :func:`agreement_meets`'s margin (empty without one)."""
    if margin_se <= 0:
        return ""
    return f", at the lower end of its Wilson interval at {margin_se:g} standard error{'s' if margin_se != 1 else ''}"


def operating_point(curve: pd.DataFrame, max_drop_points: float | None = None, min_agreement: float | None = None,
                    margin_se: float = 0.0, cutting_only: bool = False,
                    by: str = "flops_saved_fraction") -> float | None:
    """The threshold of ``curve`` (rows: threshold, flops_saved_fraction, accuracy_drop_points,
    agreement_with_full, n) with the largest FLOPs cut (or the largest value of column ``by``, e.g. a predicted
    time saved) meeting the bounds: accuracy drop <= ``max_drop_points``, agreement >= ``min_agreement`` with
    ``margin_se`` standard errors to spare (:func:`agreement_meets`), and with ``cutting_only`` a cut above zero
    in FLOPs and in ``by`` (an exit threshold at which the probes cost more than the exits save is no operating
    point). Ties: the lower threshold. ``None`` when no row qualifies."""
    ok = curve
    if max_drop_points is not None:
        ok = ok[within_drop(ok["accuracy_drop_points"], max_drop_points)]
    if min_agreement is not None:
        ok = ok[agreement_meets(ok["agreement_with_full"], ok.get("n"), min_agreement, margin_se)]
    if cutting_only:
        ok = ok[(ok["flops_saved_fraction"] > 0) & (ok[by] > 0)]
    if not len(ok):
        return None
    return float(ok.sort_values([by, "threshold"], ascending=[False, True]).iloc[0]["threshold"])


def curve_row(curve: pd.DataFrame | None, threshold: float | None) -> dict | None:
    """The row of ``curve`` at ``threshold`` as plain Python numbers (a model card's entry); ``None`` without a
    curve or a threshold."""
    if curve is None or threshold is None:
        return None
    row = curve[curve["threshold"] == threshold].iloc[0].to_dict()
    return {k: (float(v) if isinstance(v, (float, np.floating)) else int(v) if isinstance(v, np.integer) else v)
            for k, v in row.items()}


def pick_threshold(curve: pd.DataFrame, max_drop_points: float = 0.5) -> float:
    """The threshold with the largest FLOPs cut whose accuracy drop against full is <= ``max_drop_points``;
    if none qualifies, the one with the smallest drop (:func:`operating_point` with that fallback)."""
    t = operating_point(curve, max_drop_points=max_drop_points)
    return t if t is not None else float(curve.sort_values("accuracy_drop_points").iloc[0]["threshold"])


def blocks_by_outcome(ev: PolicyEval, classes: Sequence[str]) -> tuple[dict, pd.DataFrame]:
    """Mean blocks executed for correctly vs wrongly classified inputs, and per class."""
    blocks = ev.executed.sum(1)
    correct = ev.correct
    overall = {"correct": float(blocks[correct].mean()) if correct.any() else float("nan"),
               "wrong": float(blocks[~correct].mean()) if (~correct).any() else float("nan")}
    per_class = pd.DataFrame({"class": [classes[k] for k in ev.labels], "blocks": blocks, "correct": correct,
                              "flops": ev.flops}).groupby("class", sort=False).agg(
        blocks_mean=("blocks", "mean"), accuracy=("correct", "mean"), flops_mean=("flops", "mean")).reset_index()
    return overall, per_class
