"""Audit trail: every skip decision for every input, stored, reproducible and exportable.

* :class:`AuditRecord` - one input in one run: input hash and image metadata, model and weights hashes, the
  policy, every block's decision (a :class:`~skipviz.trace.SampleTrace` as a dict), the prediction, the FULL
  network's prediction on the same input (shadow run), agreement, KL(full || skipped), FLOPs, latency, device,
  versions, timestamp, label; or the error text for an input that could not be read.
* :func:`run_audit` - a batch audit over folders, file lists and zip archives into an
  :class:`~skipviz._store.AuditStore` (one transaction per batch); :func:`audit_uploaded_files` - the same for
  the dashboard's uploads.
* :func:`reproduce` / :func:`reproduce_many` - re-run stored records and compare decisions and logits
  bit-for-bit on CPU (within :data:`GPU_ATOL` elsewhere, with deterministic algorithms).
* :func:`measure_throughput` - images/s of the skipped run with and without the shadow run against the plain
  full network on the same batches.
* :func:`add_cli` - the ``skipviz audit`` command.

Reproducing a record re-runs its whole batch: the engine runs each block on the samples that execute it,
packed together, so a sample's floating-point result depends on which other samples shared its batch (convolution kernels pick
different algorithms for different batch sizes). Replaying the same batch makes bit-for-bit comparison valid.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ._archive import ArchiveError, InputItem, collect_inputs, items_from_uploads, read_source
from ._imageio import ImageLoadError, load_image
from ._store import AuditStore, StoreError, utc_now
from .policies import Policy, policy_for, policy_from_config
from .timing import synchronize

if TYPE_CHECKING:  # pragma: no cover
    from .network import SkipNetwork

GPU_ATOL = 1e-4  # absolute tolerance on logits and gate scores when a run or its replay is not on the CPU
THUMBNAIL_PX = 48
ProgressFn = Callable[[float, str], Any]  # (fraction done in [0, 1], text); Streamlit's st.progress(...).progress fits


# --------------------------------------------------------------------------------------------------- records
@dataclass
class AuditRecord:
    """One input in one audit run. ``status`` is ``"ok"`` or ``"failed"`` (then only ``error`` and the input
    identity are set).

    ``trace`` is :meth:`SampleTrace.to_dict` of the skipped run (every block's decision, score, threshold,
    reason, FLOPs, and the logits (K,)); ``full_logits`` (K,) are the shadow full run's. ``latency_ms`` and
    ``full_latency_ms`` are the batch's measured wall time divided by the images in it.
    ``batch_index``/``batch_pos`` place the input in the batch it ran in (what :func:`reproduce` replays).
    """

    run_id: str
    input_name: str
    input_path: str | None
    status: str
    model_name: str
    weights_sha256: str | None
    params_sha256: str | None
    policy: dict
    device: str
    versions: dict
    timestamp: str
    input_sha256: str | None = None
    image: dict | None = None
    label: str | None = None
    error: str | None = None
    trace: dict | None = None
    predicted_index: int | None = None
    predicted_label: str | None = None
    confidence: float | None = None
    full_logits: list[float] | None = None
    full_predicted_index: int | None = None
    full_predicted_label: str | None = None
    full_confidence: float | None = None
    agree: bool | None = None
    kl_full_skipped: float | None = None
    flops_executed: int | None = None
    flops_full: int | None = None
    blocks_executed: int | None = None
    blocks_total: int | None = None
    latency_ms: float | None = None
    full_latency_ms: float | None = None
    batch_index: int | None = None
    batch_pos: int | None = None
    batch_size: int | None = None
    thumbnail_png_b64: str | None = None
    record_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def executed_mask(self) -> list[bool]:
        return [bool(b["executed"]) for b in self.trace["blocks"]] if self.trace else []

    @property
    def correct(self) -> bool | None:
        return None if self.label is None or not self.ok else self.predicted_label == self.label

    @property
    def full_correct(self) -> bool | None:
        return None if self.label is None or not self.ok else self.full_predicted_label == self.label

    @property
    def flops_saved_fraction(self) -> float | None:
        if self.flops_executed is None or not self.flops_full:
            return None
        return 1.0 - self.flops_executed / self.flops_full

    def to_dict(self, thumbnail: bool = True) -> dict:
        out = dataclasses.asdict(self)
        if not thumbnail:
            out.pop("thumbnail_png_b64")
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict) -> "AuditRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "AuditRecord":
        return cls.from_dict(json.loads(text))

    def flat(self) -> dict:
        """One flat row (CSV/DataFrame): identity, outcome, agreement, cost, and the executed mask as text, one
        character per block: ``R`` ran, ``-`` bypassed (letters, so spreadsheets do not read it as a number)."""
        return {
            "record_id": self.record_id, "run_id": self.run_id, "input_name": self.input_name,
            "input_path": self.input_path, "input_sha256": self.input_sha256, "status": self.status,
            "error": self.error, "label": self.label, "predicted": self.predicted_label,
            "confidence": self.confidence, "full_predicted": self.full_predicted_label,
            "full_confidence": self.full_confidence, "agree": self.agree, "correct": self.correct,
            "full_correct": self.full_correct, "kl_full_skipped": self.kl_full_skipped,
            "blocks_executed": self.blocks_executed, "blocks_total": self.blocks_total,
            "executed_mask": "".join("R" if e else "-" for e in self.executed_mask) or None,
            "flops_executed": self.flops_executed, "flops_full": self.flops_full,
            "flops_saved_fraction": self.flops_saved_fraction, "latency_ms": self.latency_ms,
            "full_latency_ms": self.full_latency_ms, "model_name": self.model_name,
            "weights_sha256": self.weights_sha256, "policy": json.dumps(self.policy, sort_keys=True),
            "device": self.device, "timestamp": self.timestamp,
            "image_format": (self.image or {}).get("format"), "image_width": (self.image or {}).get("width"),
            "image_height": (self.image or {}).get("height"),
        }


def records_to_dataframe(records: Sequence[AuditRecord]) -> pd.DataFrame:
    """One row per record (:meth:`AuditRecord.flat`), disagreements first, then failed rows, then the rest."""
    rows = [r.flat() for r in records]
    df = pd.DataFrame(rows, columns=list(AuditRecord(run_id="", input_name="", input_path=None, status="",
                                                     model_name="", weights_sha256=None, params_sha256=None,
                                                     policy={}, device="", versions={},
                                                     timestamp="").flat().keys()))
    if df.empty:
        return df
    order = np.where(df["agree"].eq(False), 0, np.where(df["status"].eq("failed"), 1, 2))
    return df.assign(_o=order).sort_values(["_o", "record_id"], kind="stable").drop(columns="_o").reset_index(
        drop=True)


# --------------------------------------------------------------------------------------------- environment
def environment(device: torch.device | str = "cpu") -> dict:
    """Library versions and the machine a run used (what a reviewer needs to judge a reproduction)."""
    from . import __version__
    from ._env import package_version

    dev = torch.device(device)
    out = {"skipviz": __version__, "torch": torch.__version__, "torchvision": package_version("torchvision"),
           "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
           "device": str(dev), "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    if dev.type == "cuda" and torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def params_sha256(net: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names, dtypes, shapes, bytes): identifies the exact weights,
    also for a randomly initialised model that has no weights file."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_name_of(net: "SkipNetwork") -> str:
    """``arch.weights_name`` (or just ``arch`` for random init): what :func:`rebuild_model` resolves."""
    return f"{net.meta.arch}.{net.meta.weights_name}" if net.meta.weights_name else net.meta.arch


def _thumbnail(image: Image.Image, px: int = THUMBNAIL_PX) -> str:
    im = image.copy()
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _kl(full_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_full || p_skipped) per sample, float64. Inputs (N, K) logits; output (N,)."""
    lp_full = torch.log_softmax(full_logits.double(), dim=1)
    lp_skip = torch.log_softmax(logits.double(), dim=1)
    return (lp_full.exp() * (lp_full - lp_skip)).sum(1).clamp_min(0.0)


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class AuditRun:
    """One finished audit: its records (stored), configuration, timings and environment.

    ``timings``: ``skip_s`` / ``full_s`` seconds spent in the skipped runs and the shadow full runs, over
    ``images`` images. ``sources`` maps ``record_id`` to bytes for inputs that exist only in memory (uploads),
    so they can be reproduced while the run object lives.
    """

    run_id: str
    db_path: str
    model_name: str
    weights_sha256: str | None
    params_sha256: str
    policy: dict
    config: dict
    environment: dict
    records: list[AuditRecord]
    timings: dict
    sources: dict[int, bytes] = field(default_factory=dict)

    @property
    def ok_records(self) -> list[AuditRecord]:
        return [r for r in self.records if r.ok]

    @property
    def failed_records(self) -> list[AuditRecord]:
        return [r for r in self.records if not r.ok]

    def throughput(self) -> dict:
        """Images/s measured during the audit: skipped run alone, skipped + shadow full run, full alone."""
        n, s, f = self.timings.get("images", 0), self.timings.get("skip_s", 0.0), self.timings.get("full_s", 0.0)
        return {"images": n, "skip_images_per_s": n / s if s else None,
                "skip_with_shadow_images_per_s": n / (s + f) if s + f else None,
                "full_images_per_s": n / f if f else None}

    def dataframe(self) -> pd.DataFrame:
        return records_to_dataframe(self.records)


