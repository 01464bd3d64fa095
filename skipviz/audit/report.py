"""Audit reports: one HTML page, plus JSON and CSV, written atomically.

Pure pieces, each testable without Streamlit:

* :func:`summarize` - every input accounted for (audited, failed, skipped), agreement with the full network
  (Wilson 95% interval, ``scipy.stats.binomtest``), accuracy when labels are known, FLOPs saved, the paired
  latency measurement with its bootstrap interval (``AuditRun.latency``), end-to-end throughput, KL statistics.
* :func:`skip_rate_per_block`, :func:`skip_rate_per_class` - pandas tables.
* :func:`render_report` -> ``(html, json, csv)`` strings; :func:`write_report` writes the three files (each to a
  temporary file, fsynced, then renamed over the final name: a killed writer leaves the previous report or
  none, never a truncated one) and Plotly's script once beside them; :func:`report_bundle` is the same as one
  zip (the dashboard's download). They render what the run stored (figures from :mod:`skipviz.figures`, the
  page laid out by :mod:`skipviz.audit._report_html`); they never run the network: a reproduced sample is passed
  in (:func:`skipviz.audit.reproduce.reproduce_sample`).

Size: the page loads Plotly's script from ``plotly-<version>.min.js`` beside it (4.6 MB, written once per
folder, not into every report; the page opens offline and says so when the script is missing). Thumbnails are
small JPEGs stored only for disagreements and a sample; the table of all inputs is compact and collapsed, and
capped at ``max_rows`` (the JSON and CSV hold every record). A 2,000-input report is a few hundred KB.

Every string that came from an input (file names, labels, error texts) is HTML-escaped.
"""
from __future__ import annotations

import io
import json
import math
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ._report_html import render_html
from .records import AuditRecord, AuditRun, ReproResult, records_to_dataframe
from .shadow import SHADOW_REUSED, SHADOW_RUN, ShadowPlan

__all__ = ["atomic_write", "plotly_script_name", "proportion", "render_report", "report_bundle", "report_data",
           "skip_rate_per_block", "skip_rate_per_class", "summarize", "write_report"]

