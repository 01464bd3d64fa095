"""One batch of an audit (private; :mod:`skipviz.audit.run` drives the batches and stores them).

* :func:`load_batch` - a batch's inputs read, hashed, decoded and preprocessed (the audit runs it in a background
  thread while the batch before it is on the model; Pillow and torch release the GIL): every input's record,
  failed (unreadable or refused: the reason, and the SHA-256 of its bytes when they could be read) or skipped
  (not an image) for an input that cannot or need not be run, and the inputs that loaded.
* :class:`BatchRunner` - the loaded inputs as one (N, 3, H, W) batch under the policy and, as the run's
  :class:`~skipviz.audit.shadow.ShadowPlan` says, through the full network (the shadow run) or from kept full
  outputs: their records filled (decisions, predictions, agreement, KL, FLOPs, the batch's time per image, a
  thumbnail where a report shows one), the timings summed and the run's latency sample kept.
"""
from __future__ import annotations

import base64
import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .._imageio import ImageLoadError, load_image, read_bytes
from ..engine.resume import full_logits
from ..measure.clock import synchronize
from ..policies.base import Policy
from ..redundancy import kl_from_logits
from .archive import ArchiveError, InputItem
from .records import AuditRecord
from .shadow import SHADOW_NOT_CHECKED, SHADOW_REUSED, SHADOW_RUN, ShadowPlan
from .store import utc_now

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork
    from ..engine.trace import SkipResult

__all__ = ["THUMBNAIL_PX", "BatchOutput", "BatchRunner", "InputBatch", "LoadedInput", "load_batch"]

THUMBNAIL_PX = 48


def _thumbnail(small: Image.Image) -> str:
    """A small JPEG of an already reduced image, base64 (about 1-2 KB)."""
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=70)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class LoadedInput:
    """One decoded input of a batch: its record, a small copy for a thumbnail, and either its (H, W, 3) uint8
    pixels, resized and cropped for the model (:meth:`ModelMeta.pixels`; the batch is normalised at once), or,
    where only the reference transform can prepare it, its (1, 3, H, W) float tensor."""

    record: AuditRecord
    small: Image.Image
    pixels: np.ndarray | None
    tensor: torch.Tensor | None = None


@dataclass
class InputBatch:
    """A batch read and preprocessed: every input's record and in-memory bytes, and the inputs that loaded."""

    records: list[AuditRecord]
    data: list[bytes | None]
    loaded: list[LoadedInput]


def _hash_file(path: str) -> str | None:
    """SHA-256 of a regular file too large to load, read in chunks (``None`` when it cannot be read)."""
    try:
        p = Path(path)
        if not p.is_file():
            return None
        with p.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _load_one(item: InputItem, net: "SkipNetwork") -> tuple[Image.Image, dict, np.ndarray | torch.Tensor, str]:
    """Read, hash, decode and preprocess one input: ``(small copy, image info, (H, W, 3) uint8 pixels or a
    (1, 3, H, W) float tensor, sha256)``."""
    source = item.read()
    data, _ = read_bytes(source, name=item.name) if isinstance(source, str) else (source, item.name)
    sha = hashlib.sha256(data).hexdigest()
    try:
        image, info = load_image(data, name=item.name, sha256=sha)
        pixels = net.meta.pixels(image)
        prepared = pixels if pixels is not None else net.meta.preprocess(image)
    except ImageLoadError as e:
        raise _Failed(str(e), sha) from e
    except (OSError, ValueError, RuntimeError) as e:
        raise _Failed(f"{item.name}: could not be preprocessed for the model ({e})", sha) from e
    if max(image.size) <= THUMBNAIL_PX:
        small = image  # already thumbnail-sized (a CIFAR image): the decoded image itself, no copy
    else:
        small = image.copy()
        small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return small, {**info.to_dict(), "name": item.name}, prepared, sha


class _Failed(Exception):
    """An input whose bytes were read (``sha256``) but that could not be used."""

    def __init__(self, message: str, sha256: str | None) -> None:
        super().__init__(message)
        self.sha256 = sha256


def load_batch(chunk: Sequence[InputItem], base: dict, net: "SkipNetwork", b: int) -> InputBatch:
    """One batch's inputs read and preprocessed: every input's record (failed or skipped for an input that
    cannot or need not be run), its in-memory bytes, and the inputs that loaded."""
    out = InputBatch([], [], [])
    for item in chunk:
        item_base = dict(input_name=item.name, input_path=item.source, label=item.label, batch_index=b, **base)
        if item.skipped is not None:
            rec = AuditRecord(status="skipped", error=item.skipped, timestamp=utc_now(), **item_base)
        else:
            try:
                small, info, prepared, sha = _load_one(item, net)
            except (_Failed, ImageLoadError, ArchiveError, OSError, ValueError, RuntimeError, MemoryError) as e:
                # one input that cannot be read (or fits in no memory) is a failed row; the audit goes on
                error = str(e) if not isinstance(e, MemoryError) else f"{item.name}: out of memory reading it ({e})"
                sha = getattr(e, "sha256", None)
                if sha is None and item.data is not None and item.error is None:
                    sha = hashlib.sha256(item.data).hexdigest()
                elif sha is None and item.error is None and item.source and "::" not in item.source:
                    sha = _hash_file(item.source)  # e.g. a file over the size limit: still identified
                rec = AuditRecord(status="failed", error=error, timestamp=utc_now(), input_sha256=sha, **item_base)
            else:
                rec = AuditRecord(status="ok", timestamp="", input_sha256=sha, image=info, **item_base)
                out.loaded.append(LoadedInput(rec, small, prepared, None) if isinstance(prepared, np.ndarray)
                                  else LoadedInput(rec, small, None, prepared))
        out.records.append(rec)
        out.data.append(item.data)
    return out