def _as_store(db: str | Path | AuditStore) -> tuple[AuditStore, bool]:
    return (db, False) if isinstance(db, AuditStore) else (AuditStore(db), True)


def _resolve_model(model: "SkipNetwork | str", weights: str | None = None) -> "SkipNetwork":
    if isinstance(model, str):
        from . import create_model

        return create_model(model, weights=weights) if weights else create_model(model)
    return model


def default_audit_batch_size(net: "SkipNetwork", budget_bytes: int = 32 << 20, largest: int = 256) -> int:
    """Images per audit batch: the largest power of two <= ``largest`` whose stem output (a ResNet's widest
    activation) for one input of ``net.meta.input_size`` fits ``budget_bytes`` times the batch.

    Skipping pays more in larger batches: every block runs on the sub-batch that executes it, and on CPU a
    small sub-batch costs more per image than a large one. For the default model on the 2-core CPU
    (``benchmarks/results/audit_throughput_cpu.md``, threshold 0.5) the skipped run's efficiency against the
    FLOP ideal is 0.77 / 0.83 / 0.87 / 0.89 at batch 32 / 64 / 128 / 256, and its images/s are level from 128
    to 256 (2,911 and 2,887), within the machine's run-to-run drift.
    The budget keeps 224-pixel ImageNet ResNets at batch 32.
    """
    param = next(net.parameters())
    was_training = net.training
    net.eval()  # a training-mode stem would update BatchNorm statistics
    try:
        with torch.inference_mode():
            stem_out = net.stem(torch.zeros((1, *net.meta.input_size), device=param.device, dtype=param.dtype))
    finally:
        net.train(was_training)
    per_image = stem_out.numel() * stem_out.element_size()
    n = largest
    while n > 1 and n * per_image > budget_bytes:
        n //= 2
    return n


