"""What the dashboard's pages call that is not a figure, a measurement or an evaluation of its own: a thin
layer over the library (no Streamlit).

Thread set-up, model loading with a fallback, the model tables, the decision sources a network offers,
one-input inspection (skipped vs full run) and its tables, and the latency the pages show: the paired saving of
the live view at a chosen batch size (:func:`live_latency`, with a per-block profile estimate) and of every
calibration threshold (:func:`latency_sweep`). Figures are :mod:`skipviz.figures`', the calibration sweep
:mod:`skipviz.evaluate.calibration`'s, every latency measurement :func:`skipviz.measure.saving.measure_saving`'s,
the policy :func:`skipviz.policies.make_policy`'s.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ._checkpoint import CheckpointError
from .data import normalize
from .engine.network import SkipNetwork
from .engine.trace import SampleTrace
from .evaluate.calibration import CalibrationPoint, CalibrationSet, CalibrationSweep
from .measure.clock import device_label, resolve_device
from .measure.predict import predict_block_ms
from .measure.profile import BlockProfile, profile_blocks
from .measure.saving import PairedSaving, measure_saving
from .models._registry import DEFAULT_MODEL, create_model, list_models, list_pretrained
from .models.weights import sha256_file
from .policies.base import Override, Policy, normalise_overrides
from .policies.simple import FullPolicy
from .policies.threshold import make_policy, score_label
from .policies.words import describe_policy

__all__ = ["BATCH_SIZES", "InspectResult", "LiveLatency", "LoadedModel", "block_profile", "block_table",
           "calibration_table", "configure_threads", "decision_sources", "decisions", "describe_overrides",
           "describe_policy", "finite_or_none", "inference_device", "inspect", "latency_sweep", "live_batch",
           "live_latency", "load_model", "load_uploaded_weights", "model_card_table", "models_table",
           "override_options", "overrides_from_choices", "percent", "percent_points", "point_saving",
           "refuse_unskippable", "shape_change_warning", "shape_changing_skips", "shipped_weights_with_sha256",
           "skip_refusal", "untrained_warning",
           "preprocess", "profile_column", "run_full", "sweep_batch", "sweep_table", "top5_side_by_side",
           "top_k_frame", "weights_state"]


# --------------------------------------------------------------------------------------------- runtime
def configure_threads(default: int = 1) -> int:
    """Set torch's intra-op threads from ``$SKIPVIZ_TORCH_THREADS`` (default 1) and return the count.

    One thread is not the fastest setting on an idle machine (default model, 2-core CPU, measured: a batch-1
    forward takes 2.2 ms on 1 thread and 1.55 ms on 2, a batch of 256 about twice as long), but it is the robust one:
    with 2 threads, OpenMP oversubscription made a batch-1 run take ~1 s instead of ~9 ms while another job
    used both cores, and several dashboard sessions share the process. Set the variable to use more.
    """
    n = int(os.environ.get("SKIPVIZ_TORCH_THREADS", default))
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def inference_device() -> torch.device:
    """CUDA when available, else CPU (:func:`~skipviz.measure.clock.resolve_device`)."""
    return resolve_device()


# --------------------------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A model ready for the dashboard. ``warning`` explains a fallback (e.g. missing trained weights)."""

    net: SkipNetwork
    name: str
    warning: str | None = None

    @property
    def default_threshold(self) -> float:
        return self.default_threshold_for("gates")

    def default_threshold_for(self, source: str) -> float:
        """The card's default threshold for a decision source (:meth:`ModelMeta.default_threshold`)."""
        return self.net.meta.default_threshold(source)


def weights_state(name: str) -> str:
    """What a registered ``arch.tag`` model's weights file (and card) is now: ``"path size mtime card size
    mtime"``, ``"missing"``, or ``""``
    for a name without registered weights. A cache key: a model loaded while its file was missing or damaged is
    loaded again once the file changes."""
    arch, _, tag = name.partition(".")
    for w in list_pretrained():
        if (w.arch, w.tag) == (arch, tag):
            try:
                st = w.path.stat()
            except OSError:
                return "missing"
            try:
                card = w.card_path.stat()
                card_state = f" card {card.st_size} {card.st_mtime_ns}"
            except OSError:
                card_state = " no card"
            return f"{w.path} {st.st_size} {st.st_mtime_ns}{card_state}"
    return ""


