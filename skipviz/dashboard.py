"""What the dashboard's pages call that is not a figure, a measurement or an evaluation of its own: a thin
layer over the library (no Streamlit).

Thread set-up, model loading with a fallback, the model tables, the decision sources a network offers,
one-input inspection (skipped vs full run, measured latency per block) and its tables. Figures are
:mod:`skipviz.figures`', the calibration sweep :mod:`skipviz.evaluate.calibration`'s, the latency measurement
:mod:`skipviz.measure.runs`', the policy :func:`skipviz.policies.make_policy`'s.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ._checkpoint import CheckpointError
from .engine.network import SkipNetwork
from .engine.trace import SampleTrace
from .measure.clock import resolve_device
from .measure.runs import LatencyResult, measure_input_latency
from .models._registry import DEFAULT_MODEL, create_model, list_models, list_pretrained
from .policies.base import Override, Policy, normalise_overrides
from .policies.simple import FullPolicy
from .policies.threshold import score_label

__all__ = ["InspectResult", "LoadedModel", "block_table", "configure_threads", "decision_sources", "decisions",
           "finite_or_none", "inference_device", "inspect", "load_model", "load_uploaded_weights",
           "model_card_table", "models_table", "overrides_from_choices", "preprocess", "run_full", "top5_side_by_side",
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
    latency = measure_input_latency(net, x, policy, trace, repeats) if measure else None
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


def overrides_from_choices(choices: Mapping[int, str]) -> dict[int, Override]:
    """Page widget values (``"auto"``/``"run"``/``"skip"`` per block) -> GatePolicy overrides."""
    return normalise_overrides(choices, auto=True)


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v
