"""The dashboard's models (no Streamlit): thread set-up, loading a registered model with a fallback to random
init that says why, weights uploaded by a user (recognised by hash when they are a shipped file), and the
model tables of the Model page. Re-exported by :mod:`skipviz.dashboard`."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from ._checkpoint import CheckpointError
from .engine.network import SkipNetwork
from .measure.clock import resolve_device
from .models._registry import DEFAULT_MODEL, create_model, list_models, list_pretrained
from .models.weights import sha256_file

__all__ = ["LoadedModel", "configure_threads", "inference_device", "load_model", "load_uploaded_weights",
           "model_card_table", "models_table", "shipped_weights_with_sha256", "untrained_warning", "weights_state"]


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
    pre = list_pretrained()
    rows = []
    for arch in list_models():
        for w in [w for w in pre if w.arch == arch] or [None]:  # a row per shipped weights file of the family
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