def load_model(name: str = DEFAULT_MODEL, device: torch.device | None = None) -> LoadedModel:
    """Load a registered model; if its pretrained weights are missing or unusable (damaged, not this
    architecture), fall back to random init with a warning that says why and how to create them.

    Never raises for the weights file: the warning says what is wrong.
    """
    device = device or inference_device()
    arch, _, tag = name.partition(".")
    try:
        net = create_model(name)
        warning = None
    except (FileNotFoundError, CheckpointError) as e:
        torch.manual_seed(0)
        net = create_model(arch)
        what = "are missing" if isinstance(e, FileNotFoundError) else "cannot be used"
        made = next((w for w in list_pretrained() if (w.arch, w.tag) == (arch, tag)), None)
        how = (f"Create them with `{made.make_command}` (writes data/{made.filename} and its .json model card), "
               "then reload the page.") if made is not None and made.make_command else ""
        warning = (f"Trained weights for {name} {what} ({e}). Showing a randomly initialised {arch}: "
                   f"its predictions and gate decisions are meaningless. {how}").rstrip()
    if warning is None and not net.meta.weights_path:
        warning = untrained_warning(name)
    return LoadedModel(net.to(device).eval(), name, warning)


def untrained_warning(name: str) -> str:
    """What the pages say over a model shown with no trained weights (random init)."""
    return (f"{name} has no trained weights: it is randomly initialised, so its predictions, confidences and gate "
            "decisions are meaningless. Pick a model with trained weights on the Model page, or load a weights "
            "file there.")


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def shipped_weights_with_sha256(arch: str, sha256: str) -> str | None:
    """The registry name (``arch.tag``) of the shipped weights file for ``arch`` whose SHA-256 is ``sha256``, or
    None: an upload byte-identical to a shipped file is that registered model, with its model card (default
    thresholds, calibration data). Each file is hashed once per size and modification time."""
    for w in list_pretrained():
        if w.arch != arch:
            continue
        try:
            st = w.path.stat()
        except OSError:
            continue
        if _file_sha256(str(w.path), st.st_size, st.st_mtime_ns) == sha256:
            return w.name
    return None


def load_uploaded_weights(arch: str, data: bytes, filename: str,
                          device: torch.device | None = None) -> LoadedModel:
    """Build ``arch`` with the weights in an uploaded file (safetensors or weights-only torch file).

    Raises :class:`~skipviz.CheckpointError` (with the reason) when the file is unusable.
    """
    if not data:
        raise CheckpointError(f"{filename}: weights file is empty")
    suffix = Path(filename).suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{filename}: expected a .safetensors, .pt or .pth weights file")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{Path(filename).stem or 'weights'}{suffix}"
        path.write_bytes(data)
        try:
            net = create_model(arch, weights=path)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, OSError, KeyError) as e:
            raise CheckpointError(f"{filename}: could not be loaded into {arch}: {e}") from e
    net.meta.weights_path = filename
    return LoadedModel(net.to(device or inference_device()).eval(), f"{arch} + {filename}")


def models_table() -> pd.DataFrame:
    """Registered architectures and their pretrained weights (whether the file is on this machine)."""
    pre = {w.arch: w for w in list_pretrained()}
    rows = []
    for arch in list_models():
        w = pre.get(arch)
        rows.append({"model": arch, "pretrained": f"{arch}.{w.tag}" if w else "",
                     "weights present": bool(w and w.available()),
                     "description": w.description if w else "torchvision ResNet wrapper (weights from a local file)"})
    return pd.DataFrame(rows, columns=["model", "pretrained", "weights present", "description"])


def model_card_table(net: SkipNetwork) -> pd.DataFrame:
    """The model card as (field, value) rows: data, accuracy, FLOPs, weights identity."""
    meta = net.meta
    table = net.flop_table()
    rows: list[tuple[str, str]] = [
        ("model", meta.display_name),
        ("architecture", meta.arch),
        ("blocks", f"{net.num_blocks} ({sum(b.downsample for b in net.blocks)} downsampling)"),
        ("gated blocks", ", ".join(net.block_names[i] for i in net.gated_blocks) or "none"),
        ("parameters", f"{sum(p.numel() for p in net.parameters()):,}"),
        ("input", "x".join(str(v) for v in meta.input_size)),
        ("classes", f"{meta.num_classes}: {', '.join(meta.classes[:10])}{' ...' if meta.num_classes > 10 else ''}"),
        ("FLOPs (full, one input)", f"{table.full / 1e6:.2f} M"),
        ("FLOPs of all gates", f"{sum(table.gates.values()) / 1e6:.3f} M ({sum(table.gates.values()) / table.full:.2%})"),
        ("weights file", meta.weights_path or "none (random init)"),
        ("weights SHA-256", meta.weights_sha256 or ""),
    ]
    rows += meta.card_rows()
    return pd.DataFrame(rows, columns=["field", "value"])


# --------------------------------------------------------------------------------------------- one input
def decision_sources(net: SkipNetwork) -> list[str]:
    """The decision sources ``net`` offers: ``"gates"`` when it has gate heads, ``"plan"`` with a plan head."""
    return [s for s, ok in (("gates", bool(net.gated_blocks)), ("plan", net.plan_head is not None)) if ok]


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


