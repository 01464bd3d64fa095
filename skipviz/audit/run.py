"""Running an audit: every input under the policy and through the full network (the shadow run), one
:class:`~skipviz.audit.records.AuditRecord` per input, stored in one transaction per batch.

* :func:`run_audit` - over folders, file lists and zip archives; :func:`audit_uploaded_files` - the dashboard's
  uploads; :func:`audit_items` - already collected inputs.
* :func:`load_run` - an earlier run back from the database.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from PIL import Image

from .._imageio import ImageLoadError, load_image
from ..measure.clock import environment, synchronize
from ..measure.runs import default_audit_batch_size
from ..models._registry import create_model
from ..policies.base import Policy
from ..policies.threshold import policy_for
from ..redundancy import kl_from_logits
from .archive import ArchiveError, InputItem, collect_inputs, items_from_uploads
from .records import AuditRecord, AuditRun
from .store import AuditStore, utc_now

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["ProgressFn", "audit_items", "audit_uploaded_files", "load_run", "model_name_of", "params_sha256",
           "run_audit"]

THUMBNAIL_PX = 48


ProgressFn = Callable[[float, str], Any]  # (fraction done in [0, 1], text); Streamlit's st.progress(...).progress fits


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


def _as_store(db: str | Path | AuditStore) -> tuple[AuditStore, bool]:
    return (db, False) if isinstance(db, AuditStore) else (AuditStore(db), True)


def _resolve_model(model: "SkipNetwork | str", weights: str | None = None) -> "SkipNetwork":
    if isinstance(model, str):
        return create_model(model, weights=weights) if weights else create_model(model)
    return model


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
    base = dict(run_id=run_id, model_name=model_name, weights_sha256=net.meta.weights_sha256, params_sha256=psha,
                policy=pconf, device=str(device), versions=versions)
    store, owned = _as_store(db)
    records: list[AuditRecord] = []
    sources: dict[int, bytes] = {}
    timings = {"skip_s": 0.0, "full_s": 0.0, "images": 0, "batches": 0}
    try:
        store.create_run(run_id, model_name, net.meta.weights_sha256, pconf, config)
        total = len(items)
        if progress:
            progress(0.0, f"0/{total} inputs")
        tf = net.meta.transforms()
        for b, start in enumerate(range(0, total, batch_size)):
            batch_records, batch_data, loaded = _load_batch(items[start: start + batch_size], base, tf, thumbnails)
            if loaded:
                _run_batch(net, policy, loaded, b, device, warm=timings["batches"] == 0, timings=timings)
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


def _load_batch(chunk: Sequence[InputItem], base: dict, tf: Callable, thumbnails: bool
                ) -> tuple[list[AuditRecord], list[bytes | None], list[tuple[AuditRecord, Image.Image, torch.Tensor]]]:
    """One batch's inputs read and preprocessed: every input's record (a failed one for an input that cannot be
    read), its in-memory bytes, and ``(record, image, tensor)`` of the inputs that loaded."""
    batch_records: list[AuditRecord] = []
    batch_data: list[bytes | None] = []
    loaded: list[tuple[AuditRecord, Image.Image, torch.Tensor]] = []
    for item in chunk:
        item_base = dict(input_name=item.name, input_path=item.source, label=item.label, **base)
        try:
            image, info = load_image(item.read())
            tensor = tf(image)
        except (ImageLoadError, ArchiveError, OSError, ValueError, RuntimeError, MemoryError) as e:
            # one input that cannot be read (or fits in no memory) is a failed row; the audit goes on
            error = str(e) if not isinstance(e, MemoryError) else f"out of memory reading this input ({e})"
            rec = AuditRecord(status="failed", error=error, timestamp=utc_now(), **item_base)
            batch_records.append(rec)
            batch_data.append(item.data)
            continue
        rec = AuditRecord(status="ok", timestamp="", input_sha256=info.sha256,
                          image={**info.to_dict(), "name": item.name},
                          thumbnail_png_b64=_thumbnail(image) if thumbnails else None, **item_base)
        loaded.append((rec, image, tensor))
        batch_records.append(rec)
        batch_data.append(item.data)
    return batch_records, batch_data, loaded


def _run_batch(net: "SkipNetwork", policy: Policy, loaded: list[tuple[AuditRecord, Image.Image, torch.Tensor]],
               b: int, device: torch.device, warm: bool, timings: dict) -> None:
    """Run one batch under the policy and through the full network, timed apart (``timings`` updated), and fill
    its records. ``warm``: run both on two inputs first, so that first-call overheads (allocator, kernel
    selection) stay out of the timings."""
    x = torch.stack([t for _, _, t in loaded]).to(device)
    with torch.no_grad():
        if warm:
            net.run(x[:2], policy)
            net(x[:2])
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
    kl = kl_from_logits(full_logits, res.logits).cpu()
    fprob = torch.softmax(full_logits.detach().float().cpu(), dim=1)
    fconf, fpred = fprob.max(1)
    classes = net.meta.classes
    stamp = utc_now()
    for pos, ((rec, _, _), tr) in enumerate(zip(loaded, res.traces())):
        k = int(fpred[pos])
        rec.timestamp = stamp
        rec.trace = tr.to_dict()
        rec.predicted_index, rec.predicted_label, rec.confidence = (tr.predicted_index, tr.predicted_label,
                                                                    tr.confidence)
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
