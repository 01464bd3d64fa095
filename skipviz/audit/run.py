"""Running an audit: every input under the policy and through the full network (the shadow run), one
:class:`~skipviz.audit.records.AuditRecord` per input, stored in one transaction per batch.

* :func:`run_audit` - over folders, file lists and zip archives; :func:`audit_uploaded_files` - the dashboard's
  uploads; :func:`audit_items` - already collected inputs.
* :func:`load_run` - an earlier run back from the database; :func:`find_resumable_run` - the run that
  ``resume=True`` continues.
* :func:`measure_run_latency` - the latency of the skipped run against the full one on a sample of the run's
  own inputs: interleaved paired rounds (:func:`skipviz.measure.clock.measure_interleaved`), the saving with
  a bootstrap 95 % interval (:func:`skipviz.measure.saving.paired_saving`), apart from decoding and I/O.

Every input is accounted for: an unreadable or refused one is a failed record with the reason (and the SHA-256
of its bytes when they could be read), a non-image a skipped record; the audit goes on. Durability: a batch is
stored in one transaction before the next one runs, so a kill -9 loses at most the batch in flight; the run is
then marked ``interrupted`` (by the next process that opens the database) and ``resume=True`` continues it,
skipping the inputs it already recorded, so every input appears exactly once.

Throughput: while a batch runs on the model, the next one is read, hashed, decoded and preprocessed in a
background thread (Pillow and torch release the GIL), and thumbnails (small JPEGs) are made only for the
inputs a report shows: disagreements and a sample. One batch's loading and running is
:mod:`skipviz.audit._batches`; this module enumerates the inputs, drives the batches and stores them.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch

from .._imageio import ImageLoadError, load_image
from ..measure.clock import environment, measure_interleaved
from ..measure.runs import default_audit_batch_size
from ..measure.saving import machine_busy, paired_saving
from ..models._registry import create_model
from ..policies.base import Policy
from ..policies.threshold import offered_sources, policy_for
from ._batches import THUMBNAIL_PX, BatchRunner, load_batch  # noqa: F401  (THUMBNAIL_PX: importable from here)
from .archive import ArchiveError, InputItem, collect_inputs, input_keys, items_from_uploads, read_source
from .records import AuditRecord, AuditRun
from .shadow import ShadowPlan, full_output_key, preprocessing_fingerprint
from .store import AuditStore, StoreError, open_store

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["ProgressFn", "audit_items", "audit_uploaded_files", "find_resumable_run", "load_run",
           "measure_run_latency", "model_name_of", "params_sha256", "run_audit"]

THUMBNAIL_SAMPLE = 32  # agreeing inputs that get a thumbnail (every disagreement gets one)
LATENCY_ROUNDS = 15  # paired rounds of the latency measurement after the audit (0: not measured)
LATENCY_SAMPLE = 256  # at most this many of the run's inputs, one batch, are timed


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



def _resolve_model(model: "SkipNetwork | str", weights: str | None = None) -> "SkipNetwork":
    if isinstance(model, str):
        return create_model(model, weights=weights) if weights else create_model(model)
    return model


# ------------------------------------------------------------------------------------------------ resume
def _same_audit(run: dict, model_name: str, weights_sha256: str | None, psha: str, policy: dict,
                inputs: dict) -> bool:
    config = dict(run.get("config") or {})
    config.setdefault("shadow", ShadowPlan().config())  # runs recorded before the choice existed: every input
    return (run["model_name"] == model_name and run["weights_sha256"] == weights_sha256
            and config.get("params_sha256") == psha and run["policy"] == policy
            and all(config.get(k) == v for k, v in inputs.items()))


def find_resumable_run(store: AuditStore, net: "SkipNetwork", policy: Policy, inputs: dict | None = None
                       ) -> str | None:
    """The latest run in ``store`` of the same model, weights (file hash and parameter hash) and policy over
    the same inputs (``inputs``: the configuration entries that name them, e.g. ``paths`` and
    ``labels_from_folders``, and the ``shadow`` plan) that is not running in a live process: the run ``resume=True`` continues, or
    ``None``. An interrupted run is preferred to a finished one."""
    runs = store.runs()
    if runs.empty:
        return None
    model_name, psha, pconf = model_name_of(net), params_sha256(net), policy.config()
    rows = [r for r in runs.to_dict(orient="records")
            if r["status"] != "running" and _same_audit(r, model_name, net.meta.weights_sha256, psha, pconf,
                                                        inputs or {})]
    if not rows:
        return None
    rows.sort(key=lambda r: (r["status"] != "finished", r["created_at"]))
    return str(rows[-1]["run_id"])


# ------------------------------------------------------------------------------------------------ latency
def measure_run_latency(net: "SkipNetwork", policy: Policy, x: torch.Tensor, rounds: int = LATENCY_ROUNDS,
                        warmup: int = 2) -> dict:
    """The latency of the skipped run against the full network on ``x`` (N, 3, H, W), a sample of an audit's
    own (already decoded) inputs, as one batch: both timed in ``rounds`` interleaved paired rounds
    (:func:`measure_interleaved`, the order alternating), the saving per image the median of the per-round
    differences with a bootstrap 95 % interval (:func:`paired_saving`). Decoding and I/O are not in it.

    Returns a JSON-ready dict: ``full_ms`` / ``skipped_ms`` (median per image), ``saving_ms`` with
    ``ci_low_ms`` / ``ci_high_ms``, ``measurable`` (the interval excludes zero), ``label`` (the only words a
    report may use: "no measurable saving (±x ms)" when the interval contains zero), the sample and batch
    size, rounds, device, threads, the 1-minute load average and ``busy`` (why timings are noisy, or ``None``).
    """
    net.eval()
    n = int(x.shape[0])
    with torch.no_grad():
        stats = measure_interleaved({"full": lambda: net(x), "skipped": lambda: net.run(x, policy)},
                                    warmup=warmup, repeats=max(1, int(rounds)), device=x.device, batch_size=n)
    full = [t / 1e3 / n for t in stats["full"].times_ms]
    skipped = [t / 1e3 / n for t in stats["skipped"].times_ms]
    saving = paired_saving(full, skipped)
    try:
        import os

        load = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        load = None
    busy = machine_busy()
    if busy is None and saving.noisy():
        busy = "the spread of the paired differences is wider than the saving itself: timings are noisy"
    return {"method": "interleaved paired rounds (skipviz.measure.clock.measure_interleaved), saving = median of "
                      "the per-round differences full - skipped with a bootstrap 95% interval "
                      "(skipviz.measure.saving.paired_saving); model time only, measured after the audit on a "
                      "sample of its own decoded inputs, apart from decoding and I/O",
            "sample_size": n, "batch_size": n, "rounds": saving.rounds, "calls_per_round": stats["full"].number,
            "device": str(x.device), "timer": stats["full"].method, "threads": stats["full"].threads,
            "full_ms": saving.full_median_s * 1e3, "skipped_ms": saving.skipped_median_s * 1e3,
            "saving_ms": saving.saving_s * 1e3, "ci_low_ms": saving.low_s * 1e3, "ci_high_ms": saving.high_s * 1e3,
            "saving_fraction": saving.saving_fraction if saving.measurable else None,
            "measurable": saving.measurable, "label": saving.label("ms") + " per image",
            "load_average_1min": load, "busy": busy}


def _sample_from_store(store: AuditStore, run_id: str, net: "SkipNetwork", n: int) -> torch.Tensor | None:
    """Up to ``n`` of a run's stored inputs decoded again from their sources (for a resumed run that had
    nothing left to audit), as (n, 3, H, W); ``None`` when none can be read (uploads keep no bytes)."""
    tensors = []
    archives: dict = {}
    for rec in store.query(run_id=run_id, status="ok"):
        if len(tensors) >= n:
            break
        if not rec.input_path:
            continue
        try:
            image, _ = load_image(read_source(rec.input_path, cache=archives), name=rec.input_name)
            tensors.append(net.meta.preprocess(image))
        except (ImageLoadError, ArchiveError, OSError, ValueError, RuntimeError):
            continue
    return torch.cat(tensors).to(next(net.parameters()).device) if tensors else None


# -------------------------------------------------------------------------------------------------- audit
def _open_run(store: AuditStore, run_id: str, resumed_id: str | None, base: dict, config: dict,
              thumbnails: int) -> tuple[set[str], int, int]:
    """Register a new run (model, weights and policy from the records' shared fields ``base``), or reopen the one
    being resumed (``config["shadow_resumed"]`` set as that run began): ``(keys of the inputs it already
    recorded, index of its next batch, thumbnails still to make)``."""
    if resumed_id is None:
        store.create_run(run_id, base["model_name"], base["weights_sha256"], base["policy"], config)
        return set(), 0, thumbnails
    # a run begun by a SkipViz that ran the full network from the image keeps doing so: its replay is one way
    config["shadow_resumed"] = bool((store.run_info(run_id).get("config") or {}).get("shadow_resumed"))
    store.reopen_run(run_id, config)
    recorded = store.recorded_inputs(run_id)
    done = set(input_keys(recorded))
    last = store.last_batch(run_id)
    thumbnails = max(0, thumbnails - len(store.query(run_id=run_id, status="ok", limit=thumbnails)))
    return done, 0 if last is None else last + 1, thumbnails


def _versions(env: dict) -> dict:
    """The software versions every record of a run stores, from :func:`environment`'s ``env``."""
    return {k: env[k] for k in ("skipviz", "torch", "torchvision", "numpy", "python", "torch_threads")}


def _run_summary(run: AuditRun) -> dict:
    """What the store keeps of a finished run: counts, timings, throughput, environment, latency and how many
    inputs an earlier attempt had recorded."""
    return {"n_ok": len(run.ok_records), "n_failed": len(run.failed_records), "n_skipped": len(run.skipped_records),
            "timings": run.timings, "throughput": run.throughput(), "environment": run.environment,
            "latency": run.latency, "resumed": run.resumed}


def _run_batches(store: AuditStore, todo: Sequence[InputItem], base: dict, runner: BatchRunner, batch_size: int,
                 first_batch: int, progress: ProgressFn | None, already: int
                 ) -> tuple[list[AuditRecord], dict[int, bytes]]:
    """Audit ``todo`` in batches numbered from ``first_batch``, each stored in one transaction before the next one
    runs, the next one read and decoded in a background thread meanwhile. Returns the records and the bytes of
    the inputs that have no path (uploads), by record id."""
    sources: dict[int, bytes] = {}
    records: list[AuditRecord] = []
    net, total = runner.net, len(todo)
    if progress:
        progress(0.0 if total else 1.0, f"0/{total} inputs" + (f" ({already} already recorded)" if already else ""))
    chunks = [todo[s: s + batch_size] for s in range(0, total, batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="skipviz-audit-load") as pool:
        pending: Future | None = pool.submit(load_batch, chunks[0], base, net, first_batch) if chunks else None
        for k in range(len(chunks)):
            b = first_batch + k
            batch = pending.result()
            computed = runner.compute(batch)
            # the next batch is read and decoded while this one's records are made and stored, not while the
            # model runs (BatchRunner.compute says why)
            pending = pool.submit(load_batch, chunks[k + 1], base, net, b + 1) if k + 1 < len(chunks) else None
            keys = runner.finish(batch, b, computed)
            # one transaction per batch (the records and their full outputs): a kill -9 loses at most one batch
            store.add_records(batch.records, keys)
            for rec, data in zip(batch.records, batch.data):
                if data is not None and rec.input_path is None and rec.record_id is not None:
                    sources[rec.record_id] = data
            records.extend(batch.records)
            if progress:
                done_n = min((k + 1) * batch_size, total)
                progress(done_n / total, f"{done_n}/{total} inputs")
    return records, sources


def _run_latency(store: AuditStore, run_id: str, net: "SkipNetwork", policy: Policy,
                 sample: "torch.Tensor | None", resumed: bool, rounds: int, sample_size: int) -> dict | None:
    """The run's paired latency (:func:`measure_run_latency`) on the images the runner kept (``sample``,
    ``(S, C, H, W)``), or for a resumed run that kept none, on images read back from its stored inputs."""
    if sample is None and rounds > 0 and resumed:
        sample = _sample_from_store(store, run_id, net, sample_size)
    return measure_run_latency(net, policy, sample, rounds) if sample is not None else None


def audit_items(items: Sequence[InputItem], net: "SkipNetwork", policy: Policy | None,
                db: str | Path | AuditStore, batch_size: int | None = None, progress: ProgressFn | None = None,
                run_id: str | None = None, thumbnails: bool = True, extra_config: dict | None = None,
                resume: bool = False, latency_rounds: int = LATENCY_ROUNDS,
                latency_sample: int = LATENCY_SAMPLE, shadow: ShadowPlan | None = None) -> AuditRun:
    """Audit already collected inputs (see :func:`run_audit`).

    ``resume``: continue the latest run of the same model, weights, policy and inputs (``extra_config``'s
    ``paths`` and ``labels_from_folders``) in ``db`` that did not finish (or a finished one, which then has
    nothing left to do), skipping the inputs it already recorded; a new run when there is none.
    ``latency_rounds``: paired rounds of :func:`measure_run_latency` on up to ``latency_sample`` of the run's
    inputs after the audit (0: not measured). ``thumbnails``: small thumbnails for disagreements and a sample.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    policy = policy if policy is not None else policy_for(net, net.meta.default_source(offered_sources(net)))
    net.eval()
    batch_size = default_audit_batch_size(net) if batch_size is None else int(batch_size)
    env = environment(device := next(net.parameters()).device)
    model_name, psha, pconf = model_name_of(net), params_sha256(net), policy.config()
    extra, shadow = dict(extra_config or {}), shadow or ShadowPlan()
    inputs = {**{k: extra[k] for k in ("paths", "labels_from_folders") if k in extra}, "shadow": shadow.config()}
    store, owned = open_store(db)
    resumed_id = find_resumable_run(store, net, policy, inputs) if resume and run_id is None else None
    run_id = resumed_id or run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    config = {"model": model_name, "model_meta": net.meta.to_dict(), "params_sha256": psha, "policy": pconf,
              "batch_size": batch_size, "n_inputs": len(items), "device": str(device), "shadow": shadow.config(),
              "shadow_resumed": True, **extra}
    base = dict(run_id=run_id, model_name=model_name, weights_sha256=net.meta.weights_sha256, params_sha256=psha,
                policy=pconf, device=str(device), versions=_versions(env))
    try:
        done, first_batch, thumbs = _open_run(store, run_id, resumed_id, base, config,
                                              THUMBNAIL_SAMPLE if thumbnails else 0)
        todo = [it for it, key in zip(items, input_keys((i.name, i.source) for i in items)) if key not in done]
        prep = preprocessing_fingerprint(net)
        runner = BatchRunner(net, policy, device, thumbs, latency_sample if latency_rounds > 0 else 0, shadow,
                             lambda sha: full_output_key(model_name, psha, prep, str(device), sha),
                             store.full_outputs, resume_full=config["shadow_resumed"])
        records, sources = _run_batches(store, todo, base, runner, batch_size, first_batch, progress, len(done))
        timings = {**runner.timings, "wall_s": time.perf_counter() - started}
        if resumed_id is not None:
            records = store.query(run_id=run_id)  # the whole run: the earlier attempt's records and these
        latency = _run_latency(store, run_id, net, policy, runner.sample, resumed_id is not None, latency_rounds,
                               latency_sample)
        run = AuditRun(run_id=run_id, db_path=str(store.path), model_name=model_name,
                       weights_sha256=net.meta.weights_sha256, params_sha256=psha, policy=pconf, config=config,
                       environment=env, records=records, timings=timings, sources=sources, latency=latency,
                       resumed=len(done))
        store.finish_run(run_id, _run_summary(run))
        return run
    except BaseException as e:  # Ctrl-C, SIGTERM (the CLI raises SystemExit), a Streamlit rerun, an error
        with contextlib.suppress(Exception):
            store.finish_run(run_id, status="interrupted", summary={
                "interrupted": f"{type(e).__name__}: {e}".rstrip(": "), "last_batch": store.last_batch(run_id)})
        raise
    finally:
        if owned:
            store.close()


def run_audit(paths: Sequence[str | Path], model: "SkipNetwork | str", policy: Policy | None,
              db: str | Path | AuditStore, labels_from_folders: bool = False, batch_size: int | None = None,
              progress: ProgressFn | None = None, run_id: str | None = None, thumbnails: bool = True,
              resume: bool = False, latency_rounds: int = LATENCY_ROUNDS,
              shadow: ShadowPlan | None = None) -> AuditRun:
    """Audit every input under ``paths`` (folders, files, zip archives) with ``model`` under ``policy``.

    Each batch runs twice: under the policy (the skipped run, really skipping) and through the plain full
    network (the shadow run). Every input is accounted for (failed and skipped records with their reason) and
    the audit goes on. Records are written to ``db`` in one transaction per batch.

    Args:
        paths: folders (searched recursively; zips in them are expanded), image files, ``.zip`` archives.
        model: a :class:`SkipNetwork` or a registered model name.
        policy: the skipping policy; ``None`` for the model card's default.
        db: SQLite file path or an open :class:`AuditStore`.
        labels_from_folders: the parent folder name is the input's label (ImageFolder layout).
        batch_size: images per engine batch (and per transaction); ``None``: :func:`default_audit_batch_size`.
        progress: called as ``progress(fraction, text)`` after every batch (e.g. a Streamlit progress bar).
        resume: continue an interrupted run of the same model, weights, policy and paths (see
            :func:`audit_items`).
        latency_rounds: paired rounds of the latency measurement on the run's own inputs (0: none).
        shadow: which inputs go through the full network and whether kept full outputs are reused
            (:class:`~skipviz.audit.shadow.ShadowPlan`; default: every input, reusing).
    """
    net = _resolve_model(model)
    items = collect_inputs(paths, labels_from_folders=labels_from_folders)
    return audit_items(items, net, policy, db, batch_size=batch_size, progress=progress, run_id=run_id,
                       thumbnails=thumbnails, resume=resume, latency_rounds=latency_rounds, shadow=shadow,
                       extra_config={"paths": [str(Path(p).resolve()) for p in paths],
                                     "labels_from_folders": labels_from_folders})


def audit_uploaded_files(files: Iterable[tuple[str, bytes]], net: "SkipNetwork", policy: Policy | None,
                         db_path: str | Path | AuditStore, labels_from_folders: bool = False,
                         batch_size: int | None = None, progress: ProgressFn | None = None, resume: bool = False,
                         latency_rounds: int = LATENCY_ROUNDS, shadow: ShadowPlan | None = None) -> AuditRun:
    """The dashboard's entry point: audit uploaded ``(name, bytes)`` pairs (``.zip`` uploads are expanded
    safely; a refused archive or member is a failed record). The bytes of each input are kept in
    ``AuditRun.sources`` so the run can be reproduced. ``resume``: continue the interrupted run of the same
    model and policy over uploads in this database, skipping the files it already recorded (by name)."""
    items = items_from_uploads(files, labels_from_folders=labels_from_folders)
    return audit_items(items, net, policy, db_path, batch_size=batch_size, progress=progress, resume=resume,
                       latency_rounds=latency_rounds, shadow=shadow,
                       extra_config={"paths": ["<upload>"], "labels_from_folders": labels_from_folders})


def load_run(store: AuditStore | str | Path, run_id: str) -> AuditRun:
    """An earlier run back from the database (records, configuration, timings, latency), e.g. to re-render its
    report. Uploaded inputs' bytes are not stored, so those records can no longer be reproduced."""
    st, owned = open_store(store)
    try:
        info = st.run_info(run_id)
        records = st.query(run_id=run_id)
        summary = info.get("summary") or {}
        config = info.get("config") or {}
        return AuditRun(run_id=run_id, db_path=str(st.path), model_name=info["model_name"],
                        weights_sha256=info["weights_sha256"], params_sha256=config.get("params_sha256", ""),
                        policy=info["policy"], config=config, environment=summary.get("environment", {}),
                        records=records, timings=summary.get("timings", {}), latency=summary.get("latency"),
                        status=str(info["status"]), resumed=int(summary.get("resumed", 0) or 0))
    except StoreError:
        raise
    finally:
        if owned:
            st.close()