def top_k_frame(probs: np.ndarray, classes: Sequence[str], k: int = 5) -> pd.DataFrame:
    """(K,) probabilities -> the top ``k`` rows: rank, class, probability."""
    order = np.argsort(-probs, kind="stable")[:k]
    return pd.DataFrame({"rank": np.arange(1, len(order) + 1), "class": [classes[i] for i in order],
                         "probability": probs[order]})


def top5_side_by_side(res: InspectResult, classes: Sequence[str], k: int = 5) -> pd.DataFrame:
    """Top-k of the skipped run next to the top-k of the full run (one row per rank)."""
    s, f = top_k_frame(res.probs_skipped, classes, k), top_k_frame(res.probs_full, classes, k)
    return pd.DataFrame({"rank": s["rank"], "skipped: class": s["class"], "skipped: probability": s["probability"],
                         "full: class": f["class"], "full: probability": f["probability"]})


def profile_column(device: str, batch_size: int) -> str:
    """The per-block table's time column: says it is a profile estimate, with its device and batch size."""
    return f"profile estimate (ms per batch of {batch_size}, {device})"


def block_table(trace: SampleTrace, block_ms: Sequence[float] | None = None, device: str = "",
                batch_size: int = 1) -> pd.DataFrame:
    """One row per block: its score (:func:`score_label`), threshold, decision, reason, FLOPs and, with
    ``block_ms`` (:attr:`LiveLatency.block_ms`), each block's time as a profile estimate (column
    :func:`profile_column`: the device and batch size in its name)."""
    rows = []
    label = score_label(trace.policy)
    time_col = profile_column(device, batch_size) if block_ms is not None else None
    for i, b in enumerate(trace.blocks):
        row = {"block": b.index, "name": b.name, "downsampling": b.downsample,
               label: np.nan if b.score is None else b.score,
               "threshold": np.nan if b.threshold is None else b.threshold,
               "decision": "fired" if b.executed else "bypassed", "reason": b.reason, "MFLOPs": b.flops / 1e6}
        if time_col is not None:
            row[time_col] = float(block_ms[i])
        rows.append(row)
    return pd.DataFrame(rows)


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


def refuse_unskippable(net: SkipNetwork, overrides: Mapping[int, Override]) -> tuple[dict[int, Override], dict[int, str]]:
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


def describe_overrides(net: SkipNetwork, overrides: Mapping[int, Override]) -> str:
    """Per-block overrides in words: ``"block 3 (stage1.2) skip, block 5 (stage2.0) run"``; empty without any."""
    return ", ".join(f"block {i} ({net.block_names[i]}) {v if isinstance(v, str) else f'threshold {v:.2f}'}"
                     for i, v in sorted(normalise_overrides(overrides, auto=True).items()) if 0 <= i < net.num_blocks)


def percent(fraction: float, digits: int = 1) -> str:
    """A fraction as a percent, as ``f"{fraction:.1%}"`` but never ``"-0.0%"``: a value that rounds to zero is
    ``"0.0%"``."""
    text = f"{float(fraction):.{digits}%}"
    return text[1:] if text.startswith("-") and float(text[1:-1]) == 0 else text


def percent_points(delta: float, digits: int = 1) -> str:
    """A difference of two fractions in percentage points, signed (``"+1.2 pts"``, ``"-3.0 pts"``), never
    ``"-0.0 pts"``."""
    text = f"{100 * float(delta):+.{digits}f}"
    if float(text) == 0:
        text = f"{0.0:+.{digits}f}"
    return f"{text} pts"


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


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
    planned = policy.decides_up_front
    evaluated = ~torch.isnan(res.scores) if not planned else None
    block_ms = predict_block_ms(profile, res.executed, evaluated, planned=planned)
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


def sweep_table(sweep: CalibrationSweep, latencies: Mapping[float, PairedSaving]) -> pd.DataFrame:
    """One row per grid threshold: accuracy, agreement and FLOPs in percent, and the paired latency saving
    (per image, its 95 % interval, and the words :meth:`PairedSaving.label` allows)."""
    return pd.DataFrame([{"threshold": t, **_point_row(p), **_latency_columns(latencies.get(t))}
                         for t, p in sorted(sweep.points.items())])


def calibration_table(point: CalibrationPoint, full: CalibrationPoint, saving: PairedSaving | None) -> pd.DataFrame:
    """The current setting and the full network over the calibration set, one row each (percents), with the
    current setting's paired saving."""
    return pd.DataFrame([{"run": "current", **_point_row(point), **_latency_columns(saving)},
                         {"run": "full", **_point_row(full), "latency ms/image (median)":
                          1e3 * saving.per_input().full_median_s if saving is not None else np.nan,
                          "saving ms/image": 0.0, "saving 95 % CI low": np.nan, "saving 95 % CI high": np.nan,
                          "latency saving": "reference"}])
