"""The dashboard's tables and headline numbers (no Streamlit): the Inspect page's per-block decisions and top-5,
the Audit page's summary and records, and how each table's columns are shown (:class:`Column`: label, width,
format, help), which the pages turn into ``st.column_config``. Key columns come first in every table, so they
are in view at 1280 px; identifiers come last. Fractions are shown as percents. Re-exported by
:mod:`skipviz.dashboard`.
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

from ._format import percent, percent_points
from .audit.shadow import shadow_words
from .policies.threshold import score_label
from .policies.words import describe_policy

if TYPE_CHECKING:  # pragma: no cover
    from .dashboard import InspectResult
    from .engine.trace import SampleTrace
    from .measure.saving import PairedSaving

__all__ = ["AUDIT_FIRST", "AUDIT_LAST", "Column", "Metric", "audit_columns", "audit_disagreements", "audit_records",
           "audit_summary", "block_columns", "block_table", "compare_columns", "finite_or_none", "fraction_columns",
           "kl_policy_columns", "latency_metric", "percent", "percent_points", "policy_words", "profile_column",
           "top5_columns", "top5_side_by_side", "top_k_frame"]


@dataclass(frozen=True)
class Column:
    """How a page shows one table column: ``kind`` (``"text"``, ``"number"``, ``"percent"`` for a fraction
    shown as a percent, ``"progress"`` for a probability bar, ``"checkbox"``), a short ``label``, a ``width``
    (``"small"``, ``"medium"``, ``"large"`` or pixels), a number ``format`` (printf style) and ``help`` (the
    long name: device, batch, units)."""

    kind: str = "text"
    label: str | None = None
    width: str | int | None = None
    format: str | None = None
    help: str | None = None


@dataclass(frozen=True)
class Metric:
    """A headline number as a page shows it (``st.metric``): label, value, the detail under it, help."""

    label: str
    value: str
    detail: str | None = None
    help: str | None = None


# --------------------------------------------------------------------------------------------- numbers
def finite_or_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def fraction_columns(columns: Sequence[str], labels: Mapping[str, str] | None = None) -> dict[str, Column]:
    """Percent display (:class:`Column` ``"percent"``) for a table's fraction columns, optionally relabelled."""
    labels = labels or {}
    return {c: Column("percent", labels.get(c)) for c in columns}


def compare_columns() -> dict[str, Column]:
    """How the Redundancy page's comparison (:func:`skipviz.evaluate.calibration.compare_points`) is shown: its
    fractions as percents, beside the other pages' percent metrics."""
    return {"policy": Column("text", "policy", 330),
            **fraction_columns(["accuracy", "agreement with full", "FLOPs cut"]),
            "latency ms/image": Column("number", "ms/image", format="%.3f", help="latency per image, ms"),
            "blocks run (mean)": Column("number", "blocks run", format="%.2f")}


def kl_policy_columns() -> dict[str, Column]:
    """How the KL policy's table (:meth:`~skipviz.policies.kl.KLRedundancyPolicy.to_dataframe`) is shown: the
    scores in nats."""
    return {"kl": Column("number", "KL (nats)", format="%.4f", help="mean KL(input || output), nats"),
            "normalised": Column("number", "normalised", format="%.3f",
                                 help="the score mapped into (0, 1) for the Beta fit")}


# --------------------------------------------------------------------------------------------- one input
def top_k_frame(probs: np.ndarray, classes: Sequence[str], k: int = 5) -> pd.DataFrame:
    """(K,) probabilities -> the top ``k`` rows: rank, class, probability."""
    order = np.argsort(-probs, kind="stable")[:k]
    return pd.DataFrame({"rank": np.arange(1, len(order) + 1), "class": [classes[i] for i in order],
                         "probability": probs[order]})


def top5_side_by_side(res: "InspectResult", classes: Sequence[str], k: int = 5) -> pd.DataFrame:
    """Top-k of the skipped run next to the top-k of the full run (one row per rank)."""
    s, f = top_k_frame(res.probs_skipped, classes, k), top_k_frame(res.probs_full, classes, k)
    return pd.DataFrame({"rank": s["rank"], "skipped: class": s["class"], "skipped: probability": s["probability"],
                         "full: class": f["class"], "full: probability": f["probability"]})


def top5_columns() -> dict[str, Column]:
    """How :func:`top5_side_by_side` is shown: short labels, probabilities as percent bars, fixed widths that fit
    a third of a 1280 px window."""
    return {"rank": Column("number", "#", 32),
            "skipped: class": Column("text", "skipped", 110, help="the skipped run's class at this rank"),
            "skipped: probability": Column("progress", "p (skipped)", 120),
            "full: class": Column("text", "full network", 110, help="the full network's class at this rank"),
            "full: probability": Column("progress", "p (full)", 120)}


