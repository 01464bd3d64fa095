"""The audit report's HTML page (private; :func:`skipviz.audit.report.render_report` is the entry point).

:func:`render_html` lays out what :func:`~skipviz.audit.report.report_data` and the skip-rate tables hold: the
summary, the latency in the words its interval allows, every disagreement in full (thumbnail, per-block decisions
on hover), failed and skipped inputs with their reasons, the figures (:mod:`skipviz.figures`, drawn by Plotly's
script beside the page), reproducibility, configuration and environment, and the compact table of all inputs.
Every string that came from an input (file names, labels, error texts) is HTML-escaped.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from .._format import percent
from ..figures import fig_agreement, fig_flops_saved, fig_skip_rate_per_block, fig_skip_rate_per_class
from .shadow import shadow_words
from ..policies.words import describe_policy
from .records import AuditRecord, AuditRun

__all__ = ["render_html"]


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else percent(v)


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


def _shadow_words(shadow: dict | None) -> str:
    words = shadow_words(shadow)
    return f" ({_e(words)})" if words else ""


def _headline(s: dict, repro_line: str) -> dict[str, str]:
    """The report's summary table: label -> text, from :func:`summarize`'s numbers (``s``) and the
    reproducibility line (HTML)."""
    tp = s["throughput"]
    return {
        "inputs": (f"{s['n_inputs']}: {s['n_ok']} audited, {s['n_failed']} failed, {s['n_skipped']} skipped "
                   "(not images)" + (f"; run {s['status']}" if s.get("status") != "finished" else "")
                   + (f"; resumed after {s['resumed_from_records']} recorded inputs" if s.get("resumed_from_records")
                      else "")),
        "agreement with the full network": _prop(s["agreement"]) + _shadow_words(s.get("shadow")),
        "accuracy, skipped": _prop(s["accuracy_skipped"]),
        "accuracy, full network": _prop(s["accuracy_full"]),
        "FLOPs saved": (f"{_pct(s['flops_saved_fraction'])} (mean {s['flops_executed_mean'] / 1e6:.2f}M of "
                        f"{s['flops_full'] / 1e6:.2f}M)" if s["flops_full"] else "n/a"),
        "latency saved (paired measurement)": _latency_line(s.get("latency")),
        "throughput, end to end": (f"{tp['end_to_end_images_per_s']:.1f} images/s over {tp['images']} images "
                                   "(reading, decoding, the skipped run, the shadow full run where it ran, "
                                   "storing)"
                                   if tp.get("end_to_end_images_per_s") else "n/a"),
        "KL(full || skipped)": ("n/a" if s["kl_full_skipped_mean"] is None else
                                f"mean {s['kl_full_skipped_mean']:.4g}, max {s['kl_full_skipped_max']:.4g}"),
        "reproducibility": repro_line,
    }


def _figures_html(run: AuditRun, summary: dict, per_block: pd.DataFrame, by_block: pd.DataFrame) -> str:
    """The charts as HTML divs that need Plotly's script: agreement, and per block, per class and FLOPs saved
    when any input ran."""
    figures: list[go.Figure] = [fig_agreement(summary)]
    if not per_block.empty:
        figures += [fig_skip_rate_per_block(per_block), fig_skip_rate_per_class(by_block),
                    fig_flops_saved(run.records)]
    fig_html = [pio.to_html(f, full_html=False, include_plotlyjs=False, config={"displaylogo": False})
                for f in figures]
    return "".join(f'<div>{h}</div>' for h in fig_html)


def _reproducibility_html(repro: dict) -> tuple[str, str]:
    """``(line, table)``: how many sampled records reproduced (HTML) and the table of their results (empty when
    none was sampled)."""
    line = ("not run" if not repro["sampled"] else
            f"<span class='{'ok' if repro['reproduced'] == repro['sampled'] else 'no'}'>"
            f"{repro['reproduced']}/{repro['sampled']} sampled records reproduced</span>")
    table = pd.DataFrame(repro["results"]).to_html(index=False, escape=True, na_rep="") if repro[
        "sampled"] else ""
    return line, table


def _all_inputs_html(run: AuditRun, disagreements: Sequence[AuditRecord], max_rows: int) -> str:
    """Every audited input in one collapsed compact table, disagreements first, capped at ``max_rows`` rows, and
    how many more agreeing inputs only the CSV and JSON hold."""
    agreeing = [r for r in run.ok_records if r.agree is not False]  # agreeing, or not checked
    shown = list(disagreements) + agreeing[: max(max_rows - len(disagreements), 0)]
    hidden = agreeing[max(max_rows - len(disagreements), 0):]
    unchecked = sum(r.agree is None for r in hidden)
    table = (f"<details><summary>{len(shown)} of {len(run.ok_records)} inputs, disagreements first (click to "
             f"show)</summary>{_compact_rows(shown)}</details>" if shown else "<p>None.</p>")
    parts = ([f"{len(hidden) - unchecked} more agreeing inputs"] if len(hidden) > unchecked else []) + (
        [f"{unchecked} more inputs not checked against the full network"] if unchecked else [])
    return table + "\n" + (f"<p>{' and '.join(parts)} are in the CSV and JSON files.</p>" if parts else "")


def render_html(run: AuditRun, data: dict, per_block: pd.DataFrame, per_class: pd.DataFrame,
                by_block: pd.DataFrame, script: str, max_rows: int) -> str:
    """The report page of ``run``: ``data`` is its :func:`~skipviz.audit.report.report_data`, ``per_block``,
    ``per_class`` and ``by_block`` its skip-rate tables, ``script`` the file name of Plotly's script the page
    loads from beside itself; at most ``max_rows`` rows per list of inputs (disagreements always in full)."""
    s = data["summary"]
    disagreements = [r for r in run.ok_records if r.agree is False]
    repro_line, repro_table = _reproducibility_html(data["reproducibility"])
    headline = _headline(s, repro_line)
    head_rows = "".join(f"<tr><th>{_e(k)}</th><td>{v if k == 'reproducibility' else _e(v)}</td></tr>"
                        for k, v in headline.items())
    cfg = data["configuration"]
    lat = s.get("latency")
    return f"""<!DOCTYPE html>
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
{_figures_html(run, s, per_block, by_block)}
<h2>Skip rate per block</h2>{per_block.to_html(index=False, escape=True, float_format=lambda v: f"{v:.3f}")}
<h2>Skip rate per class</h2>{per_class.to_html(index=False, escape=True, float_format=lambda v: f"{v:.3f}")}
<h2>Reproducibility</h2><p>{repro_line}. Each sampled record's whole batch was re-run from its stored source
(input SHA-256 checked, policy rebuilt from its stored configuration) with deterministic algorithms; on CPU the
logits and gate scores must match bit for bit, elsewhere within the tolerance shown.</p>{repro_table}
<h2>Configuration and hashes</h2>{_kv_table(cfg)}
<h2>Environment</h2>{_kv_table(run.environment)}
<h2>All audited inputs ({len(run.ok_records)})</h2>
{_all_inputs_html(run, disagreements, max_rows)}
<p><small>SkipViz audit report version {data['report_version']}; database {_e(Path(run.db_path).name)}.</small></p>
</body></html>"""
