"""What the dashboard's pages call that is not a figure, a measurement or an evaluation of its own: a thin
layer over the library (no Streamlit).

This module: the decision sources a network offers, one-input inspection (skipped vs full run), per-block
overrides (which are refused, which change the shape) and how an image is described. Its neighbours, whose
every name is importable from here too: :mod:`skipviz.dashboard_models` (thread set-up, model loading with a
fallback, uploaded weights, the model tables), :mod:`skipviz.dashboard_tables` (the pages' tables, column
displays and headline numbers, percents) and :mod:`skipviz.dashboard_latency` (the paired saving of the live
view and of every calibration threshold). Figures are :mod:`skipviz.figures`', the calibration sweep
:mod:`skipviz.evaluate.calibration`'s, every latency measurement :func:`skipviz.measure.saving.measure_saving`'s,
the policy :func:`skipviz.policies.make_policy`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ._imageio import ImageInfo
from .engine.network import SkipNetwork
from .engine.trace import SampleTrace
from .policies.base import Override, Policy, normalise_overrides
from .policies.simple import FullPolicy
from .policies.threshold import DECISION_SOURCES, offered_sources
from .policies.words import describe_policy, plural
from .dashboard_latency import (BATCH_SIZES, LiveLatency, block_profile, calibration_columns, calibration_table,
                                latency_sweep, live_batch, live_latency, point_saving, sweep_batch, sweep_table)
from .dashboard_models import (LoadedModel, configure_threads, inference_device, load_model, load_uploaded_weights,
                               model_card_table, models_table, shipped_weights_with_sha256, untrained_warning,
                               weights_state)
from .dashboard_tables import (AUDIT_FIRST, AUDIT_LAST, Column, Metric, audit_columns, audit_disagreements,
                               audit_records, audit_summary, block_columns, block_table, compare_columns,
                               finite_or_none, fraction_columns, kl_policy_columns, latency_metric, percent,
                               percent_points, policy_words, profile_column, top5_columns, top5_side_by_side,
                               top_k_frame)

__all__ = [
    # this module
    "InspectResult", "compared_policy_label", "decision_sources", "decisions", "describe_overrides", "describe_policy",
    "image_caption",
    "inspect", "override_options", "overrides_from_choices", "prediction_verdict", "preprocess",
    "refuse_unskippable", "run_full", "shape_change_warning", "shape_changing_skips", "skip_refusal",
    # dashboard_models
    "LoadedModel", "configure_threads", "inference_device", "load_model", "load_uploaded_weights",
    "model_card_table", "models_table", "shipped_weights_with_sha256", "untrained_warning", "weights_state",
    # dashboard_tables
    "AUDIT_FIRST", "AUDIT_LAST", "Column", "Metric", "audit_columns", "audit_disagreements", "audit_records",
    "audit_summary", "block_columns", "block_table", "compare_columns", "finite_or_none", "fraction_columns",
    "kl_policy_columns", "latency_metric", "percent", "percent_points", "policy_words", "profile_column",
    "top5_columns", "top5_side_by_side", "top_k_frame",
    # dashboard_latency
    "BATCH_SIZES", "LiveLatency", "block_profile", "calibration_columns", "calibration_table", "latency_sweep",
    "live_batch", "live_latency", "point_saving", "sweep_batch", "sweep_table",
]


# --------------------------------------------------------------------------------------------- one input
def decision_sources(net: SkipNetwork) -> list[str]:
    """The decision sources ``net`` offers: ``"gates"`` when it has gate heads, ``"plan"`` with a plan head,
    ``"early_exit"`` with probe heads (:meth:`~skipviz.policies.threshold.DecisionSource.offered_by`)."""
    return offered_sources(net)


def preprocess(net: SkipNetwork, image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (1, 3, H, W) normalised tensor on the model's device."""
    return net.meta.preprocess(image).to(next(net.parameters()).device)


@dataclass
class InspectResult:
    """One input under a policy and under the full network. ``probs_*``: (K,) class probabilities."""

    trace: SampleTrace
    full_trace: SampleTrace
    probs_skipped: np.ndarray
    probs_full: np.ndarray
    policy: dict

    @property
    def agrees(self) -> bool:
        return self.trace.predicted_index == self.full_trace.predicted_index


@torch.no_grad()
def run_full(net: SkipNetwork, x: torch.Tensor) -> SampleTrace:
    """The full network's trace for one input x (1, 3, H, W) (cache it: it does not depend on the policy)."""
    return net.run(x, FullPolicy()).traces()[0]


@torch.no_grad()
def inspect(net: SkipNetwork, x: torch.Tensor, policy: Policy, full_trace: SampleTrace | None = None) -> InspectResult:
    """Run one input x (1, 3, H, W) under ``policy`` and fully (its latency: :func:`live_latency`)."""
    trace = net.run(x, policy).traces()[0]
    full_trace = full_trace or run_full(net, x)
    return InspectResult(trace=trace, full_trace=full_trace, probs_skipped=_softmax(trace.logits),
                         probs_full=_softmax(full_trace.logits), policy=policy.config())