def profile_column(device: str, batch_size: int) -> str:
    """The per-block table's time column: says it is a profile estimate, with its device and batch size."""
    return f"profile estimate (ms per batch of {batch_size}, {device})"


def block_table(trace: "SampleTrace", block_ms: Sequence[float] | None = None, device: str = "",
                batch_size: int = 1) -> pd.DataFrame:
    """One row per block, the key columns first: block, name, decision, reason, FLOPs and, with ``block_ms``
    (:attr:`~skipviz.dashboard.LiveLatency.block_ms`), each block's time as a profile estimate (column
    :func:`profile_column`: the device and batch size in its name); then its score (:func:`score_label`),
    threshold, and whether it downsamples."""
    rows = []
    label = score_label(trace.policy)
    time_col = profile_column(device, batch_size) if block_ms is not None else None
    for i, b in enumerate(trace.blocks):
        row = {"block": b.index, "name": b.name, "decision": "fired" if b.executed else "bypassed",
               "reason": b.reason, "MFLOPs": b.flops / 1e6}
        if time_col is not None:
            row[time_col] = float(block_ms[i])
        row.update({label: np.nan if b.score is None else b.score,
                    "threshold": np.nan if b.threshold is None else b.threshold, "downsampling": b.downsample})
        rows.append(row)
    return pd.DataFrame(rows)


def block_columns(policy: str, time_col: str | None = None) -> dict[str, Column]:
    """How :func:`block_table` is shown: short labels, the reason wide, the time column's long name (device,
    batch) as its help."""
    cols = {"block": Column("number", "#", 32), "name": Column("text", "block", 110),
            "decision": Column("text", "decision", 75), "reason": Column("text", "reason", 250),
            "MFLOPs": Column("number", "MFLOPs", 70, "%.2f", "FLOPs this block spent for this input, millions")}
    if time_col is not None:
        cols[time_col] = Column("number", "ms (est.)", 75, "%.3f", f"{time_col}: not a measurement of this run")
    label = score_label(policy)
    cols[label] = Column("number", label.split()[0] + " p", 65, "%.3f", label)
    cols["threshold"] = Column("number", "threshold", 75, "%.2f", "the block runs when its score >= this")
    cols["downsampling"] = Column("checkbox", "downsamples", 95)
    return cols


def policy_words(policy: object) -> str:
    """A policy in words (:func:`~skipviz.policies.words.describe_policy`) from its config, its JSON or its
    ``str()`` as a table stores it; text that is no policy is returned as it is."""
    if isinstance(policy, str):
        try:
            policy = json.loads(policy)
        except ValueError:
            try:
                policy = ast.literal_eval(policy)
            except (ValueError, SyntaxError):
                return policy
    if not isinstance(policy, Mapping):
        return "" if policy is None else str(policy)
    return describe_policy(policy)


# --------------------------------------------------------------------------------------------- audit
#: The Audit page's record columns shown first (outcome, prediction, cost) and last (identifiers).
AUDIT_FIRST = ("status", "input_name", "predicted", "confidence", "full_predicted", "full_confidence", "agree",
               "shadow", "label", "correct", "blocks_executed", "flops_saved_fraction", "kl_full_skipped", "error")
AUDIT_LAST = ("record_id", "run_id", "input_path", "input_sha256")


def audit_records(frame: pd.DataFrame) -> pd.DataFrame:
    """An audit's records (:meth:`~skipviz.audit.AuditRun.dataframe`, disagreements first) with status and
    prediction first and the identifiers (record and run id, path, SHA-256) last."""
    first = [c for c in AUDIT_FIRST if c in frame.columns]
    last = [c for c in AUDIT_LAST if c in frame.columns]
    middle = [c for c in frame.columns if c not in first and c not in last]
    return frame[first + middle + last]


def audit_disagreements(frame: pd.DataFrame) -> pd.DataFrame:
    """The records whose skipped prediction differs from the full network's, with what a reader compares."""
    cols = [c for c in ("input_name", "label", "predicted", "confidence", "full_predicted", "full_confidence",
                        "kl_full_skipped", "flops_saved_fraction") if c in frame.columns]
    if "agree" not in frame.columns:
        return frame.iloc[0:0][cols]
    return frame[frame["agree"].eq(False)][cols].reset_index(drop=True)