def audit_items(items: Sequence[InputItem], net: "SkipNetwork", policy: Policy | None,
                db: str | Path | AuditStore, batch_size: int | None = None, progress: ProgressFn | None = None,
                run_id: str | None = None, thumbnails: bool = True, extra_config: dict | None = None) -> AuditRun:
    """Audit already collected inputs (see :func:`run_audit`)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    policy = policy if policy is not None else policy_for(net)
    net.eval()
    batch_size = default_audit_batch_size(net) if batch_size is None else int(batch_size)
    device = next(net.parameters()).device
    env = environment(device)
    versions = {k: env[k] for k in ("skipviz", "torch", "torchvision", "numpy", "python", "torch_threads")}
    run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    model_name = model_name_of(net)
    psha = params_sha256(net)
    pconf = policy.config()
    config = {"model": model_name, "model_meta": net.meta.to_dict(), "params_sha256": psha, "policy": pconf,
              "batch_size": batch_size, "n_inputs": len(items), "device": str(device), **(extra_config or {})}
    store, owned = _as_store(db)
    records: list[AuditRecord] = []
    sources: dict[int, bytes] = {}
    timings = {"skip_s": 0.0, "full_s": 0.0, "images": 0, "batches": 0}
    try:
        store.create_run(run_id, model_name, net.meta.weights_sha256, pconf, config)
        total = len(items)
        if progress:
            progress(0.0, f"0/{total} inputs")
        warmed = False
        tf = net.meta.transforms()
        for b, start in enumerate(range(0, total, batch_size)):
            chunk = items[start: start + batch_size]
            batch_records: list[AuditRecord] = []
            batch_data: list[bytes | None] = []
            loaded: list[tuple[AuditRecord, Image.Image, torch.Tensor]] = []
            for item in chunk:
                base = dict(run_id=run_id, input_name=item.name, input_path=item.source, model_name=model_name,
                            weights_sha256=net.meta.weights_sha256, params_sha256=psha, policy=pconf,
                            device=str(device), versions=versions, label=item.label)
                try:
                    image, info = load_image(item.read())
                    tensor = tf(image)
                except (ImageLoadError, ArchiveError, OSError, ValueError, RuntimeError, MemoryError) as e:
                    # one input that cannot be read (or fits in no memory) is a failed row; the audit goes on
                    error = str(e) if not isinstance(e, MemoryError) else f"out of memory reading this input ({e})"
                    rec = AuditRecord(status="failed", error=error, timestamp=utc_now(), **base)
                    batch_records.append(rec)
                    batch_data.append(item.data)
                    continue
                rec = AuditRecord(status="ok", timestamp="", input_sha256=info.sha256,
                                  image={**info.to_dict(), "name": item.name},
                                  thumbnail_png_b64=_thumbnail(image) if thumbnails else None, **base)
                loaded.append((rec, image, tensor))
                batch_records.append(rec)
                batch_data.append(item.data)
            if loaded:
                x = torch.stack([t for _, _, t in loaded]).to(device)
                with torch.no_grad():
                    if not warmed:  # first-call overheads (allocator, kernel selection) stay out of the timings
                        net.run(x[:2], policy)
                        net(x[:2])
                        warmed = True
                    synchronize(device)
                    t0 = time.perf_counter()
                    res = net.run(x, policy)
                    synchronize(device)
                    t1 = time.perf_counter()
                    full_logits = net(x)
                    synchronize(device)
                    t2 = time.perf_counter()
                n = x.shape[0]
                timings["skip_s"] += t1 - t0
                timings["full_s"] += t2 - t1
                timings["images"] += n
                timings["batches"] += 1
                traces = res.traces()
                kl = _kl(full_logits, res.logits).cpu()
                fprob = torch.softmax(full_logits.detach().float().cpu(), dim=1)
                fconf, fpred = fprob.max(1)
                classes = net.meta.classes
                stamp = utc_now()
                for pos, ((rec, _, _), tr) in enumerate(zip(loaded, traces)):
                    k = int(fpred[pos])
                    rec.timestamp = stamp
                    rec.trace = tr.to_dict()
                    rec.predicted_index, rec.predicted_label, rec.confidence = (tr.predicted_index,
                                                                                tr.predicted_label, tr.confidence)
                    rec.full_logits = [float(v) for v in full_logits[pos].detach().float().cpu()]
                    rec.full_predicted_index = k
                    rec.full_predicted_label = classes[k] if k < len(classes) else str(k)
                    rec.full_confidence = float(fconf[pos])
                    rec.agree = rec.full_predicted_index == rec.predicted_index
                    rec.kl_full_skipped = float(kl[pos])
                    rec.flops_executed, rec.flops_full = tr.flops_executed, tr.flops_full
                    rec.blocks_executed, rec.blocks_total = tr.blocks_executed, tr.blocks_total
                    rec.latency_ms = 1000.0 * (t1 - t0) / n
                    rec.full_latency_ms = 1000.0 * (t2 - t1) / n
                    rec.batch_index, rec.batch_pos, rec.batch_size = b, pos, n
            store.add_records(batch_records)  # one transaction per batch
            for rec, data in zip(batch_records, batch_data):
                if data is not None and rec.input_path is None and rec.record_id is not None:
                    sources[rec.record_id] = data
            records.extend(batch_records)
            if progress:
                done = min(start + batch_size, total)
                progress(done / total if total else 1.0, f"{done}/{total} inputs")
        run = AuditRun(run_id=run_id, db_path=str(store.path), model_name=model_name,
                       weights_sha256=net.meta.weights_sha256, params_sha256=psha, policy=pconf, config=config,
                       environment=env, records=records, timings=timings, sources=sources)
        store.finish_run(run_id, {"n_ok": len(run.ok_records), "n_failed": len(run.failed_records),
                                  "timings": timings, "throughput": run.throughput(), "environment": env})
        return run
    except BaseException:
        with contextlib.suppress(Exception):
            store.finish_run(run_id, status="aborted")
        raise
    finally:
        if owned:
            store.close()


def run_audit(paths: Sequence[str | Path], model: "SkipNetwork | str", policy: Policy | None,
              db: str | Path | AuditStore, labels_from_folders: bool = False, batch_size: int | None = None,
              progress: ProgressFn | None = None, run_id: str | None = None, thumbnails: bool = True) -> AuditRun:
    """Audit every image under ``paths`` (folders, files, zip archives) with ``model`` under ``policy``.

    Each batch runs twice: under the policy (the skipped run, really skipping) and through the plain full
    network (the shadow run), timed separately. An unreadable input becomes a failed record with the reason
    and the audit goes on. Records are written to ``db`` in one transaction per batch.

    Args:
        paths: folders (searched recursively for image files), image files, ``.zip`` archives.
        model: a :class:`SkipNetwork` or a registered model name.
        policy: the skipping policy; ``None`` for the model card's default.
        db: SQLite file path or an open :class:`AuditStore`.
        labels_from_folders: the parent folder name is the input's label (ImageFolder layout).
        batch_size: images per engine batch (and per transaction); ``None``: :func:`default_audit_batch_size`.
        progress: called as ``progress(fraction, text)`` after every batch (e.g. a Streamlit progress bar).
    Raises:
        ArchiveError: a path does not exist or an archive is refused (traversal, zip bomb).
    """
    net = _resolve_model(model)
    items = collect_inputs(paths, labels_from_folders=labels_from_folders)
    return audit_items(items, net, policy, db, batch_size=batch_size, progress=progress, run_id=run_id,
                       thumbnails=thumbnails, extra_config={"paths": [str(p) for p in paths],
                                                            "labels_from_folders": labels_from_folders})


def audit_uploaded_files(files: Iterable[tuple[str, bytes]], net: "SkipNetwork", policy: Policy | None,
                         db_path: str | Path | AuditStore, labels_from_folders: bool = False,
                         batch_size: int | None = None, progress: ProgressFn | None = None) -> AuditRun:
    """The dashboard's entry point: audit uploaded ``(name, bytes)`` pairs (``.zip`` uploads are expanded
    safely). The bytes of each input are kept in ``AuditRun.sources`` so the run can be reproduced."""
    items = items_from_uploads(files, labels_from_folders=labels_from_folders)
    return audit_items(items, net, policy, db_path, batch_size=batch_size, progress=progress,
                       extra_config={"paths": ["<upload>"], "labels_from_folders": labels_from_folders})


# ------------------------------------------------------------------------------------------------ reproduce
@dataclass
class ReproResult:
    """Whether a stored record was reproduced. On CPU (``tolerance == 0``) every logit and gate score must be
    bit-for-bit equal; otherwise within ``tolerance`` (absolute). Decisions (which blocks ran) and the
    predictions must always match exactly."""

    record_id: int | None
    input_name: str
    reproduced: bool
    decisions_match: bool
    prediction_match: bool
    logits_match: bool
    full_match: bool
    max_abs_logit_diff: float
    max_abs_score_diff: float
    tolerance: float
    device: str
    message: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rebuild_model(record: AuditRecord) -> "SkipNetwork":
    """The network a record was made with, from its weights file (checked against the stored hashes)."""
    from . import create_model, list_models

    arch, _, tag = record.model_name.partition(".")
    if not tag:
        raise StoreError(f"record {record.record_id} used a randomly initialised {arch}: pass the same network "
                         "object (net=...) to reproduce it")
    if record.model_name not in list_models(pretrained=True):
        raise StoreError(f"record {record.record_id} used {record.model_name}, weights not registered or not present "
                         "here (a local weights file?): load that network and pass it (net=...) to reproduce it")
    net = create_model(record.model_name)
    if record.weights_sha256 and net.meta.weights_sha256 != record.weights_sha256:
        raise StoreError(f"{record.model_name}: weights file changed since the audit (sha256 "
                         f"{net.meta.weights_sha256} != recorded {record.weights_sha256})")
    return net


@contextlib.contextmanager
def _deterministic(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _max_diff(a: Sequence[float | None], b: Sequence[float | None]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return math.inf
        if x is not None and not (math.isnan(x) and math.isnan(y)):
            worst = max(worst, abs(x - y))
    return worst


def _load_source(rec: AuditRecord, sources: dict[int, bytes] | None,
                 archives: dict[str, dict[str, InputItem]] | None = None) -> Image.Image:
    """A record's input image again, hash-checked; ``archives`` caches zip archives across a batch."""
    if sources and rec.record_id in sources:
        data: bytes | str = sources[rec.record_id]
    elif rec.input_path:
        data = read_source(rec.input_path, cache=archives)
    else:
        raise StoreError(f"{rec.input_name}: was uploaded and its bytes are no longer available")
    image, info = load_image(data)
    if info.sha256 != rec.input_sha256:
        raise StoreError(f"{rec.input_name}: input changed since the audit (sha256 {info.sha256[:12]} != recorded "
                         f"{str(rec.input_sha256)[:12]})")
    return image