def _softmax(logits: Sequence[float]) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def prediction_verdict(res: InspectResult) -> str:
    """The skipped and the full prediction in one line: ``"Skipped and full network agree: cat (58.3% skipped,
    65.3% full)"`` or ``"Skipping changed the prediction: dog 40.1% (skipped) vs cat 65.3% (full)"``."""
    s, f = res.trace, res.full_trace
    if res.agrees:
        return (f"Skipped and full network agree: **{s.predicted_label}** ({percent(s.confidence)} skipped, "
                f"{percent(f.confidence)} full)")
    return (f"Skipping changed the prediction: **{s.predicted_label}** {percent(s.confidence)} (skipped) vs "
            f"**{f.predicted_label}** {percent(f.confidence)} (full)")


def image_caption(label: str, info: ImageInfo, shown: tuple[int, int]) -> str:
    """How a page captions an image: its name, the size it is shown and used at (``shown``: the decoded image's
    ``(width, height)``, after its EXIF orientation was applied) and its format; a photo that EXIF turned
    says so, and an animated image says which frame is used."""
    w, h = shown
    decoded = (info.decoded_width or info.width, info.decoded_height or info.height)
    turned = (w, h) == decoded[::-1] and w != h
    size = f"{info.height}x{info.width}" if turned else f"{info.width}x{info.height}"
    extra = [f"rotated by its EXIF orientation (stored {info.width}x{info.height})"] if turned else []
    if (w, h) not in (decoded, decoded[::-1]) or decoded != (info.width, info.height):
        extra.append(f"decoded at {w}x{h}")
    if info.frames > 1:
        extra.append(f"{info.frames} frames (first used)")
    return f"{label}: {size} {info.format}" + (f", {', '.join(extra)}" if extra else "")


def decisions(trace: SampleTrace) -> list[str]:
    """``"fired"``/``"bypassed"`` per block, in order."""
    return ["fired" if b.executed else "bypassed" for b in trace.blocks]


def overrides_from_choices(choices: Mapping[int, str]) -> dict[int, Override]:
    """Page widget values (``"auto"``/``"run"``/``"skip"`` per block) -> GatePolicy overrides."""
    return normalise_overrides(choices, auto=True)


def override_options(net: SkipNetwork, index: int) -> list[str]:
    """The choices block ``index``'s override offers: ``auto``, ``run`` and, for a block with a bypass, ``skip``."""
    return ["auto", "run", "skip"] if net.blocks[index].bypassable else ["auto", "run"]


def skip_refusal(net: SkipNetwork, index: int) -> str | None:
    """Why block ``index`` cannot be forced to skip, or None when it can: a block that changes the shape with no
    parameter-free shortcut (an MBConv block widening the channels) has no bypass and always runs."""
    if net.blocks[index].bypassable:
        return None
    return (f"block {index} ({net.block_names[index]}) cannot be skipped: it changes the feature map's shape and "
            "has no shortcut to stand in for it (no bypass), so it always runs")


def refuse_unskippable(net: SkipNetwork,
                       overrides: Mapping[int, Override]) -> tuple[dict[int, Override], dict[int, str]]:
    """``(kept, refused)``: ``overrides`` without the force-skips of blocks that cannot be skipped
    (:func:`skip_refusal`), and the reason for each refused block."""
    kept: dict[int, Override] = {}
    refused: dict[int, str] = {}
    for i, v in sorted(normalise_overrides(overrides, auto=True).items()):
        reason = skip_refusal(net, i) if v == "skip" and 0 <= i < net.num_blocks else None
        if reason:
            refused[i] = reason
        else:
            kept[i] = v
    return kept, refused


def shape_changing_skips(net: SkipNetwork, overrides: Mapping[int, Override]) -> list[int]:
    """The downsampling blocks ``overrides`` force to skip although they can be bypassed: their bypass is the
    shortcut, not an identity (a CIFAR ResNet's option-A shortcut subsamples by 2 and zero-pads the new
    channels), so the skipped block's output changes shape and was never trained to stand in for it."""
    return [i for i, v in sorted(normalise_overrides(overrides, auto=True).items())
            if v == "skip" and 0 <= i < net.num_blocks and net.blocks[i].downsample and net.blocks[i].bypassable]


def shape_change_warning(net: SkipNetwork, blocks: Sequence[int]) -> str:
    """What the page says when downsampling blocks (:func:`shape_changing_skips`) are forced to skip."""
    names = ", ".join(f"{i} ({net.block_names[i]})" for i in blocks)
    return (f"Forced to skip a downsampling block: {names}. Its bypass is the shortcut, not an identity: it "
            "subsamples the feature map and changes its channel count (the shape), standing in for a block it was "
            "never trained to replace, so accuracy usually drops sharply.")


def compared_policy_label(source: str, threshold: float, overrides: Mapping[int, Override]) -> str:
    """The session's policy as a row name in a comparison table: its decision source and threshold, and its
    overrides when any are in force (``"per-block gates (current threshold 0.50, 2 overrides in force)"``)."""
    extra = f", {plural(len(overrides), 'override')} in force" if overrides else ""
    return f"{DECISION_SOURCES[source].label} (current threshold {threshold:.2f}{extra})"


def describe_overrides(net: SkipNetwork, overrides: Mapping[int, Override]) -> str:
    """Per-block overrides in words: ``"block 3 (stage1.2) skip, block 5 (stage2.0) run"``; empty without any."""
    return ", ".join(f"block {i} ({net.block_names[i]}) {v if isinstance(v, str) else f'threshold {v:.2f}'}"
                     for i, v in sorted(normalise_overrides(overrides, auto=True).items()) if 0 <= i < net.num_blocks)