def audit_columns() -> dict[str, Column]:
    """How :func:`audit_records` and :func:`audit_disagreements` are shown: fractions as percents, units."""
    return {"status": Column("text", "status", 70), "input_name": Column("text", "input", 160),
            "predicted": Column("text", "skipped predicts", 120),
            "confidence": Column("percent", "p (skipped)", 90),
            "full_predicted": Column("text", "full predicts", 110),
            "full_confidence": Column("percent", "p (full)", 80),
            "agree": Column("checkbox", "agrees", 70),
            "shadow": Column("text", "full run", 80, help="run: the full network ran on this input in the audit; "
                             "reused: its output kept from an earlier audit of the same bytes; not checked: left "
                             "out of a sampled shadow run (no agreement)"),
            "shadow_from": Column("number", "reused from", 80, "%d", "the record whose full-network output was "
                                                                    "reused"),
            "label": Column("text", "label", 90),
            "correct": Column("checkbox", "correct", 70), "full_correct": Column("checkbox", "full correct"),
            "blocks_executed": Column("number", "blocks run", 80),
            "flops_saved_fraction": Column("percent", "FLOPs saved", 90),
            "kl_full_skipped": Column("number", "KL (nats)", 80, "%.4f",
                                      "KL(full || skipped) of the two runs' predictions, in nats"),
            "latency_ms": Column("number", "ms (skipped)", format="%.2f", help="one timing while auditing"),
            "full_latency_ms": Column("number", "ms (full)", format="%.2f", help="one timing while auditing"),
            "error": Column("text", "error", 200), "input_sha256": Column("text", "SHA-256")}


def latency_metric(saving: "PairedSaving", label: str, help_text: str | None = None) -> Metric:
    """A paired saving as a headline: ``"0.47 ms saved"`` or ``"0.40 ms slower"`` with its interval, or, when
    the interval contains zero, ``"none measurable"`` with its ± half-width (never a number said to be saved)."""
    if not saving.measurable:
        return Metric(label, "none measurable", f"{saving.detail()}: the 95 % CI contains 0", help_text)
    return Metric(label, saving.headline(), saving.detail(), help_text)


def _ci(p: dict) -> str:
    """A proportion's 95 % interval, short enough for a metric's detail: ``"CI 50.5-89.8%"``."""
    return f"CI {percent(p['ci_low'])[:-1]}-{percent(p['ci_high'])}"


def _proportion_metric(label: str, p: dict, help_text: str, missing: str) -> Metric:
    if not p.get("n"):
        return Metric(label, "n/a", missing, help_text)
    return Metric(label, percent(p["rate"]), _ci(p), f"{help_text} {p['k']} of {p['n']}; 95 % Wilson interval "
                                                     f"{percent(p['ci_low'])} to {percent(p['ci_high'])}.")


def _time_metric(lat: dict | None) -> Metric:
    if not lat:
        return Metric("Time saved", "not measured", None, "No input of this run was timed in this process.")
    how = (f"Model time per image, {lat.get('rounds')} interleaved paired rounds on {lat.get('sample_size')} of the "
           f"run's inputs on {lat.get('device')}: {lat.get('label')}.")
    if not lat.get("measurable"):  # the interval contains zero: its half-width, as PairedSaving says it
        half = (lat["ci_high_ms"] - lat["ci_low_ms"]) / 2
        return Metric("Time saved", "none measurable", f"±{half:.2f} ms per image", how)
    lo, hi = sorted((abs(lat["ci_low_ms"]), abs(lat["ci_high_ms"])))
    verb = "saved" if lat["saving_ms"] > 0 else "slower"
    return Metric("Time saved", f"{abs(lat['saving_ms']):.2f} ms", f"{verb}, CI {lo:.2f}-{hi:.2f}", how)


def audit_summary(summary: Mapping) -> list[Metric]:
    """The Audit page's headline: accuracy and agreement with their 95 % Wilson intervals, FLOPs and time saved
    (per image), failures. ``summary``: the report's numbers (``skipviz.audit.report.report_data(run)["summary"]``,
    whose proportions are :func:`skipviz.audit.report.proportion`'s)."""
    acc, full = summary["accuracy_skipped"], summary["accuracy_full"]
    full_words = (f"The full network: {percent(full['rate'])} ({full['k']} of {full['n']})." if full.get("n")
                  else "")
    flops = summary.get("flops_saved_fraction")
    n, fails, skipped = summary.get("n_inputs", 0), summary.get("n_failed", 0), summary.get("n_skipped", 0)
    return [
        _proportion_metric("Accuracy", acc, f"The skipped run's top-1 accuracy over the labelled inputs (labels come "
                           f"from folder names in a zip archive). {full_words}", "no labels"),
        _proportion_metric("Agreement with full", summary["agreement"], "Audited inputs whose skipped prediction "
                           "equals the full network's." + (f" {shadow_words(summary.get('shadow'))}."
                                                          if shadow_words(summary.get("shadow")) else ""),
                           "no inputs checked"),
        Metric("FLOPs saved", "n/a" if flops is None else percent(flops), None if flops is None else "mean per input",
               None if flops is None else f"Mean {summary['flops_executed_mean'] / 1e6:.1f} of "
                                          f"{summary['flops_full'] / 1e6:.1f} MFLOPs run per input."),
        _time_metric(summary.get("latency")),
        Metric("Failures", str(fails), f"of {n} inputs", f"Inputs that could not be read or run ({fails}) and files "
                                                          f"that are not images ({skipped}): their reasons are in the "
                                                          "table (status 'failed' / 'skipped')."),
    ]