REPORT_VERSION = 2
MAX_ROWS = 2000  # rows of the HTML table of all inputs (and of the failed / skipped lists); the rest: CSV, JSON
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------------------------- numbers
def proportion(k: int, n: int, confidence: float = CONFIDENCE) -> dict:
    """``k`` successes of ``n`` with a Wilson score interval (``None`` values when ``n == 0``)."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci_low": None, "ci_high": None, "method": "wilson",
                "confidence": confidence}
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return {"k": int(k), "n": int(n), "rate": k / n, "ci_low": float(ci.low), "ci_high": float(ci.high),
            "method": "wilson", "confidence": confidence}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(run: AuditRun) -> dict:
    """Headline numbers of an audit run (JSON-ready). ``latency`` is the run's paired measurement (saving per
    image with its bootstrap 95% interval; ``None`` when not measured); no latency is derived from the
    single timings taken while auditing."""
    ok = run.ok_records
    labelled = [r for r in ok if r.label is not None]
    flops_exec, flops_full = _mean([r.flops_executed for r in ok]), _mean([r.flops_full for r in ok])
    kls = [r.kl_full_skipped for r in ok if r.kl_full_skipped is not None]
    checked = [r for r in ok if r.agree is not None]
    labelled_full = [r for r in labelled if r.full_predicted_label is not None]
    shadow = {"run": sum(r.shadow in (None, SHADOW_RUN) and r.agree is not None for r in ok),
              "reused": sum(r.shadow == SHADOW_REUSED for r in ok),
              "not_checked": sum(r.agree is None for r in ok),
              "plan": (run.config or {}).get("shadow", ShadowPlan().config())}
    return {
        "n_inputs": len(run.records), "n_ok": len(ok), "n_failed": len(run.failed_records),
        "n_skipped": len(run.skipped_records), "status": run.status, "resumed_from_records": run.resumed,
        "agreement": proportion(sum(bool(r.agree) for r in checked), len(checked)),
        "shadow": shadow,
        "accuracy_skipped": proportion(sum(bool(r.correct) for r in labelled), len(labelled)),
        "accuracy_full": proportion(sum(bool(r.full_correct) for r in labelled_full), len(labelled_full)),
        "flops_executed_mean": flops_exec, "flops_full": flops_full,
        "flops_saved_fraction": None if not flops_full else 1.0 - flops_exec / flops_full,
        "blocks_executed_mean": _mean([r.blocks_executed for r in ok]),
        "latency": run.latency,
        "kl_full_skipped_mean": float(np.mean(kls)) if kls else None,
        "kl_full_skipped_max": float(np.max(kls)) if kls else None,
        "throughput": run.throughput(),
    }


def skip_rate_per_block(records: Sequence[AuditRecord]) -> pd.DataFrame:
    """One row per block: index, name, whether it downsamples, skip rate over the successful inputs, mean gate
    score (where there is one), mean FLOPs spent."""
    rows = []
    for r in records:
        if r.ok and r.trace:
            for b in r.trace["blocks"]:
                rows.append({"block": b["index"], "name": b["name"], "downsample": b["downsample"],
                             "skipped": not b["executed"], "score": b["score"], "flops": b["flops"]})
    cols = ["block", "name", "downsample", "skip_rate", "score_mean", "flops_mean", "n"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    df["score"] = pd.to_numeric(df["score"], errors="coerce")
    return (df.groupby(["block", "name", "downsample"], sort=True)
            .agg(skip_rate=("skipped", "mean"), score_mean=("score", "mean"), flops_mean=("flops", "mean"),
                 n=("skipped", "size")).reset_index()[cols])


def skip_rate_per_class(records: Sequence[AuditRecord]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per class: ``(summary, by_block)``. The class is the label when known, else the full network's
    prediction (the skipped run's for an input the shadow run did not check). ``summary``: n, how many of them are labelled, skip rate over all blocks, mean blocks run,
    agreement, accuracy (over the labelled ones). ``by_block``: class x block skip-rate matrix (rows classes,
    columns block names)."""
    rows, cells = [], []
    for r in records:
        if not (r.ok and r.trace):
            continue
        # the label, else the full network's prediction, else (not checked against it) the skipped run's
        cls, source = ((r.label, "label") if r.label is not None else
                       (r.full_predicted_label, "full prediction") if r.full_predicted_label is not None else
                       (r.predicted_label, "skipped prediction (not checked)"))
        mask = r.executed_mask
        rows.append({"class": cls, "class_source": source,
                     "skip_rate": 1.0 - sum(mask) / len(mask), "blocks_executed": sum(mask),
                     "agree": np.nan if r.agree is None else float(r.agree),
                     "correct": r.correct})
        for b in r.trace["blocks"]:
            cells.append({"class": cls, "name": b["name"], "block": b["index"], "skipped": not b["executed"]})
    if not rows:
        return (pd.DataFrame(columns=["class", "n", "n_labelled", "skip_rate", "blocks_executed_mean",
                                      "agreement", "accuracy"]), pd.DataFrame())
    df = pd.DataFrame(rows)
    df["correct"] = df["correct"].astype("float")
    df["labelled"] = df["class_source"].eq("label")
    summary = (df.groupby("class", sort=True)
               .agg(n=("skip_rate", "size"), n_labelled=("labelled", "sum"), skip_rate=("skip_rate", "mean"),
                    blocks_executed_mean=("blocks_executed", "mean"), agreement=("agree", "mean"),
                    accuracy=("correct", "mean")).reset_index())
    c = pd.DataFrame(cells)
    order = c.drop_duplicates("block").sort_values("block")["name"].tolist()
    by_block = c.pivot_table(index="class", columns="name", values="skipped", aggfunc="mean")[order]
    return summary, by_block


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def report_data(run: AuditRun, reproducibility: Sequence[ReproResult] | None = None) -> dict:
    """Everything the report shows, as one JSON-ready dict (what report.json holds)."""
    per_block = skip_rate_per_block(run.records)
    per_class, _ = skip_rate_per_class(run.records)
    ordered = sorted(run.records, key=lambda r: (r.agree is not False, r.ok, r.record_id or 0))
    repro = list(reproducibility or [])
    return _clean({
        "report_version": REPORT_VERSION, "run_id": run.run_id, "database": Path(run.db_path).name,
        "configuration": {**run.config, "model": run.model_name, "weights_sha256": run.weights_sha256,
                          "params_sha256": run.params_sha256, "policy": run.policy},
        "summary": summarize(run),
        "skip_rate_per_block": per_block.to_dict(orient="records"),
        "skip_rate_per_class": per_class.to_dict(orient="records"),
        "reproducibility": {"sampled": len(repro), "reproduced": sum(r.reproduced for r in repro),
                            "results": [r.to_dict() for r in repro]},
        "environment": run.environment,
        "failed": [{"record_id": r.record_id, "input_name": r.input_name, "input_sha256": r.input_sha256,
                    "error": r.error} for r in run.failed_records],
        "skipped": [{"record_id": r.record_id, "input_name": r.input_name, "reason": r.error}
                    for r in run.skipped_records],
        "records": [r.to_dict(thumbnail=False) for r in ordered],
    })