def reproduce_many(store: AuditStore | str | Path, record_ids: Iterable[int], net: "SkipNetwork | None" = None,
                   sources: dict[int, bytes] | None = None, device: str | torch.device | None = None,
                   atol: float = GPU_ATOL) -> list[ReproResult]:
    """Re-run stored records (grouped so that each batch is replayed once) and compare with what was stored.

    Each record's whole batch is reloaded from its sources (paths, zip members or ``sources`` bytes), the
    input hashes are checked, the policy is rebuilt with :func:`policy_from_config`, and the batch is run with
    ``torch.use_deterministic_algorithms(True)``. A record that cannot be replayed (file gone or changed,
    weights changed) gives a result with ``reproduced=False`` and the reason in ``message``.
    """
    st, owned = _as_store(store)
    try:
        wanted = st.query(record_ids=list(record_ids))
        results: list[ReproResult] = []
        groups: dict[tuple[str, int], list[AuditRecord]] = {}
        for rec in wanted:
            if not rec.ok:
                results.append(ReproResult(rec.record_id, rec.input_name, False, False, False, False, False,
                                           math.inf, math.inf, 0.0, "", "failed input: nothing to reproduce"))
                continue
            groups.setdefault((rec.run_id, int(rec.batch_index)), []).append(rec)
        for (run_id, b), targets in groups.items():
            results.extend(_replay_batch(st, run_id, b, targets, net, sources, device, atol))
        order = {r.record_id: i for i, r in enumerate(wanted)}
        return sorted(results, key=lambda r: order.get(r.record_id, 0))
    finally:
        if owned:
            st.close()


