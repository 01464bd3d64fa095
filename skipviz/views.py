"""Everything the dashboard computes and draws that is not in the redundancy, timing or audit modules.

Pure functions (no Streamlit): model loading with a fallback, one-image inspection (skipped vs full run,
measured latency per block), tables (pandas) and figures (Plotly) for the block map, top-5 and per-block
views, and the calibration sweep behind the Thresholds page (accuracy vs latency Pareto curve, skip rate per
block, agreement with the full network). The Streamlit pages only call these and lay the results out.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from PIL import Image

from . import DEFAULT_MODEL, create_model
from ._checkpoint import CheckpointError
from .network import SkipNetwork
from .policies import THRESHOLD_POLICIES, FullPolicy, Override, Policy, policy_for
from .timing import quick_median_ms, synchronize
from .trace import SampleTrace

# Measurements of wall-clock time must not overlap each other inside one process (several sessions share
# one model and the CPU): one lock serialises them.
_MEASURE_LOCK = threading.Lock()

RUN_COLOR = "#2b8a3e"
SKIP_COLOR = "#adb5bd"


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


def device_label(device: torch.device | str | None = None) -> str:
    """``"GPU (name)"`` when CUDA is used, else ``"CPU (n threads)"``."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(dev)})"
    return f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"


def inference_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
    from ._registry import list_pretrained

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
        warning = (f"Trained weights for {name} {what} ({e}). Showing a randomly initialised {arch}: "
                   f"its predictions and gate decisions are meaningless. Create the weights with "
                   f"`skipviz train --arch {arch} --export` (writes data/{arch}_cifar10_gated.safetensors and "
                   f"its .json model card), then reload the page.")
    return LoadedModel(net.to(device).eval(), name, warning)


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
    from . import list_models, list_pretrained

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
    meta, card = net.meta, net.meta.card
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
    ds = card.get("dataset", {})
    if ds:
        rows.append(("training data", f"{ds.get('name', '')}: train {ds.get('train', {}).get('n', '?')}, "
                                      f"validation {ds.get('validation', {}).get('n', '?')}, "
                                      f"test {ds.get('test', {}).get('n', '?')}"))
    m = card.get("metrics_test", {})
    if m:
        rows += [("test accuracy (full)", f"{m.get('full_accuracy', float('nan')):.2%}"),
                 ("test accuracy (gated)", f"{m.get('gated_accuracy', float('nan')):.2%} at threshold "
                                           f"{m.get('gated_threshold', float('nan')):.2f}"),
                 ("FLOPs saved (gated, test)", f"{m.get('gated_flops_saved_fraction', float('nan')):.1%}"),
                 ("agreement with full (test)", f"{m.get('agreement_with_full', float('nan')):.2%}")]
    if card.get("default_policy"):
        rows.append(("default policy", json.dumps({k: v for k, v in card["default_policy"].items() if k != "rule"})))
    if card.get("date"):
        rows.append(("trained", str(card["date"])))
    if card.get("reproduce"):
        rows.append(("reproduce", str(card["reproduce"])))
    return pd.DataFrame(rows, columns=["field", "value"])


# --------------------------------------------------------------------------------------------- one input
#: Where the dashboard's decisions come from (labels of ``policies.THRESHOLD_POLICIES``): per-block gates, or
#: the plan head at the stem.
DECISION_SOURCES = {"gates": "per-block gates", "plan": "plan at the stem (every block decided up front)"}
assert set(DECISION_SOURCES) == set(THRESHOLD_POLICIES)


def decision_sources(net: SkipNetwork) -> list[str]:
    """The decision sources ``net`` offers: ``"gates"`` when it has gate heads, ``"plan"`` with a plan head."""
    return [s for s, ok in (("gates", bool(net.gated_blocks)), ("plan", net.plan_head is not None)) if ok]


def make_policy(net: SkipNetwork, threshold: float, overrides: Mapping[int, Override] | None = None,
                source: str = "gates") -> Policy:
    """The dashboard's policy: learned gates (or, with ``source="plan"`` and a plan head, the plan at the
    stem) at ``threshold`` with per-block overrides; full if the network has no gates."""
    if source not in DECISION_SOURCES:
        raise ValueError(f"unknown decision source {source!r}; known: {sorted(DECISION_SOURCES)}")
    ov = {int(k): v for k, v in (overrides or {}).items() if v != "auto"}
    return policy_for(net, source if net.plan_head is not None else "gates", threshold, ov)