def _batch_tensor(loaded: list[LoadedInput], net: "SkipNetwork") -> torch.Tensor:
    """The loaded inputs as one normalised (N, 3, H, W) batch: the pixels stacked and normalised at once."""
    meta = net.meta
    if all(ld.pixels is not None for ld in loaded):
        return meta.normalize(torch.from_numpy(np.stack([ld.pixels for ld in loaded])))
    return torch.cat([ld.tensor if ld.pixels is None else meta.normalize(torch.from_numpy(ld.pixels)[None])
                      for ld in loaded])


@dataclass
class BatchOutput:
    """What the model computed for one batch (:meth:`BatchRunner.compute`): the skipped run's result, the full
    network's logits (R, K) on the rows ``run_rows`` it ran on (``None`` when none), the kept outputs reused
    (row -> (record id, logits)), each row's full-output key, and the two runs' seconds."""

    result: "SkipResult"
    computed: torch.Tensor | None
    run_rows: list[int]
    reused: dict[int, tuple[int, list[float]]]
    keys: list[str | None]
    skip_s: float
    full_s: float


class BatchRunner:
    """Runs batches under the policy and, as the :class:`ShadowPlan` says, through the full network; fills their
    records, keeps the timings and the first batch's inputs (the latency sample).

    ``full_output_key``: input SHA-256 -> the key of its full-network output (:func:`full_output_key` with this
    run's model, parameters, preprocessing and device); ``lookup``: keys -> the kept outputs among them
    (:meth:`AuditStore.full_outputs`). Without them nothing is reused. ``resume_full``: the full network resumes
    from the skipped run (:func:`~skipviz.engine.resume.full_logits`); off, it runs from the image.
    """

    def __init__(self, net: "SkipNetwork", policy: Policy, device: torch.device, thumbnails: int,
                 sample_size: int, shadow: ShadowPlan | None = None,
                 full_output_key: Callable[[str], str] | None = None,
                 lookup: Callable[[list[str]], dict[str, tuple[int, list[float]]]] | None = None,
                 resume_full: bool = True) -> None:
        self.net, self.policy, self.device = net, policy, device
        self.resume_full = resume_full
        self.shadow = shadow or ShadowPlan()
        self.full_output_key, self.lookup = full_output_key, lookup
        self.thumbnails_left = thumbnails
        self.sample_size = sample_size
        self.sample: torch.Tensor | None = None
        self.timings = {"skip_s": 0.0, "full_s": 0.0, "images": 0, "batches": 0, "wall_s": 0.0,
                        "shadow_run": 0, "shadow_reused": 0, "shadow_not_checked": 0}

    def _shadow_sources(self, loaded: list[LoadedInput]) -> tuple[list[int], dict[int, tuple[int, list[float]]],
                                                                   list[str | None]]:
        """Which rows of the batch the full network runs on, the kept outputs reused for others (row -> (record
        id, logits)), and each row's full-output key (``None`` where none is kept)."""
        shas = [ld.record.input_sha256 for ld in loaded]
        keys: list[str | None] = [self.full_output_key(s) if (self.full_output_key and s) else None for s in shas]
        checked = [i for i, s in enumerate(shas) if self.shadow.checks(s)]
        reused: dict[int, tuple[int, list[float]]] = {}
        if self.shadow.reuse and self.lookup is not None:
            kept = self.lookup([keys[i] for i in checked if keys[i] is not None])
            k = self.net.meta.num_classes  # a kept output of another length (a damaged file) is not reused
            reused = {i: kept[keys[i]] for i in checked if keys[i] in kept and len(kept[keys[i]][1]) == k}
        return [i for i in checked if i not in reused], reused, keys

    def run(self, batch: InputBatch, b: int) -> list[str | None]:
        """:meth:`compute` then :meth:`finish`: batch ``b`` run and its records filled."""
        return self.finish(batch, b, self.compute(batch))

    def compute(self, batch: InputBatch) -> "BatchOutput | None":
        """Run the batch's loaded inputs as one (N, 3, H, W) batch under the policy (timed once), and the rows the
        shadow plan checks and no kept output covers through the full network (timed once). Model work only:
        :meth:`finish` turns it into records (the audit reads the next batch meanwhile, not while the model
        runs: on the 2-core AMD EPYC a decoding thread beside the model's two threads slowed its convolutions
        by about a third, measured in a cProfile of a 2,000-input ResNet-56 audit)."""
        loaded = batch.loaded
        if not loaded:
            return None
        x = _batch_tensor(loaded, self.net).to(self.device)
        if self.sample is None and self.sample_size > 0:
            self.sample = x[: self.sample_size]
        net, policy, device = self.net, self.policy, self.device
        run_rows, reused, keys = self._shadow_sources(loaded)
        computed = None
        with torch.no_grad():
            if self.timings["batches"] == 0:  # first-call overheads (allocator, kernel selection) stay out
                net.run(x[:2], policy)
                net(x[:2])
            synchronize(device)
            t0 = time.perf_counter()
            res = net.run(x, policy, keep_exit_states=self.resume_full)
            synchronize(device)
            t1 = time.perf_counter()
            if run_rows and self.resume_full:  # resumed from the skipped run where it got (skipviz.engine.resume)
                computed = full_logits(net, x, res, run_rows).detach().float().cpu()
            elif run_rows:  # from the image, as a run begun by an older SkipViz did
                xs = x if len(run_rows) == x.shape[0] else x[torch.tensor(run_rows, device=x.device)]
                computed = net(xs).detach().float().cpu()
            synchronize(device)
            t2 = time.perf_counter()
        n = x.shape[0]
        self.timings["skip_s"] += t1 - t0
        self.timings["full_s"] += t2 - t1
        self.timings["images"] += n
        self.timings["batches"] += 1
        self.timings["shadow_run"] += len(run_rows)
        self.timings["shadow_reused"] += len(reused)
        self.timings["shadow_not_checked"] += n - len(run_rows) - len(reused)
        return BatchOutput(res, computed, run_rows, reused, keys, t1 - t0, t2 - t1)

    def finish(self, batch: InputBatch, b: int, out: "BatchOutput | None") -> list[str | None]:
        """Fill batch ``b``'s records from :meth:`compute`'s output in place. Returns, per record of the batch,
        the key under which its full output is to be kept (``None``: not computed here) for
        :meth:`AuditStore.add_records`."""
        out_keys: list[str | None] = [None] * len(batch.records)
        if out is None:
            return out_keys
        loaded = batch.loaded
        res, computed, run_rows, reused, keys = out.result, out.computed, out.run_rows, out.reused, out.keys
        n = len(loaded)
        # the full logits of every row that has them: computed here or kept from an earlier record
        full_rows = {i: computed[j] for j, i in enumerate(run_rows)} if run_rows else {}
        for i, (_, logits) in reused.items():
            full_rows[i] = torch.tensor(logits, dtype=torch.float32)
        skipped_cpu = res.logits.detach().float().cpu()
        kl = fconf = fpred = None
        order = sorted(full_rows)
        if order:
            full_cpu = torch.stack([full_rows[i] for i in order])
            kl = kl_from_logits(full_cpu, skipped_cpu[order]).cpu()
            fconf, fpred = torch.softmax(full_cpu, dim=1).max(1)
        where = {i: j for j, i in enumerate(order)}
        run_set = set(run_rows)
        classes = self.net.meta.classes
        stamp = utc_now()
        index_of = {id(rec): k for k, rec in enumerate(batch.records)}
        for pos, (ld, tr) in enumerate(zip(loaded, res.trace_dicts())):
            rec = ld.record
            rec.timestamp = stamp
            rec.trace = tr
            rec.predicted_index, rec.predicted_label = tr["predicted_index"], tr["predicted_label"]
            rec.confidence = tr["confidence"]
            rec.flops_executed, rec.flops_full = tr["flops_executed"], tr["flops_full"]
            rec.blocks_executed, rec.blocks_total = tr["blocks_executed"], tr["blocks_total"]
            rec.latency_ms = 1000.0 * out.skip_s / n
            rec.batch_index, rec.batch_pos, rec.batch_size = b, pos, n
            j = where.get(pos)
            if j is None:
                rec.shadow = SHADOW_NOT_CHECKED
            else:
                k = int(fpred[j])
                rec.full_logits = full_rows[pos].tolist()
                rec.full_predicted_index = k
                rec.full_predicted_label = classes[k] if k < len(classes) else str(k)
                rec.full_confidence = float(fconf[j])
                rec.agree = rec.full_predicted_index == rec.predicted_index
                rec.kl_full_skipped = float(kl[j])
                if pos in run_set:
                    rec.shadow = SHADOW_RUN
                    rec.full_latency_ms = 1000.0 * out.full_s / len(run_rows)
                    out_keys[index_of[id(rec)]] = keys[pos]
                else:
                    rec.shadow, rec.shadow_from = SHADOW_REUSED, reused[pos][0]
            if rec.agree is False or self.thumbnails_left > 0:  # thumbnails only where a report shows them
                rec.thumbnail_png_b64 = _thumbnail(ld.small)
                self.thumbnails_left -= rec.agree is not False
        return out_keys
