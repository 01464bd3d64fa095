"""The records an audit writes: one :class:`AuditRecord` per input, the :class:`AuditRun` that holds them, and
the :class:`ReproResult` of replaying one. Plain data: the store (:mod:`skipviz.audit.store`) and the code that
writes (:mod:`skipviz.audit.run`) or replays (:mod:`skipviz.audit.reproduce`) them sit above."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["AuditRecord", "AuditRun", "GPU_ATOL", "ReproResult", "records_to_dataframe"]

GPU_ATOL = 1e-4  # absolute tolerance on logits and gate scores when a run or its replay is not on the CPU


@dataclass
class AuditRecord:
    """One input in one audit run. ``status`` is ``"ok"``, ``"failed"`` (the input could not be read or was
    refused: ``error`` says why, and ``input_sha256`` is set when its bytes could be read) or ``"skipped"`` (not
    an image: ``error`` holds the reason; nothing was run).

    ``trace`` is :meth:`SampleTrace.to_dict` of the skipped run (every block's decision, score, threshold,
    reason, FLOPs, and the logits (K,)); ``full_logits`` (K,) are the shadow full run's. ``shadow`` says where
    they come from (:mod:`skipviz.audit.shadow`): ``"run"`` (the full network ran on this input in its batch),
    ``"reused"`` (kept from record ``shadow_from`` of the same model, parameters, preprocessing, device and input
    bytes) or ``"not checked"`` (left out of a sampled shadow run: no full output, no agreement); ``None`` in
    records written before the field existed (all run). ``latency_ms`` and ``full_latency_ms`` are the batch's
    measured wall time divided by the images in it (the full one over the inputs it ran on).
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
    shadow: str | None = None
    shadow_from: int | None = None
    thumbnail_png_b64: str | None = None  # a small JPEG (despite the name, kept for old databases), base64
    record_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

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
        """The record's fields as a new dict, for serialising: nested values (``trace``, ``policy``, ``image``,
        ``full_logits`` ...) are the record's own, not copies. ``dataclasses.asdict``'s deep copy of them took 0.5
        ms per record, a quarter of a CIFAR audit's time on the 2-core AMD EPYC
        (cProfile of 2,000 inputs, 1 thread, a training run on the other core)."""
        out = {f.name: getattr(self, f.name) for f in _FIELDS}
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
        character per block: ``R`` ran, ``S`` skipped (bypassed). Letters only, so a spreadsheet reads it neither
        as a number nor as a formula, and the CSV keeps it exactly."""
        return {
            "record_id": self.record_id, "run_id": self.run_id, "input_name": self.input_name,
            "input_path": self.input_path, "input_sha256": self.input_sha256, "status": self.status,
            "error": self.error, "label": self.label, "predicted": self.predicted_label,
            "confidence": self.confidence, "full_predicted": self.full_predicted_label,
            "full_confidence": self.full_confidence, "agree": self.agree, "correct": self.correct,
            "full_correct": self.full_correct, "kl_full_skipped": self.kl_full_skipped,
            "shadow": self.shadow, "shadow_from": self.shadow_from,
            "blocks_executed": self.blocks_executed, "blocks_total": self.blocks_total,
            "executed_mask": "".join("R" if e else "S" for e in self.executed_mask) or None,
            "flops_executed": self.flops_executed, "flops_full": self.flops_full,
            "flops_saved_fraction": self.flops_saved_fraction, "latency_ms": self.latency_ms,
            "full_latency_ms": self.full_latency_ms, "model_name": self.model_name,
            "weights_sha256": self.weights_sha256, "policy": json.dumps(self.policy, sort_keys=True),
            "device": self.device, "timestamp": self.timestamp,
            "image_format": (self.image or {}).get("format"), "image_width": (self.image or {}).get("width"),
            "image_height": (self.image or {}).get("height"),
        }


#: AuditRecord's fields, once (``to_dict`` runs per record).
_FIELDS = dataclasses.fields(AuditRecord)


def records_to_dataframe(records: Sequence[AuditRecord]) -> pd.DataFrame:
    """One row per record (:meth:`AuditRecord.flat`): disagreements first, then failed rows, then skipped ones,
    then the rest."""
    rows = [r.flat() for r in records]
    df = pd.DataFrame(rows, columns=list(AuditRecord(run_id="", input_name="", input_path=None, status="",
                                                     model_name="", weights_sha256=None, params_sha256=None,
                                                     policy={}, device="", versions={},
                                                     timestamp="").flat().keys()))
    if df.empty:
        return df
    order = np.where(df["agree"].eq(False), 0, np.where(df["status"].eq("failed"), 1,
                                                        np.where(df["status"].eq("skipped"), 2, 3)))
    return df.assign(_o=order).sort_values(["_o", "record_id"], kind="stable").drop(columns="_o").reset_index(
        drop=True)


@dataclass
class AuditRun:
    """One audit run: its records (stored), configuration, timings and environment.

    ``timings``: ``wall_s`` seconds end to end (collecting, decoding, both runs, storing) over ``images``
    audited images in this process; ``skip_s`` / ``full_s`` seconds spent in the skipped runs and the shadow
    full runs. ``latency``: the paired latency measurement on a sample of the run's own inputs
    (:func:`skipviz.audit.run.measure_run_latency`), or ``None``. ``status``: ``finished`` or ``interrupted``;
    ``resumed``: how many inputs an earlier, interrupted attempt of this run had already recorded.
    ``sources`` maps ``record_id`` to bytes for inputs that exist only in memory (uploads), so they can be
    reproduced while the run object lives.
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
    latency: dict | None = None
    status: str = "finished"
    resumed: int = 0

    @property
    def ok_records(self) -> list[AuditRecord]:
        return [r for r in self.records if r.ok]

    @property
    def failed_records(self) -> list[AuditRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def skipped_records(self) -> list[AuditRecord]:
        return [r for r in self.records if r.skipped]

    def throughput(self) -> dict:
        """Images/s of this process's part of the audit: end to end (wall clock: reading, decoding, both runs,
        storing; ``None`` for runs stored before it was recorded), and the model time alone as it ran inside the
        audit (skipped run, skipped + shadow full run, full run; the two may overlap in time, so these are not
        latencies: see ``latency``)."""
        n, s, f = self.timings.get("images", 0), self.timings.get("skip_s", 0.0), self.timings.get("full_s", 0.0)
        ran = self.timings.get("shadow_run", n)  # inputs the full network ran on (runs before the shadow plan: all)
        wall = self.timings.get("wall_s")
        return {"images": n, "end_to_end_images_per_s": n / wall if wall else None,
                "skip_images_per_s": n / s if s else None,
                "skip_with_shadow_images_per_s": n / (s + f) if s + f else None,
                "full_images_per_s": ran / f if f and ran else None}

    def dataframe(self) -> pd.DataFrame:
        return records_to_dataframe(self.records)


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

    to_dict = dataclasses.asdict  # the JSON of the result: every field