def _replay_batch(store: AuditStore, run_id: str, batch_index: int, targets: list[AuditRecord],
                  net: "SkipNetwork | None", sources: dict[int, bytes] | None, device: str | torch.device | None,
                  atol: float) -> list[ReproResult]:
    def fail(msg: str) -> list[ReproResult]:
        return [ReproResult(t.record_id, t.input_name, False, False, False, False, False, math.inf, math.inf,
                            0.0, str(device or ""), msg) for t in targets]

    try:
        first = targets[0]
        net = net if net is not None else rebuild_model(first)
        if params_sha256(net) != first.params_sha256:
            return fail("the network's weights differ from the audited ones (params sha256 mismatch)")
        if device is not None:
            net = net.to(device)
        dev = next(net.parameters()).device
        siblings = store.query(run_id=run_id, batch_index=batch_index, status="ok")
        siblings.sort(key=lambda r: r.batch_pos)
        archives: dict[str, dict[str, InputItem]] = {}  # each zip read once for the whole batch
        images = [_load_source(r, sources, archives) for r in siblings]
        policy = policy_from_config(first.policy)
    except (StoreError, ImageLoadError, ArchiveError, OSError, ValueError, KeyError) as e:
        return fail(f"cannot replay: {e}")
    exact = dev.type == "cpu" and all(t.device == "cpu" for t in targets)
    tol = 0.0 if exact else atol
    net.eval()
    x = net.meta.preprocess(images).to(dev)
    with torch.no_grad(), _deterministic(True):
        traces = net.run(x, policy).traces()
        full = net(x).detach().float().cpu()
    out = []
    for t in targets:
        new = traces[t.batch_pos]
        old = t.trace
        decisions = ([b.executed for b in new.blocks] == [b["executed"] for b in old["blocks"]]
                     and [b.reason for b in new.blocks] == [b["reason"] for b in old["blocks"]]) if exact else (
            [b.executed for b in new.blocks] == [b["executed"] for b in old["blocks"]])
        score_diff = _max_diff([b.score for b in new.blocks], [b["score"] for b in old["blocks"]])
        logit_diff = _max_diff(new.logits, old["logits"])
        full_diff = _max_diff([float(v) for v in full[t.batch_pos]], t.full_logits or [])
        pred = new.predicted_index == t.predicted_index and int(full[t.batch_pos].argmax()) == t.full_predicted_index
        logits_ok = logit_diff <= tol and score_diff <= tol
        full_ok = full_diff <= tol
        ok = decisions and pred and logits_ok and full_ok
        what = "bit-for-bit" if exact else f"within {tol:g}"
        msg = (f"reproduced {what}" if ok else
               f"NOT reproduced: decisions {'match' if decisions else 'differ'}, prediction "
               f"{'matches' if pred else 'differs'}, max |logit diff| {logit_diff:.3g}, max |score diff| "
               f"{score_diff:.3g}, full-network max |diff| {full_diff:.3g}")
        out.append(ReproResult(t.record_id, t.input_name, ok, decisions, pred, logits_ok, full_ok, logit_diff,
                               score_diff, tol, str(dev), msg))
    return out


