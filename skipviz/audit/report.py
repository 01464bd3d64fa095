"""Audit reports: one HTML page, plus JSON and CSV, written atomically.

Pure pieces, each testable without Streamlit:

* :func:`summarize` - every input accounted for (audited, failed, skipped), agreement with the full network
  (Wilson 95% interval, ``scipy.stats.binomtest``), accuracy when labels are known, FLOPs saved, the paired
  latency measurement with its bootstrap interval (``AuditRun.latency``), end-to-end throughput, KL statistics.
* :func:`skip_rate_per_block`, :func:`skip_rate_per_class` - pandas tables.
* :func:`render_report` -> ``(html, json, csv)`` strings; :func:`write_report` writes the three files (each to a
  temporary file, fsynced, then renamed over the final name: a killed writer leaves the previous report or
  none, never a truncated one) and Plotly's script once beside them; :func:`report_bundle` is the same as one
  zip (the dashboard's download). They render what the run stored (figures from :mod:`skipviz.figures`); they
  never run the network: a reproduced sample is passed in (:func:`skipviz.audit.reproduce.reproduce_sample`).

Size: the page loads Plotly's script from ``plotly-<version>.min.js`` beside it (4.6 MB, written once per
folder, not into every report; the page opens offline and says so when the script is missing). Thumbnails are
small JPEGs stored only for disagreements and a sample; the table of all inputs is compact and collapsed, and
capped at ``max_rows`` (the JSON and CSV hold every record). A 2,000-input report is a few hundred KB.

Every string that came from an input (file names, labels, error texts) is HTML-escaped.
"""
from __future__ import annotations

import html
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
import plotly.graph_objects as go
import plotly.io as pio
from scipy import stats

