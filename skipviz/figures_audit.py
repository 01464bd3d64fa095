"""The audit report's figures (pure Plotly builders, no Streamlit; :mod:`skipviz.audit.report` lays them out):
``fig_skip_rate_per_block``, ``fig_skip_rate_per_class``, ``fig_flops_saved``, ``fig_throughput``,
``fig_agreement``. Every axis says its unit. Re-exported by :mod:`skipviz.figures`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import pandas as pd
import plotly.graph_objects as go

if TYPE_CHECKING:  # pragma: no cover
    from .audit.records import AuditRecord

__all__ = ["fig_agreement", "fig_flops_saved", "fig_skip_rate_per_block", "fig_skip_rate_per_class", "fig_throughput"]


def fig_skip_rate_per_block(per_block: pd.DataFrame) -> go.Figure:
    """Bar chart: share of inputs for which each block was bypassed (%)."""
    fig = go.Figure(go.Bar(x=per_block["name"], y=per_block["skip_rate"],
                           marker_color=["#999" if d else "#3b7dd8" for d in per_block["downsample"]],
                           hovertemplate="%{x}<br>skipped for %{y:.1%} of inputs<extra></extra>"))
    fig.update_layout(title="Skip rate per block (grey: downsampling block)", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1], xaxis_title="block", yaxis_title="inputs bypassing the block (%)",
                      height=360, margin=dict(t=50, b=40, l=60, r=20))
    return fig


def fig_skip_rate_per_class(by_block: pd.DataFrame) -> go.Figure:
    """Heat map: skip rate (%) of each block (columns) for each class (rows)."""
    fig = go.Figure(go.Heatmap(z=by_block.to_numpy(dtype=float), x=list(by_block.columns),
                               y=[str(i) for i in by_block.index], zmin=0, zmax=1, colorscale="Blues",
                               colorbar=dict(title="skip rate (%)", tickformat=".0%"),
                               hovertemplate="class %{y}<br>%{x}: skipped %{z:.1%}<extra></extra>"))
    fig.update_layout(title="Skip rate per class and block", height=120 + 28 * max(len(by_block), 1),
                      xaxis_title="block", yaxis_title="class", margin=dict(t=50, b=40, l=100, r=20))
    return fig


def fig_flops_saved(records: Sequence["AuditRecord"]) -> go.Figure:
    """Histogram of the share of FLOPs saved per input (%): agreeing, disagreeing and (when the shadow run was
    sampled) not checked inputs separately."""
    fig = go.Figure()
    for agree, color, name in ((True, "#3b7dd8", "agrees with full"), (False, "#d62728", "disagrees"),
                               (None, "#9e9e9e", "not checked against full")):
        vals = [r.flops_saved_fraction for r in records if r.ok and r.agree is agree]
        if vals:
            fig.add_trace(go.Histogram(x=vals, name=name, marker_color=color, xbins=dict(start=0, end=1, size=0.02)))
    fig.update_layout(title="FLOPs saved per input", barmode="stack", xaxis_tickformat=".0%",
                      xaxis_title="FLOPs saved (% of the full network's)", yaxis_title="inputs (count)", height=340,
                      margin=dict(t=50, b=40, l=60, r=20))
    return fig


def fig_throughput(throughput: dict) -> go.Figure:
    """Bar chart: images/s of the skipped run, skipped + shadow full run, and the plain full network."""
    names = ["skipped", "skipped + shadow full", "full network"]
    vals = [throughput.get("skip_images_per_s"), throughput.get("skip_with_shadow_images_per_s"),
            throughput.get("full_images_per_s")]
    fig = go.Figure(go.Bar(x=names, y=[v or 0 for v in vals], marker_color=["#3b7dd8", "#7fa7e0", "#999"],
                           text=[f"{v:.1f}" if v else "n/a" for v in vals], textposition="auto"))
    fig.update_layout(title="Throughput measured during the audit", xaxis_title="run",
                      yaxis_title="throughput (images/s)", height=320, margin=dict(t=50, b=40, l=60, r=20))
    return fig


def fig_agreement(summary: dict) -> go.Figure:
    """Agreement with the full network and accuracies (%), with their 95% Wilson intervals."""
    items = [("agreement with full", summary["agreement"]), ("accuracy (skipped)", summary["accuracy_skipped"]),
             ("accuracy (full)", summary["accuracy_full"])]
    items = [(n, p) for n, p in items if p["n"]]
    fig = go.Figure(go.Bar(
        x=[n for n, _ in items], y=[p["rate"] for _, p in items], marker_color="#3b7dd8",
        error_y=dict(type="data", symmetric=False, array=[p["ci_high"] - p["rate"] for _, p in items],
                     arrayminus=[p["rate"] - p["ci_low"] for _, p in items]),
        text=[f"{p['rate']:.1%} ({p['k']}/{p['n']})" for _, p in items], textposition="auto"))
    fig.update_layout(title="Agreement and accuracy (95% Wilson intervals)", yaxis_tickformat=".0%",
                      yaxis_title="inputs (%)", yaxis_range=[0, 1.05], height=320,
                      margin=dict(t=50, b=40, l=60, r=20))
    return fig