def preprocess(net: SkipNetwork, image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (1, 3, H, W) normalised tensor on the model's device."""
    return net.meta.preprocess(image).to(next(net.parameters()).device)


@dataclass
class LatencyResult:
    """Measured batch-1 latency (median of ``repeats`` runs, milliseconds) of the full and the skipped run.

    ``per_block_ms``: (L,) median time of each block as it ran in the skipped run (block or bypass, plus
    its gate when evaluated; a plan decided at the stem is counted with block 0).
    """

    full_ms: float
    skipped_ms: float
    per_block_ms: list[float]
    device: str
    repeats: int
    source: str = "skipviz.views.measure_latency (time.perf_counter, median)"

    @property
    def saved_ms(self) -> float:
        return self.full_ms - self.skipped_ms

    @property
    def saved_fraction(self) -> float:
        return self.saved_ms / self.full_ms if self.full_ms > 0 else 0.0


@torch.no_grad()
def measure_latency(net: SkipNetwork, x: torch.Tensor, policy: Policy, trace: SampleTrace,
                    repeats: int = 5) -> LatencyResult:
    """Measure the full run (``net(x)``) and the skipped run (``net.run(x, policy)``) of one input, and the
    time of every block as the skipped run executed it (replaying ``trace``'s decisions).

    x: (1, 3, H, W). Measurements are serialised by a process-wide lock.
    """
    device = x.device
    with _MEASURE_LOCK:
        net(x)  # warm-up
        net.run(x, policy)
        full_ms = quick_median_ms(lambda: net(x), repeats, device)
        skipped_ms = quick_median_ms(lambda: net.run(x, policy), repeats, device)
        per_block: list[list[float]] = [[] for _ in net.blocks]
        planned = policy.decides_up_front  # decided at the stem: the plan counts with block 0
        for _ in range(repeats):
            h = net.stem(x)
            for i, block in enumerate(net.blocks):
                d = trace.blocks[i]
                exited = trace.exit_block is not None and i > trace.exit_block  # run() asks nothing after an exit
                synchronize(device)
                t0 = time.perf_counter()
                if planned:
                    if i == 0:
                        policy.plan(net, h)
                elif not exited:
                    policy.decide(net, i, h)  # the policy's own decision path, as run() calls it
                h = block(h) if d.executed else block.bypass(h)
                synchronize(device)
                per_block[i].append((time.perf_counter() - t0) * 1e3)
    return LatencyResult(full_ms=full_ms, skipped_ms=skipped_ms,
                         per_block_ms=[statistics.median(v) for v in per_block],
                         device=device_label(device), repeats=repeats)


@dataclass
class InspectResult:
    """One input under a policy and under the full network. ``probs_*``: (K,) class probabilities."""

    trace: SampleTrace
    full_trace: SampleTrace
    probs_skipped: np.ndarray
    probs_full: np.ndarray
    policy: dict
    latency: LatencyResult | None = None

    @property
    def agrees(self) -> bool:
        return self.trace.predicted_index == self.full_trace.predicted_index


@torch.no_grad()
def run_full(net: SkipNetwork, x: torch.Tensor) -> SampleTrace:
    """The full network's trace for one input x (1, 3, H, W) (cache it: it does not depend on the policy)."""
    return net.run(x, FullPolicy()).traces()[0]


@torch.no_grad()
def inspect(net: SkipNetwork, x: torch.Tensor, policy: Policy, full_trace: SampleTrace | None = None,
            measure: bool = True, repeats: int = 5) -> InspectResult:
    """Run one input x (1, 3, H, W) under ``policy`` and fully; optionally measure both latencies."""
    trace = net.run(x, policy).traces()[0]
    full_trace = full_trace or run_full(net, x)
    latency = measure_latency(net, x, policy, trace, repeats) if measure else None
    return InspectResult(trace=trace, full_trace=full_trace, probs_skipped=_softmax(trace.logits),
                         probs_full=_softmax(full_trace.logits), policy=policy.config(), latency=latency)


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


def score_label(source: str) -> str:
    """What a block's score is under a decision source or policy name (``trace.policy``): ``"plan probability"``
    (decided at the stem by the plan head) or ``"gate probability"``."""
    return "plan probability" if source == "plan" else "gate probability"


def block_table(trace: SampleTrace, latency: LatencyResult | None = None) -> pd.DataFrame:
    """One row per block: its score (:func:`score_label`), threshold, decision, reason, FLOPs and measured
    latency."""
    rows = []
    label = score_label(trace.policy)
    for i, b in enumerate(trace.blocks):
        rows.append({"block": b.index, "name": b.name, "downsampling": b.downsample,
                     label: np.nan if b.score is None else b.score,
                     "threshold": np.nan if b.threshold is None else b.threshold,
                     "decision": "fired" if b.executed else "bypassed", "reason": b.reason,
                     "MFLOPs": b.flops / 1e6,
                     "latency (ms)": latency.per_block_ms[i] if latency is not None else np.nan})
    return pd.DataFrame(rows)


def decisions(trace: SampleTrace) -> list[str]:
    """``"fired"``/``"bypassed"`` per block, in order."""
    return ["fired" if b.executed else "bypassed" for b in trace.blocks]


def block_map_figure(trace: SampleTrace, title: str | None = None) -> go.Figure:
    """Every block in order as a bar: height and colour = the gate or plan probability (blocks without a score, ungated or
    forced by an override, drawn at 1 in grey),
    fired blocks solid, bypassed blocks hatched and faded, downsampling blocks outlined in black and marked
    with a down arrow; each block's threshold is drawn as a red dashed step line.

    Each bar's text is ``"fired"`` or ``"bypassed"`` (prefixed ``"▼ "`` for downsampling blocks).
    """
    names = [b.name for b in trace.blocks]
    label = score_label(trace.policy)  # gate or plan probability
    fig = go.Figure()
    for gated in (True, False):
        blocks = [b for b in trace.blocks if (b.score is not None) == gated]
        if not blocks:
            continue
        fired = [b.executed for b in blocks]
        marker = dict(
            opacity=[1.0 if f else 0.35 for f in fired],
            pattern=dict(shape=["" if f else "/" for f in fired], fgcolor="#212529", solidity=0.3),
            line=dict(color=["#000000" if b.downsample else "rgba(0,0,0,0)" for b in blocks],
                      width=[3 if b.downsample else 0 for b in blocks]))
        if gated:
            marker.update(color=[b.score for b in blocks], colorscale="Viridis", cmin=0.0, cmax=1.0,
                          colorbar=dict(title=label.split()[0] + " p"))
        else:
            marker.update(color="#868e96")
        fig.add_trace(go.Bar(
            x=[b.name for b in blocks], y=[b.score if gated else 1.0 for b in blocks],
            name=("gated blocks" if trace.policy != "plan" else "blocks the plan decides") if gated
            else "no score (ungated or forced)",
            hovertext=[f"{b.name}<br>{'fired' if b.executed else 'bypassed'}"
                       f"{' (downsampling)' if b.downsample else ''}<br>{label}: "
                       f"{'n/a' if b.score is None else f'{b.score:.3f}'}<br>{b.reason}<br>{b.flops / 1e6:.2f} MFLOPs"
                       for b in blocks], hoverinfo="text",
            text=[("▼ " if b.downsample else "") + ("fired" if b.executed else "bypassed") for b in blocks],
            textposition="outside", cliponaxis=False, marker=marker,
            customdata=[[b.index, "fired" if b.executed else "bypassed"] for b in blocks]))
    thresholds = [b.threshold for b in trace.blocks]
    if any(t is not None for t in thresholds):
        fig.add_trace(go.Scatter(x=names, y=thresholds, mode="lines+markers", name="threshold", connectgaps=False,
                                 line=dict(color="#e03131", dash="dash", shape="hvh"),
                                 marker=dict(symbol="line-ew-open", size=18, color="#e03131"),
                                 hovertemplate="threshold %{y:.2f}<extra></extra>"))
    fig.update_layout(title=title or (f"Block map: {trace.blocks_executed}/{trace.blocks_total} blocks fired, "
                                      f"{trace.flops_saved_fraction:.1%} FLOPs saved"),
                      barmode="overlay",
                      yaxis=dict(title=f"{label} (no score: 1)", range=[0, 1.2]),
                      xaxis=dict(title="block (▼ = downsampling, outlined)", categoryorder="array",
                                 categoryarray=names), bargap=0.15,
                      legend=dict(orientation="h", y=-0.45), height=400, margin=dict(l=40, r=20, t=50, b=40))
    return fig


def block_map_decisions(fig: go.Figure) -> dict[str, str]:
    """Block name -> ``"fired"``/``"bypassed"`` as drawn in a :func:`block_map_figure` (for checks and tests)."""
    out = {}
    for tr in fig.data:
        if tr.type == "bar" and tr.customdata is not None:
            for name, cd in zip(tr.x, tr.customdata):
                out[name] = cd[1]
    return out


def top5_figure(res: InspectResult, classes: Sequence[str], k: int = 5) -> go.Figure:
    """Grouped horizontal bars: the union of both top-k class sets, skipped vs full probability."""
    idx = list(dict.fromkeys(list(np.argsort(-res.probs_full)[:k]) + list(np.argsort(-res.probs_skipped)[:k])))
    labels = [classes[i] for i in idx]
    fig = go.Figure([go.Bar(y=labels, x=res.probs_skipped[idx], orientation="h", name="skipped", marker_color=RUN_COLOR),
                     go.Bar(y=labels, x=res.probs_full[idx], orientation="h", name="full", marker_color="#1c7ed6")])
    fig.update_layout(barmode="group", xaxis=dict(title="probability", range=[0, 1]), height=300,
                      yaxis=dict(autorange="reversed"), margin=dict(l=40, r=20, t=30, b=40),
                      title="Top classes: skipped vs full")
    return fig


def latency_figure(lat: LatencyResult) -> go.Figure:
    """Full vs skipped measured latency (bars), labelled with the device."""
    fig = go.Figure(go.Bar(x=["full", "skipped"], y=[lat.full_ms, lat.skipped_ms], marker_color=["#1c7ed6", RUN_COLOR],
                           text=[f"{lat.full_ms:.2f} ms", f"{lat.skipped_ms:.2f} ms"], textposition="auto"))
    fig.update_layout(title=f"Measured latency, batch 1, {lat.device} (median of {lat.repeats})",
                      yaxis_title="ms", height=300, margin=dict(l=40, r=20, t=50, b=40))
    return fig


# --------------------------------------------------------------------------------------------- calibration
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


def load_calibration(net: SkipNetwork, n: int = 256, seed: int = 0) -> CalibrationSet:
    """The images thresholds are tuned on, when CIFAR-10 is on this machine and fits the model: ``n`` images
    (seeded choice) of the validation split the model card records (carved from ``train/``, as the card's
    default thresholds were chosen), or, when the card records none or its split cannot be rebuilt here, ``n``
    test images, the description saying why. Else ``n`` generated images labelled by the full network."""
    from .data import cifar10_root, load_split, load_validation_subset, normalize

    hw = tuple(net.meta.input_size[-2:])
    root = cifar10_root()
    if root is not None and hw == (32, 32) and len(net.meta.classes) == 10:
        dataset = (net.meta.card or {}).get("dataset")
        validation = dataset.get("validation") if isinstance(dataset, dict) else None
        why = "the model card records no validation split"
        if isinstance(validation, dict):
            try:
                val = load_validation_subset(root, validation, n, seed, size=hw)
            except (OSError, RuntimeError, ValueError):
                val = None
            if val is not None and val.classes == list(net.meta.classes):
                return CalibrationSet(val.images, val.labels, list(val.classes),
                                      f"CIFAR-10 validation subset (the model card's split, carved from train/): "
                                      f"{len(val)} images (seed {seed})", True)
            why = "the model card's validation split cannot be rebuilt from this machine's train/"
        try:
            split = load_split(root, "test", size=hw, progress=False)
            if split.classes == list(net.meta.classes):
                idx = np.sort(np.random.default_rng(seed).choice(len(split), size=min(n, len(split)), replace=False))
                sub = split.subset(idx)
                return CalibrationSet(sub.images, sub.labels, list(split.classes),
                                      f"CIFAR-10 test subset: {len(sub)} images (seed {seed}; {why})", True)
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
def evaluate_calibration(net: SkipNetwork, calib: CalibrationSet, policy: Policy,
                         reference: np.ndarray | None = None, batch_size: int = 256) -> CalibrationPoint:
    """Run ``policy`` over the calibration set with the real skipping engine, timing it.

    ``reference``: (N,) the full network's predictions (agreement is 1.0 when omitted and the policy is full).
    """
    from .data import normalize

    dev = next(net.parameters()).device
    preds, executed, flops, elapsed = [], [], [], 0.0
    full_flops = net.flop_table(tuple(calib.images.shape[-2:])).full
    for i in range(0, len(calib), batch_size):
        x = normalize(calib.images[i: i + batch_size].to(dev), net.meta.mean, net.meta.std)
        synchronize(dev)
        t0 = time.perf_counter()
        res = net.run(x, policy)
        synchronize(dev)
        elapsed += time.perf_counter() - t0
        preds.append(res.logits.argmax(1).cpu())
        executed.append(res.executed)
        flops.append(res.flops_executed())
    p = torch.cat(preds).numpy()
    ref = p if reference is None else reference
    return CalibrationPoint(policy=policy.config(), accuracy=float((p == calib.labels.numpy()).mean()),
                            agreement=float((p == ref).mean()), latency_ms=1e3 * elapsed / len(calib),
                            flops_fraction=float(torch.cat(flops).double().mean() / full_flops), predictions=p,
                            executed=torch.cat(executed).numpy(),
                            threshold=getattr(policy, "threshold", None))


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
    source: str = "gates"  # the decision source of every point (see make_policy)
    _memo: dict[str, CalibrationPoint] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def frame(self) -> pd.DataFrame:
        """One row per grid threshold: accuracy, agreement, latency, FLOPs fraction."""
        return pd.DataFrame([{"threshold": t, "accuracy": p.accuracy, "agreement with full": p.agreement,
                              "latency ms/image": p.latency_ms, "predicted ms/image": p.predicted_latency_ms,
                              "FLOPs fraction": p.flops_fraction, "blocks run (mean)": float(p.executed.sum(1).mean())}
                             for t, p in sorted(self.points.items())])

    def point_for(self, net: SkipNetwork, threshold: float, overrides: Mapping[int, Override] | None = None,
                  batch_size: int = 256) -> CalibrationPoint:
        """The precomputed point for a grid threshold without overrides, else computed once and memoised."""
        ov = {int(k): v for k, v in (overrides or {}).items() if v != "auto"}
        t = round(float(threshold), 4)
        if not ov and t in self.points:
            return self.points[t]
        key = json.dumps({"t": t, "ov": {str(k): v for k, v in sorted(ov.items())}})
        with self._lock:
            if key not in self._memo:
                self._memo[key] = evaluate_calibration(net, self.calib, make_policy(net, t, ov, self.source),
                                                       self.full.predictions, batch_size)
            return self._memo[key]


def sweep_calibration(net: SkipNetwork, calib: CalibrationSet, thresholds: Sequence[float] | None = None,
                      progress: Callable[[float, str], None] | None = None, batch_size: int = 256,
                      source: str = "gates") -> CalibrationSweep:
    """Precompute the full network and every grid threshold over the calibration set (``progress(frac, text)``),
    decisions from ``source`` (see :func:`make_policy`)."""
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


def pareto_figure(sweep: CalibrationSweep, current: CalibrationPoint, use_predicted: bool = False) -> go.Figure:
    """Accuracy vs latency per image over the calibration set: every grid threshold, the Pareto front, the
    full network and the current setting marked."""
    df = sweep.frame()
    xcol = "predicted ms/image" if use_predicted and df["predicted ms/image"].notna().all() else "latency ms/image"
    what = "predicted" if xcol.startswith("predicted") else "measured"
    cur_x = current.predicted_latency_ms if what == "predicted" and current.predicted_latency_ms else current.latency_ms
    full_x = sweep.full.predicted_latency_ms if what == "predicted" and sweep.full.predicted_latency_ms \
        else sweep.full.latency_ms
    front = pareto_mask(df[xcol], df["accuracy"])
    fr = df[front].sort_values(xcol)
    acc_name = "accuracy" if sweep.calib.labelled else "agreement with full (no labels)"
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=df[xcol], y=df["accuracy"], mode="markers", name="thresholds",
                             marker=dict(color=df["threshold"], colorscale="Viridis", size=9,
                                         colorbar=dict(title="threshold")),
                             customdata=np.stack([df["threshold"], df["FLOPs fraction"]], 1),
                             hovertemplate="threshold %{customdata[0]:.2f}<br>%{x:.3f} ms/image<br>"
                                           "%{y:.1%}<br>FLOPs %{customdata[1]:.1%}<extra></extra>"))
    fig.add_trace(go.Scatter(x=fr[xcol], y=fr["accuracy"], mode="lines", name="Pareto front",
                             line=dict(color="#495057", shape="hv")))
    fig.add_trace(go.Scatter(x=[full_x], y=[sweep.full.accuracy], mode="markers", name="full network",
                             marker=dict(symbol="square", size=12, color="#1c7ed6")))
    fig.add_trace(go.Scatter(x=[cur_x], y=[current.accuracy], mode="markers", name="current setting",
                             marker=dict(symbol="star", size=18, color="#e03131", line=dict(width=1, color="black"))))
    fig.update_layout(title=f"{acc_name.capitalize()} vs {what} latency ({sweep.device}, batch "
                            f"{min(256, len(sweep.calib))}; {len(sweep.calib)} images)",
                      xaxis_title=f"{what} latency per image (ms)", yaxis_title=acc_name, height=420,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


def skip_rate_figure(point: CalibrationPoint, net: SkipNetwork) -> go.Figure:
    """Fraction of calibration images that bypassed each block (downsampling blocks outlined)."""
    rate = point.skip_rate
    fig = go.Figure(go.Bar(x=net.block_names, y=rate, marker=dict(
        color=rate, colorscale="Blues", cmin=0, cmax=1,
        line=dict(color=["#000" if b.downsample else "rgba(0,0,0,0)" for b in net.blocks],
                  width=[3 if b.downsample else 0 for b in net.blocks])),
        text=[f"{r:.0%}" for r in rate], textposition="outside"))
    fig.update_layout(title="Skip rate per block (calibration set)", yaxis=dict(title="fraction bypassed",
                      range=[0, 1.1]), height=320, margin=dict(l=40, r=20, t=50, b=40))
    return fig


def calibration_summary(point: CalibrationPoint, full: CalibrationPoint) -> pd.DataFrame:
    """Current setting vs full network over the calibration set, one row each."""
    rows = []
    for name, p in (("current", point), ("full", full)):
        rows.append({"run": name, "accuracy": p.accuracy, "agreement with full": p.agreement,
                     "latency ms/image": p.latency_ms, "FLOPs fraction": p.flops_fraction,
                     "blocks run (mean)": float(p.executed.sum(1).mean())})
    return pd.DataFrame(rows)


def overrides_from_choices(choices: Mapping[int, str]) -> dict[int, Override]:
    """Page widget values (``"auto"``/``"run"``/``"skip"`` per block) -> GatePolicy overrides."""
    return {int(k): v for k, v in choices.items() if v in ("run", "skip")}


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def compare_points(points: Mapping[str, CalibrationPoint]) -> pd.DataFrame:
    """Several policies over the same calibration set: accuracy, agreement, FLOPs cut, measured latency."""
    return pd.DataFrame([{"policy": name, "accuracy": p.accuracy, "agreement with full": p.agreement,
                          "FLOPs cut": 1.0 - p.flops_fraction, "latency ms/image": p.latency_ms,
                          "blocks run (mean)": float(p.executed.sum(1).mean())} for name, p in points.items()])


def calibration_dataset(calib: CalibrationSet):
    """The calibration set as a :class:`skipviz.data.TensorDataset` (for the redundancy/audit functions)."""
    from .data import TensorDataset, file_list_sha256

    files = [f"calibration/{i}" for i in range(len(calib))]
    return TensorDataset(calib.images, calib.labels, calib.classes, files, calib.source, file_list_sha256(files))