from ..figures import fig_agreement, fig_flops_saved, fig_skip_rate_per_block, fig_skip_rate_per_class
from ..policies.words import describe_policy
from .records import AuditRecord, AuditRun, ReproResult, records_to_dataframe

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
    return {
        "n_inputs": len(run.records), "n_ok": len(ok), "n_failed": len(run.failed_records),
        "n_skipped": len(run.skipped_records), "status": run.status, "resumed_from_records": run.resumed,
        "agreement": proportion(sum(bool(r.agree) for r in ok), len(ok)),
        "accuracy_skipped": proportion(sum(bool(r.correct) for r in labelled), len(labelled)),
        "accuracy_full": proportion(sum(bool(r.full_correct) for r in labelled), len(labelled)),
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
    prediction. ``summary``: n, how many of them are labelled, skip rate over all blocks, mean blocks run,
    agreement, accuracy (over the labelled ones). ``by_block``: class x block skip-rate matrix (rows classes,
    columns block names)."""
    rows, cells = [], []
    for r in records:
        if not (r.ok and r.trace):
            continue
        cls = r.label if r.label is not None else r.full_predicted_label
        mask = r.executed_mask
        rows.append({"class": cls, "class_source": "label" if r.label is not None else "full prediction",
                     "skip_rate": 1.0 - sum(mask) / len(mask), "blocks_executed": sum(mask), "agree": bool(r.agree),
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


# --------------------------------------------------------------------------------------------------- HTML
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _prop(p: dict) -> str:
    if not p["n"]:
        return "n/a (no inputs)"
    return f"{p['rate']:.1%} ({p['k']}/{p['n']}; 95% CI {p['ci_low']:.1%} to {p['ci_high']:.1%}, Wilson)"


def _decisions_html(rec: AuditRecord) -> str:
    cells = []
    for b in (rec.trace or {}).get("blocks", []):
        score = "" if b["score"] is None else f" score {b['score']:.3f}"
        color = "#3b7dd8" if b["executed"] else "#ddd"
        cells.append(f'<span class="blk" style="background:{color}" title="{_e(b["name"])}: '
                     f'{"ran" if b["executed"] else "skipped"}{_e(score)} - {_e(b["reason"])}"></span>')
    return "".join(cells)


def _img(rec: AuditRecord) -> str:
    if not rec.thumbnail_png_b64:
        return ""
    mime = "image/png" if rec.thumbnail_png_b64.startswith("iVBOR") else "image/jpeg"  # older runs stored PNGs
    return f'<img class="thumb" alt="{_e(rec.input_name)}" src="data:{mime};base64,{rec.thumbnail_png_b64}">'


def _mask_text(rec: AuditRecord) -> str:
    return "".join("R" if e else "S" for e in rec.executed_mask)


def _compact_rows(records: Sequence[AuditRecord]) -> str:
    """The table of all audited inputs, one short row each (the per-block details are in the JSON)."""
    out = []
    for r in records:
        cls = ' class="bad"' if r.agree is False else ""
        out.append(f"<tr{cls}><td>{_img(r)}</td><td>{_e(r.input_name)}</td><td>{_e(r.label)}</td>"
                   f"<td>{_e(r.predicted_label)} {_pct(r.confidence)}</td><td>{_e(r.full_predicted_label)} "
                   f"{_pct(r.full_confidence)}</td><td>{'' if r.kl_full_skipped is None else f'{r.kl_full_skipped:.3g}'}"
                   f"</td><td>{r.blocks_executed}/{r.blocks_total}</td><td>{_pct(r.flops_saved_fraction)}</td>"
                   f"<td><code>{_mask_text(r)}</code></td></tr>")
    head = ("<tr><th></th><th>input</th><th>label</th><th>skipped</th><th>full</th><th>KL</th><th>blocks run</th>"
            "<th>FLOPs saved</th><th>blocks (R ran, S skipped)</th></tr>")
    return f"<table>{head}{''.join(out)}</table>"


def _listing(records: Sequence[AuditRecord], max_rows: int, what: str) -> str:
    """Failed or skipped inputs with their reasons (collapsed when long, capped at ``max_rows``)."""
    if not records:
        return "<p>None.</p>"
    rows = "".join(f"<tr><td>{_e(r.input_name)}</td><td>{_e((r.input_sha256 or '')[:16])}</td><td>{_e(r.error)}</td>"
                   f"</tr>" for r in records[:max_rows])
    table = f"<table><tr><th>input</th><th>SHA-256 (start)</th><th>reason</th></tr>{rows}</table>"
    more = (f"<p>{len(records) - max_rows} more {what} inputs are in the CSV and JSON files.</p>"
            if len(records) > max_rows else "")
    if len(records) <= 20:
        return table + more
    return f"<details><summary>{len(records)} {what} inputs (click to show)</summary>{table}{more}</details>"


def _reason_counts(records: Sequence[AuditRecord]) -> str:
    """How many failed / skipped inputs share each kind of reason (the text after the input's name)."""
    if not records:
        return ""
    kinds = pd.Series([_reason_kind(r) for r in records]).value_counts()
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{int(v)}</td></tr>" for k, v in kinds.items())
    return f"<table><tr><th>reason</th><th>inputs</th></tr>{rows}</table>"


def _reason_kind(rec: AuditRecord) -> str:
    text = str(rec.error or "")
    for sep in (": skipped: ", ": refused: ", " refused: "):
        if sep in text:
            return text.split(sep, 1)[1].split(" (", 1)[0]
    head, _, tail = text.partition(": ")
    tail = tail or head
    return tail.split(" (", 1)[0][:80]


def _record_rows(records: Sequence[AuditRecord]) -> str:
    out = []
    for r in records:
        cls = "bad" if r.agree is False else ""
        out.append(
            f'<tr class="{cls}"><td>{_img(r)}</td><td>{_e(r.input_name)}<br><small>{_e((r.input_sha256 or "")[:16])}'
            f'</small></td><td>{_e(r.label)}</td><td>{_e(r.predicted_label)} ({_pct(r.confidence)})</td>'
            f'<td>{_e(r.full_predicted_label)} ({_pct(r.full_confidence)})</td>'
            f'<td>{"" if r.kl_full_skipped is None else f"{r.kl_full_skipped:.4f}"}</td>'
            f'<td>{r.blocks_executed}/{r.blocks_total}</td><td>{_pct(r.flops_saved_fraction)}</td>'
            f'<td class="dec">{_decisions_html(r)}</td></tr>')
    head = ("<tr><th></th><th>input</th><th>label</th><th>skipped prediction</th><th>full prediction</th>"
            "<th>KL(full||skipped)</th><th>blocks run</th><th>FLOPs saved</th><th>decisions (hover)</th></tr>")
    return f"<table>{head}{''.join(out)}</table>"


def _kv_table(d: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)}"
                   f"</td></tr>" for k, v in d.items())
    return f"<table class='kv'>{rows}</table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1300px}
