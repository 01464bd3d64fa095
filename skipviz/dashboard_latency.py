"""The latency the dashboard's pages show (no Streamlit): the paired saving of the live view at a chosen batch
size (:func:`live_latency`, with a per-block profile estimate) and of every calibration threshold
(:func:`latency_sweep`), and the Thresholds page's tables that carry them. Every measurement is
:func:`skipviz.measure.saving.measure_saving`'s. Re-exported by :mod:`skipviz.dashboard`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from .data import normalize
from .engine.network import SkipNetwork
from .evaluate.calibration import CalibrationPoint, CalibrationSet, CalibrationSweep
from .measure.clock import device_label
from .measure.predict import predict_block_ms
from .measure.profile import BlockProfile, profile_blocks
from .measure.saving import PairedSaving, measure_saving
from .policies.base import Policy
from .policies.threshold import make_policy
from .dashboard_tables import Column

__all__ = ["BATCH_SIZES", "LiveLatency", "block_profile", "calibration_columns", "calibration_table",
           "latency_sweep", "live_batch", "live_latency", "point_saving", "sweep_batch", "sweep_table"]


# --------------------------------------------------------------------------------------------- latency
#: The batch sizes the live views time at.
BATCH_SIZES = (1, 16, 64, 256)


def live_batch(x: torch.Tensor, others: torch.Tensor | None, batch_size: int) -> tuple[torch.Tensor, str]:
    """The batch the live view times: ``x`` (1, 3, H, W) followed by ``batch_size - 1`` of ``others``
    (M, 3, H, W), normalised images of the calibration set, repeated in turn when there are fewer), so the
    batch's decisions vary as a real batch's do; and how the page describes it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size == 1:
        return x, "this image alone"
    if others is None or len(others) == 0:
        raise ValueError("a batch above 1 needs other images to fill it")
    rest = others.to(x.device, x.dtype)
    reps = -(-(batch_size - 1) // len(rest))
    fill = rest.repeat(reps, 1, 1, 1)[: batch_size - 1] if reps > 1 else rest[: batch_size - 1]
    again = " (repeated)" if reps > 1 else ""
    return torch.cat([x, fill]), f"this image and {batch_size - 1} calibration images{again}"


def block_profile(net: SkipNetwork, xb: torch.Tensor, repeats: int = 5) -> BlockProfile:
    """Every part of ``net`` timed alone on the batch ``xb`` (:func:`~skipviz.measure.profile.profile_blocks`,
    short settings for an interactive page): the basis of the per-block estimates. It does not depend on the
    policy: profile once per model and batch size."""
    return profile_blocks(net, xb.shape[0], x=xb, warmup=1, repeats=repeats, min_repeat_s=0.005)


@dataclass(frozen=True)
class LiveLatency:
    """The live view's latency at one batch size: the measured, paired ``saving`` (per batch) and each block's
    time as a profile estimate (``block_ms``, ms per batch, :func:`~skipviz.measure.predict.predict_block_ms`
    for this batch's decisions), with the batch it was measured on."""

    saving: PairedSaving
    block_ms: list[float]
    batch_size: int
    batch: str  # how the batch was made (:func:`live_batch`)
    profile_device: str

    @property
    def device(self) -> str:
        return self.saving.device


@torch.no_grad()
def live_latency(net: SkipNetwork, xb: torch.Tensor, policy: Policy, profile: BlockProfile, batch: str = "",
                 rounds: int = 15) -> LiveLatency:
    """Time the full network against ``policy`` on the batch ``xb`` (B, 3, H, W) in ``rounds`` interleaved
    paired rounds (:func:`~skipviz.measure.saving.measure_saving`) and estimate each block's share from
    ``profile`` (made on the same batch size: :func:`block_profile`)."""
    if profile.batch_size != xb.shape[0]:
        raise ValueError(f"the profile is of batch {profile.batch_size}, the batch has {xb.shape[0]} inputs")
    saving = measure_saving(net, xb, policy, rounds=rounds)
    res = net.run(xb, policy)
    checked = res.evaluated  # (B, L): where the policy's head ran (none at threshold 0)
    planned = policy.decides_up_front and bool(checked.any())  # a plan at threshold 0 runs no head
    # gates: the gate time of every row whose gate ran; exits: no gate, but each block's exit check (the profile's
    # probe_ms, timed inside a run) for the share of the batch checked there
    evaluated = None if planned else torch.zeros_like(res.executed) if policy.exits_early else checked
    block_ms = predict_block_ms(profile, res.executed, evaluated, planned=planned)
    if policy.exits_early:
        share = checked.double().mean(0).tolist()
        block_ms = [t + share[i] * profile.probe_ms for i, t in enumerate(block_ms)]
    if planned:  # the plan head's time counts with the first block, which it decides before
        block_ms[0] += profile.plan_ms
    return LiveLatency(saving, block_ms, int(xb.shape[0]), batch, device_label(profile.info.device))


def sweep_batch(n_images: int, batch_size: int, min_images: int = 16) -> tuple[int, int]:
    """``(batch, images)`` a calibration point is timed with: batches of ``batch_size`` (at most the set's
    ``n_images``) over the first ``images`` of the set, at least ``min_images`` so a batch-1 figure averages
    different inputs' decisions, a multiple of the batch."""
    if n_images < 1:
        raise ValueError("an empty calibration set has no latency")
    b = max(1, min(int(batch_size), n_images))
    per_call = max(b, min(n_images, min_images))
    return b, per_call - per_call % b


def _calibration_inputs(net: SkipNetwork, calib: CalibrationSet, batch_size: int) -> tuple[torch.Tensor, int]:
    b, n = sweep_batch(len(calib), batch_size)
    dev = next(net.parameters()).device
    return normalize(calib.images[:n].to(dev), net.meta.mean, net.meta.std), b


def point_saving(net: SkipNetwork, calib: CalibrationSet, policy: Policy, batch_size: int,
                 rounds: int = 9) -> PairedSaving:
    """The paired saving of ``policy`` against the full network on the calibration set's first images
    (:func:`sweep_batch`), per batch of the effective batch size."""
    x, b = _calibration_inputs(net, calib, batch_size)
    return measure_saving(net, x, policy, batch_size=b, rounds=rounds)


def latency_sweep(net: SkipNetwork, sweep: CalibrationSweep, batch_size: int, rounds: int = 9,
                  progress=None) -> dict[float, PairedSaving]:
    """The paired saving (per batch) of every threshold of ``sweep`` at ``batch_size``, each against the full
    network in its own interleaved rounds; ``progress(fraction, text)`` after each threshold."""
    out: dict[float, PairedSaving] = {}
    ts = sorted(sweep.points)
    for k, t in enumerate(ts):
        if progress:
            progress(k / len(ts), f"threshold {t:.2f}")
        out[t] = point_saving(net, sweep.calib, make_policy(net, t, source=sweep.source), batch_size, rounds)
    if progress:
        progress(1.0, "done")
    return out


def _latency_columns(s: PairedSaving | None) -> dict:
    """A point's latency columns, per image: the skipped run's median, the saving and its interval, and the
    words :meth:`PairedSaving.label` allows."""
    if s is None:
        return {"latency ms/image (median)": np.nan, "saving ms/image": np.nan, "saving 95 % CI low": np.nan,
                "saving 95 % CI high": np.nan, "latency saving": "not measured"}
    p = s.per_input()
    return {"latency ms/image (median)": 1e3 * p.skipped_median_s, "saving ms/image": 1e3 * p.saving_s,
            "saving 95 % CI low": 1e3 * p.low_s, "saving 95 % CI high": 1e3 * p.high_s, "latency saving": p.label()}


def _point_row(p: CalibrationPoint) -> dict:
    return {"accuracy (%)": 100 * p.accuracy, "agreement with full (%)": 100 * p.agreement,
            "FLOPs executed (%)": 100 * p.flops_fraction, "blocks run (mean)": float(p.executed.sum(1).mean())}


def _key_columns_first(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, agreement, FLOPs and the saving in words first; the numbers behind the saving after them."""
    first = [c for c in ("run", "threshold", "accuracy (%)", "agreement with full (%)", "FLOPs executed (%)",
                         "latency saving") if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def sweep_table(sweep: CalibrationSweep, latencies: Mapping[float, PairedSaving]) -> pd.DataFrame:
    """One row per grid threshold: accuracy, agreement and FLOPs in percent, and the paired latency saving
    (in the words :meth:`PairedSaving.label` allows, then per image and its 95 % interval)."""
    return _key_columns_first(pd.DataFrame([{"threshold": t, **_point_row(p), **_latency_columns(latencies.get(t))}
                                            for t, p in sorted(sweep.points.items())]))


def calibration_table(point: CalibrationPoint, full: CalibrationPoint, saving: PairedSaving | None) -> pd.DataFrame:
    """The current setting and the full network over the calibration set, one row each (percents), with the
    current setting's paired saving."""
    return _key_columns_first(pd.DataFrame([
        {"run": "current", **_point_row(point), **_latency_columns(saving)},
        {"run": "full", **_point_row(full), "latency ms/image (median)":
         1e3 * saving.per_input().full_median_s if saving is not None else np.nan, "saving ms/image": 0.0,
         "saving 95 % CI low": np.nan, "saving 95 % CI high": np.nan, "latency saving": "reference"}]))


def calibration_columns() -> dict[str, Column]:
    """How :func:`calibration_table` and :func:`sweep_table` are shown: percents with a % sign, short labels,
    milliseconds per image."""
    pct = "%.1f%%"
    return {"run": Column("text", "run", 70), "threshold": Column("number", "threshold", 80, "%.2f"),
            "accuracy (%)": Column("number", "accuracy", 80, pct),
            "agreement with full (%)": Column("number", "agreement", 90, pct, "agreement with the full network"),
            "FLOPs executed (%)": Column("number", "FLOPs run", 80, pct, "FLOPs executed, % of the full network's"),
            "blocks run (mean)": Column("number", "blocks run", 80, "%.2f", "blocks run per image (mean)"),
            "latency ms/image (median)": Column("number", "ms/image", 80, "%.3f", "latency per image (median), ms"),
            "saving ms/image": Column("number", "saved ms/image", 110, "%.3f", "paired saving per image, ms"),
            "saving 95 % CI low": Column("number", "CI low (ms)", 90, "%.3f", "95 % interval of the saving, ms"),
            "saving 95 % CI high": Column("number", "CI high (ms)", 90, "%.3f", "95 % interval of the saving, ms"),
            "latency saving": Column("text", "latency saving", 300)}