def reproduce(store: AuditStore | str | Path, record: AuditRecord | int, net: "SkipNetwork | None" = None,
              sources: dict[int, bytes] | None = None, device: str | torch.device | None = None,
              atol: float = GPU_ATOL) -> ReproResult:
    """Re-run one stored record (its whole batch) and compare; see :func:`reproduce_many`."""
    rid = record.record_id if isinstance(record, AuditRecord) else int(record)
    if rid is None:
        raise StoreError("the record has no record_id: store it first")
    results = reproduce_many(store, [rid], net=net, sources=sources, device=device, atol=atol)
    if not results:
        raise StoreError(f"no record {rid} in {getattr(store, 'path', store)}")
    return results[0]


def reproduce_sample(run: AuditRun, net: "SkipNetwork | None" = None, k: int = 8, seed: int = 0,
                     store: AuditStore | None = None) -> list[ReproResult]:
    """Reproduce ``k`` successful records of a run: its disagreements first (up to ``k``), the rest drawn at random."""
    ok = [r for r in run.ok_records if r.record_id is not None]
    if not ok or k <= 0:
        return []
    rng = np.random.default_rng(seed)
    disagree = [r.record_id for r in ok if r.agree is False]
    rest = [r.record_id for r in ok if r.agree is not False]
    take = disagree[:k] + list(rng.choice(rest, size=min(len(rest), max(k - len(disagree), 0)), replace=False))
    return reproduce_many(store or run.db_path, sorted(int(i) for i in take), net=net, sources=run.sources)