table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f4f6f9} tr.bad{background:#fdecec} .kv th{width:220px}
.thumb{width:48px;height:48px;object-fit:contain} code{font-size:12px} details{margin:8px 0 20px}
.note{background:#fff8e1;border:1px solid #f0d48a;padding:6px 10px}
.blk{display:inline-block;width:10px;height:18px;margin-right:1px;border:1px solid #bbb}
.ok{color:#1a7f37;font-weight:600} .no{color:#c62828;font-weight:600} small{color:#777}
"""


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


def _latency_line(lat: dict | None) -> str:
    """What the report says about latency: the paired saving's own wording (never a saving its interval does
    not support), the medians, and how and where it was measured."""
    if not lat:
        return "not measured (no input of this run was audited in this process, or measuring was turned off)"
    busy = f" Note: {lat['busy']}." if lat.get("busy") else ""
    return (f"{lat['label']}; full {lat['full_ms']:.3f} ms, skipped {lat['skipped_ms']:.3f} ms per image (medians). "
            f"Model time only, measured after the audit on {lat['sample_size']} of its own inputs as one batch, "
            f"{lat['rounds']} interleaved paired rounds on {lat['device']} ({lat['threads']} threads, load "
            f"{lat['load_average_1min']}), apart from decoding and I/O.{busy}")


def _headline(s: dict, repro_line: str) -> dict[str, str]:
    """The report's summary table: label -> text, from :func:`summarize`'s numbers (``s``) and the
    reproducibility line (HTML)."""
    tp = s["throughput"]
    return {
        "inputs": (f"{s['n_inputs']}: {s['n_ok']} audited, {s['n_failed']} failed, {s['n_skipped']} skipped "
                   "(not images)" + (f"; run {s['status']}" if s.get("status") != "finished" else "")
                   + (f"; resumed after {s['resumed_from_records']} recorded inputs" if s.get("resumed_from_records")
                      else "")),
        "agreement with the full network": _prop(s["agreement"]),
        "accuracy, skipped": _prop(s["accuracy_skipped"]),
        "accuracy, full network": _prop(s["accuracy_full"]),
        "FLOPs saved": (f"{_pct(s['flops_saved_fraction'])} (mean {s['flops_executed_mean'] / 1e6:.2f}M of "
                        f"{s['flops_full'] / 1e6:.2f}M)" if s["flops_full"] else "n/a"),
        "latency saved (paired measurement)": _latency_line(s.get("latency")),
        "throughput, end to end": (f"{tp['end_to_end_images_per_s']:.1f} images/s over {tp['images']} images "
                                   "(reading, decoding, the skipped and the shadow full run, storing)"
                                   if tp.get("end_to_end_images_per_s") else "n/a"),
        "KL(full || skipped)": ("n/a" if s["kl_full_skipped_mean"] is None else
                                f"mean {s['kl_full_skipped_mean']:.4g}, max {s['kl_full_skipped_max']:.4g}"),
        "reproducibility": repro_line,
    }


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
    s = data["summary"]
    per_block = skip_rate_per_block(run.records)
    per_class, by_block = skip_rate_per_class(run.records)
    figures: list[go.Figure] = [fig_agreement(s)]
    if not per_block.empty:
        figures += [fig_skip_rate_per_block(per_block), fig_skip_rate_per_class(by_block),
                    fig_flops_saved(run.records)]
    fig_html = [pio.to_html(f, full_html=False, include_plotlyjs=False, config={"displaylogo": False})
                for f in figures]
    disagreements = [r for r in run.ok_records if r.agree is False]
    agreeing = [r for r in run.ok_records if r.agree is not False]
    repro = data["reproducibility"]
    repro_line = ("not run" if not repro["sampled"] else
                  f"<span class='{'ok' if repro['reproduced'] == repro['sampled'] else 'no'}'>"
                  f"{repro['reproduced']}/{repro['sampled']} sampled records reproduced</span>")
    repro_table = pd.DataFrame(repro["results"]).to_html(index=False, escape=True, na_rep="") if repro[
        "sampled"] else ""
    headline = _headline(s, repro_line)
    head_rows = "".join(f"<tr><th>{_e(k)}</th><td>{v if k == 'reproducibility' else _e(v)}</td></tr>"
                        for k, v in headline.items())
    cfg = data["configuration"]
    shown = disagreements + agreeing[: max(max_rows - len(disagreements), 0)]
    hidden = len(run.ok_records) - len(shown)
    script = plotly_script_name()
    all_inputs = (f"<details><summary>{len(shown)} of {len(run.ok_records)} inputs, disagreements first (click to "
                  f"show)</summary>{_compact_rows(shown)}</details>" if shown else "<p>None.</p>")
    lat = s.get("latency")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SkipViz audit {_e(run.run_id)}</title>
<style>{_CSS}</style><script src="{script}"></script></head><body>
<h1>SkipViz audit report</h1>
<p>Run <code>{_e(run.run_id)}</code> &middot; model <b>{_e(run.model_name)}</b> &middot; policy
<b>{_e(describe_policy(run.policy or {}))}</b> <code>{_e(json.dumps(run.policy, sort_keys=True))}</code></p>
<h2>Summary</h2><table class="kv">{head_rows}</table>
<h2>Latency</h2><p>{_e(_latency_line(lat))}</p>
<p>Full and skipped runs were timed in interleaved paired rounds (one of each per round, the order
alternating); the saving is the median of the per-round differences with a bootstrap 95% interval. A saving
whose interval contains zero is reported as "no measurable saving". The timings taken while auditing (in the
JSON records and the throughput) include the machine's other work and are not latencies.</p>
<h2>Disagreements with the full network ({len(disagreements)})</h2>
{_record_rows(disagreements) if disagreements else "<p>None: every input got the full network's prediction.</p>"}
<h2>Failed inputs ({len(run.failed_records)})</h2>
{_reason_counts(run.failed_records)}{_listing(run.failed_records, max_rows, "failed")}
<h2>Skipped inputs: not images ({len(run.skipped_records)})</h2>
{_reason_counts(run.skipped_records)}{_listing(run.skipped_records, max_rows, "skipped")}
<h2>Figures</h2>
<p id="noplotly" class="note">The charts need Plotly's script <code>{_e(script)}</code> beside this file (written
with the report, and in the dashboard's report zip).</p>
<script>if (window.Plotly) document.getElementById("noplotly").style.display = "none";</script>
{''.join(f'<div>{h}</div>' for h in fig_html)}
<h2>Skip rate per block</h2>{per_block.to_html(index=False, escape=True, float_format=lambda v: f"{v:.3f}")}
<h2>Skip rate per class</h2>{per_class.to_html(index=False, escape=True, float_format=lambda v: f"{v:.3f}")}
<h2>Reproducibility</h2><p>{repro_line}. Each sampled record's whole batch was re-run from its stored source
(input SHA-256 checked, policy rebuilt from its stored configuration) with deterministic algorithms; on CPU the
logits and gate scores must match bit for bit, elsewhere within the tolerance shown.</p>{repro_table}
<h2>Configuration and hashes</h2>{_kv_table(cfg)}
<h2>Environment</h2>{_kv_table(run.environment)}
<h2>All audited inputs ({len(run.ok_records)})</h2>
{all_inputs}
{f"<p>{hidden} more agreeing inputs are in the CSV and JSON files.</p>" if hidden > 0 else ""}
<p><small>SkipViz audit report version {REPORT_VERSION}; database {_e(Path(run.db_path).name)}.</small></p>
</body></html>"""
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