def _spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy whose text cells cannot run as spreadsheet formulas: a cell starting with ``=``, ``@``, a tab or
    a carriage return, or with ``+`` / ``-`` when it is not a plain number (an input named
    ``=HYPERLINK(...).png`` or ``-2+3.png``), gets a leading ``'``, as OWASP advises for CSV exports. Every other
    value is written exactly as stored (a label ``-1``, the executed mask)."""
    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return text.strip() == text

    def safe(value: object) -> object:
        if not isinstance(value, str) or not value:
            return value
        if value[0] in ("=", "@", "\t", "\r") or (value[0] in "+-" and not is_number(value)):
            return "'" + value
        return value

    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_string_dtype(out[column].dtype):  # text or object columns
            out[column] = out[column].map(safe)
    return out


def plotly_script_name() -> str:
    """The file name of Plotly's script that reports load from beside themselves: ``plotly-<version>.min.js``."""
    import plotly

    return f"plotly-{plotly.__version__}.min.js"


def _plotly_script() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def render_report(run: AuditRun, reproducibility: Sequence[ReproResult] | None = None,
                  max_rows: int = MAX_ROWS) -> tuple[str, str, str]:
    """The report as ``(html, json, csv)`` strings.

    ``reproducibility``: results of :func:`skipviz.audit.reproduce.reproduce_sample` (the network runs there,
    not here). The HTML lists every disagreement in full (thumbnail, per-block decisions on hover), the failed
    and skipped inputs with their reasons and counts, and all audited inputs in a compact, collapsed table of up
    to ``max_rows`` rows (the JSON and CSV always hold every record). The page loads Plotly's script from
    :func:`plotly_script_name` beside it (:func:`write_report` and :func:`report_bundle` put it there).
    """
    data = report_data(run, reproducibility)
    per_block = skip_rate_per_block(run.records)
    per_class, by_block = skip_rate_per_class(run.records)
    page = render_html(run, data, per_block, per_class, by_block, script=plotly_script_name(), max_rows=max_rows)
    text = json.dumps(data, indent=1, sort_keys=False, allow_nan=False)
    csv = _spreadsheet_safe(records_to_dataframe(run.records)).to_csv(index=False)
    return page, text, csv


def atomic_write(path: str | Path, content: str | bytes) -> Path:
    """Write ``content`` to ``path`` atomically: a temporary file in the same folder, flushed and fsynced, then
    renamed over ``path`` (and the folder fsynced). A process killed at any point leaves the previous file or
    none under the final name, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder that cannot be opened (some platforms)
        return path
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
    return path


def write_report(run: AuditRun, out_html: str | Path, reproducibility: Sequence[ReproResult] | None = None,
                 max_rows: int = MAX_ROWS) -> tuple[Path, Path, Path]:
    """Write ``out.html`` plus ``out.json`` and ``out.csv`` beside it, each atomically (:func:`atomic_write`;
    the HTML last), and Plotly's script beside them once (:func:`plotly_script_name`; kept when already there
    and complete). Returns the three report paths."""
    out = Path(out_html)
    page, text, csv = render_report(run, reproducibility, max_rows=max_rows)
    script = out.parent / plotly_script_name()
    js = _plotly_script()
    if not script.is_file() or script.stat().st_size != len(js.encode("utf-8")):
        atomic_write(script, js)
    paths = (out, out.with_suffix(".json"), out.with_suffix(".csv"))
    for p, content in zip((paths[1], paths[2], paths[0]), (text, csv, page)):
        atomic_write(p, content)
    return paths


def report_bundle(run: AuditRun, reproducibility: Sequence[ReproResult] | None = None,
                  max_rows: int = MAX_ROWS, rendered: tuple[str, str, str] | None = None) -> bytes:
    """The report as one zip (``audit_<run>.html``, ``.json``, ``.csv`` and Plotly's script beside them):
    unpacked anywhere, the page opens offline with its charts. ``rendered``: :func:`render_report`'s output
    when already made."""
    page, text, csv = rendered or render_report(run, reproducibility, max_rows=max_rows)
    stem = f"audit_{run.run_id}"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in ((f"{stem}.html", page), (f"{stem}.json", text), (f"{stem}.csv", csv),
                              (plotly_script_name(), _plotly_script())):
            zf.writestr(name, content)
    return buf.getvalue()