# ---------------------------------------------------------------------------------------------- throughput
def measure_throughput(net: "SkipNetwork", policy: Policy, x: torch.Tensor, batch_size: int | None = None,
                       repeats: int = 7) -> dict:
    """Images/s of the skipped run, the skipped run plus the shadow full run, and the plain full network, on
    the same batches of ``x`` (N, 3, H, W), ``batch_size`` images each (default: the audit's,
    :func:`default_audit_batch_size`).

    Each of ``repeats`` rounds times one pass of the plain network and one pass of the skipped run over all
    batches, back to back (which goes first alternates between rounds, so neither gains from going second),
    so both see the same machine load. Images/s are medians over rounds; ``speedup`` is the median of the
    per-round ratios (robust to load from other work) and ``efficiency_quartiles`` the spread of the per-round
    efficiencies. Also the fraction of FLOPs executed and the issue's target: speedup >= 0.9 x (1 / fraction
    executed).
    """
    net.eval()
    batch_size = default_audit_batch_size(net) if batch_size is None else int(batch_size)
    dev = next(net.parameters()).device
    x = x.to(dev)
    batches = [x[i: i + batch_size] for i in range(0, x.shape[0], batch_size)]
    times: dict[str, list[float]] = {"skip": [], "full": []}
    with torch.inference_mode():
        flops = [net.run(xb, policy).flops_executed() for xb in batches]  # also warms up every batch shape
        for xb in batches:
            net(xb)
        for r in range(max(1, repeats)):
            for kind in (("full", "skip") if r % 2 == 0 else ("skip", "full")):
                synchronize(dev)
                t0 = time.perf_counter()
                for xb in batches:
                    if kind == "skip":
                        net.run(xb, policy)
                    else:
                        net(xb)
                synchronize(dev)
                times[kind].append(time.perf_counter() - t0)
    n = x.shape[0]
    fraction = float(torch.cat(flops).double().mean()) / net.flop_table(tuple(x.shape[-2:])).full
    skip_s, full_s = statistics.median(times["skip"]), statistics.median(times["full"])
    ratios = [f / s for f, s in zip(times["full"], times["skip"])]
    speedup = statistics.median(ratios)
    quartiles = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3)
    full = n / full_s
    return {"images": n, "batch_size": batch_size, "device": str(dev), "torch_threads": torch.get_num_threads(),
            "rounds": len(times["full"]), "skip_images_per_s": n / skip_s,
            "skip_with_shadow_images_per_s": n / (skip_s + full_s), "full_images_per_s": full,
            "flops_fraction_executed": fraction, "speedup": speedup, "ideal_speedup": 1.0 / fraction,
            "efficiency": speedup * fraction,
            "efficiency_quartiles": [quartiles[0] * fraction, quartiles[2] * fraction],
            "target_images_per_s": 0.9 * full / fraction,
            "meets_target": speedup >= 0.9 / fraction}


# ---------------------------------------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def cmd_audit(args: argparse.Namespace) -> int:
    """``skipviz audit``: run, store, reproduce a sample, write report.html/.json/.csv."""
    from tqdm import tqdm

    from . import DEFAULT_MODEL
    from ._checkpoint import CheckpointError
    from .cli import _load_model
    from .report import write_report

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        print(f"error: --out must name an .html file, got {out}", file=sys.stderr)
        return 2
    db = Path(args.db) if args.db else out.parent / "audit.sqlite"
    try:
        net = _load_model(args.model or DEFAULT_MODEL, args.weights)
        policy = policy_for(net, args.policy, args.threshold)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        items = collect_inputs(args.paths, labels_from_folders=args.labels_from_folders)
        bar = tqdm(total=len(items), unit="img", desc="audit", disable=args.quiet)
        state = {"done": 0}

        def progress(fraction: float, text: str) -> None:
            done = round(fraction * len(items))
            bar.update(done - state["done"])
            state["done"] = done

        with AuditStore(db) as store:
            run = audit_items(items, net, policy, store, batch_size=args.batch_size, progress=progress,
                              extra_config={"paths": list(args.paths),
                                            "labels_from_folders": args.labels_from_folders})
            bar.close()
            repro = reproduce_sample(run, net, k=args.reproduce, store=store)
        paths = write_report(run, out, reproducibility=repro)
    except (ArchiveError, StoreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tp = run.throughput()
    agree = [r.agree for r in run.ok_records]
    print(f"run {run.run_id}: {len(run.ok_records)} audited, {len(run.failed_records)} failed; agreement with the "
          f"full network {sum(agree)}/{len(agree)}; database {db}")
    if tp["skip_images_per_s"]:
        print(f"throughput: {tp['skip_images_per_s']:.1f} img/s skipped, {tp['skip_with_shadow_images_per_s']:.1f} "
              f"img/s with the shadow run, {tp['full_images_per_s']:.1f} img/s full")
    if repro:
        print(f"reproduced {sum(r.reproduced for r in repro)}/{len(repro)} sampled records")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(not r.reproduced for r in repro) else 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``skipviz audit`` to the ``skipviz`` command."""
    from .cli import add_policy_argument

    a = subparsers.add_parser("audit", help="audit skipping on a folder, file list or zip; write an HTML report")
    a.add_argument("paths", nargs="+", help="image files, folders (recursive) and .zip archives")
    a.add_argument("--model", default=None, help="registered name (default: the embedded default model)")
    a.add_argument("--weights", default=None, help="a .safetensors or weights-only torch file")
    a.add_argument("--threshold", type=float, default=None,
                   help="decision threshold (default: the card's threshold for the chosen --policy)")
    add_policy_argument(a)
    a.add_argument("--labels-from-folders", action="store_true",
                   help="the parent folder name is the true class (ImageFolder layout)")
    a.add_argument("--out", required=True, help="report.html (report.json and report.csv are written beside it)")
    a.add_argument("--db", default=None, help="SQLite audit database (default: audit.sqlite beside the report)")
    a.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per batch and per transaction (default: up to 256, by the model's activation size)")
    a.add_argument("--reproduce", type=int, default=8, help="re-run this many stored records (0: none)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_audit)


def load_run(store: AuditStore | str | Path, run_id: str) -> AuditRun:
    """An earlier run back from the database (records, configuration, timings), e.g. to re-render its report.
    Uploaded inputs' bytes are not stored, so those records can no longer be reproduced."""
    st, owned = _as_store(store)
    try:
        info = st.run_info(run_id)
        records = st.query(run_id=run_id)
        summary = info.get("summary") or {}
        config = info.get("config") or {}
        return AuditRun(run_id=run_id, db_path=str(st.path), model_name=info["model_name"],
                        weights_sha256=info["weights_sha256"], params_sha256=config.get("params_sha256", ""),
                        policy=info["policy"], config=config, environment=summary.get("environment", {}),
                        records=records, timings=summary.get("timings", {}))
    finally:
        if owned:
            st.close()
