"""Every Plotly figure of the package, pure builders (no Streamlit; the dashboard and the audit report lay
them out). This module holds the dashboard's live views; its neighbours hold the rest, and every name is
importable from here too.

One input (Inspect page):

* :func:`block_map_figure` - every block's score, threshold and decision; :func:`top5_figure`,
  :func:`latency_figure` - skipped vs full (paired rounds, the saving in the words its interval allows).

Thresholds page: :func:`pareto_figure` (accuracy vs latency, error bars: the saving's 95 % interval),
:func:`skip_rate_figure` (per block).

Redundancy and explanations (:mod:`skipviz.figures_explain`): :func:`kl_heatmap`, :func:`adjacent_kl_series`,
:func:`kl_policy_scores`, :func:`importance_bars`, :func:`attribution_overlay` (and :func:`blank_map_reason`).

Audit report (:mod:`skipviz.figures_audit`): ``fig_skip_rate_per_block``, ``fig_skip_rate_per_class``,
``fig_flops_saved``, ``fig_throughput``, ``fig_agreement``.

Titles stay short enough for a half-width column at 1280 px; the device a latency was measured on goes in the
page's caption, not the title. Every axis says its unit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ._format import percent
from .evaluate.calibration import pareto_mask
from .figures_audit import (fig_agreement, fig_flops_saved, fig_skip_rate_per_block, fig_skip_rate_per_class,
                            fig_throughput)
from .figures_explain import (BYPASSED_COLOR, EXECUTED_COLOR, PROTECTED_COLOR, RUN_COLOR, adjacent_kl_series,
                              attribution_overlay, blank_map_reason, divergence_label, importance_bars, kl_heatmap,
                              kl_policy_scores)
from .policies.threshold import score_label

if TYPE_CHECKING:  # pragma: no cover
    from .dashboard import InspectResult
    from .engine.network import SkipNetwork
    from .engine.trace import SampleTrace
    from .evaluate.calibration import CalibrationPoint, CalibrationSweep
    from .measure.saving import PairedSaving

__all__ = ["BYPASSED_COLOR", "EXECUTED_COLOR", "PROTECTED_COLOR", "RUN_COLOR", "adjacent_kl_series",
           "attribution_overlay", "blank_map_reason", "block_map_decisions", "block_map_figure", "divergence_label",
           "fig_agreement",
           "fig_flops_saved", "fig_skip_rate_per_block", "fig_skip_rate_per_class", "fig_throughput",
           "importance_bars", "kl_heatmap", "kl_policy_scores", "latency_figure", "pareto_figure", "skip_rate_figure",
           "top5_figure"]


# ------------------------------------------------------------------------------------------- one input
#: The block map's two legend groups per decision source: blocks with a score, blocks without one.
_BLOCK_GROUPS = {"gates": ("gated blocks", "no score (ungated, forced, or threshold 0)"),
                 "plan": ("blocks the plan decides", "no score (ungated, forced, or threshold 0)"),
                 "early_exit": ("blocks with an exit check", "no score (no exit check, or after the exit)")}


def block_map_figure(trace: "SampleTrace", title: str | None = None) -> go.Figure:
    """Every block in order as a bar: height and colour = the gate or plan probability (blocks without a score, ungated or
    forced by an override, drawn at 1 in grey),
    fired blocks solid, bypassed blocks hatched and faded, downsampling blocks outlined in black and marked
    with a down arrow; each block's threshold is drawn as a red dashed step line.

    Each bar's text is ``"fired"`` or ``"bypassed"`` (prefixed ``"▼ "`` for downsampling blocks).
    """
    names = [b.name for b in trace.blocks]
    label = score_label(trace.policy)  # gate or plan probability, or the exits' probe confidence
    fig = go.Figure()
    for gated in (True, False):
        blocks = [b for b in trace.blocks if (b.score is not None) == gated]
        if not blocks:
            continue
        fired = [b.executed for b in blocks]
        marker = dict(
            opacity=[1.0 if f else 0.35 for f in fired],
            pattern=dict(shape=["" if f else "/" for f in fired], fgcolor="#212529", solidity=0.3),
            line=dict(color=["#000000" if b.downsample else "rgba(0,0,0,0)" for b in blocks],
                      width=[3 if b.downsample else 0 for b in blocks]))
        if gated:
            marker.update(color=[b.score for b in blocks], colorscale="Viridis", cmin=0.0, cmax=1.0,
                          colorbar=dict(title=label.split()[0] + " p", len=0.55, y=1, yanchor="top",
                                        thickness=14))
        else:
            marker.update(color="#868e96")
        fig.add_trace(go.Bar(
            x=[b.name for b in blocks], y=[b.score if gated else 1.0 for b in blocks],
            name=_BLOCK_GROUPS.get(trace.policy, _BLOCK_GROUPS["gates"])[0 if gated else 1],
            hovertext=[f"{b.name}<br>{'fired' if b.executed else 'bypassed'}"
                       f"{' (downsampling)' if b.downsample else ''}<br>{label}: "
                       f"{'n/a' if b.score is None else f'{b.score:.3f}'}<br>{b.reason}<br>{b.flops / 1e6:.2f} MFLOPs"
                       for b in blocks], hoverinfo="text",
            text=[("▼ " if b.downsample else "") + ("fired" if b.executed else "bypassed") for b in blocks],
            textposition="outside", cliponaxis=False, marker=marker,
            customdata=[[b.index, "fired" if b.executed else "bypassed"] for b in blocks]))
    thresholds = [b.threshold for b in trace.blocks]
    if any(t is not None for t in thresholds):
        fig.add_trace(go.Scatter(x=names, y=thresholds, mode="lines+markers", name="threshold", connectgaps=False,
                                 line=dict(color="#e03131", dash="dash", shape="hvh"),
                                 marker=dict(symbol="line-ew-open", size=18, color="#e03131"),
                                 hovertemplate="threshold %{y:.2f}<extra></extra>"))
    # the legend sits under the colour bar, right of the plot: clear of the block names however long they are
    fig.update_layout(title=title or (f"Block map: {trace.blocks_executed}/{trace.blocks_total} blocks fired, "
                                      f"{percent(trace.flops_saved_fraction)} FLOPs saved"),
                      barmode="overlay",
                      yaxis=dict(title=f"{label} (no score: 1)", range=[0, 1.2]),
                      xaxis=dict(title="block (▼ = downsampling, outlined)", categoryorder="array",
                                 categoryarray=names, tickangle=-45), bargap=0.15,
                      legend=dict(x=1.02, xanchor="left", y=0, yanchor="bottom", font=dict(size=11)), height=420,
                      margin=dict(l=40, r=20, t=50, b=40))
    return fig


def block_map_decisions(fig: go.Figure) -> dict[str, str]:
    """Block name -> ``"fired"``/``"bypassed"`` as drawn in a :func:`block_map_figure` (for checks and tests)."""
    out = {}
    for tr in fig.data:
        if tr.type == "bar" and tr.customdata is not None:
            for name, cd in zip(tr.x, tr.customdata):
                out[name] = cd[1]
    return out


def top5_figure(res: "InspectResult", classes: Sequence[str], k: int = 5) -> go.Figure:
    """Grouped horizontal bars: the union of both top-k class sets, skipped vs full probability."""
    idx = list(dict.fromkeys(list(np.argsort(-res.probs_full)[:k]) + list(np.argsort(-res.probs_skipped)[:k])))
    labels = [classes[i] for i in idx]
    fig = go.Figure([go.Bar(y=labels, x=res.probs_skipped[idx], orientation="h", name="skipped", marker_color=RUN_COLOR),
                     go.Bar(y=labels, x=res.probs_full[idx], orientation="h", name="full", marker_color="#1c7ed6")])
    fig.update_layout(barmode="group", xaxis=dict(title="probability (%)", range=[0, 1], tickformat=".0%"), height=300,
                      yaxis=dict(autorange="reversed"), margin=dict(l=40, r=20, t=30, b=40),
                      title="Top classes: skipped vs full")
    return fig


def _quartile_errors(values_s: Sequence[float], k: float) -> tuple[float, float, float]:
    """(median, median - q25, q75 - median) of round times in seconds, scaled by ``k``."""
    q25, med, q75 = (float(v) * k for v in np.percentile(np.asarray(values_s, dtype=np.float64), [25, 50, 75]))
    return med, med - q25, q75 - med


def latency_figure(saving: "PairedSaving") -> go.Figure:
    """Full vs skipped latency per batch (bars: medians of the interleaved paired rounds; whiskers: their
    inter-quartile range), titled with the batch size and what may be said about the saving
    (:meth:`~skipviz.measure.saving.PairedSaving.label`: "no measurable saving (±x ms)" when its interval
    contains zero). The device is the page's caption (:meth:`~skipviz.measure.saving.PairedSaving.describe`)."""
    full, f_lo, f_hi = _quartile_errors(saving.full_s, 1e3)
    skip, s_lo, s_hi = _quartile_errors(saving.skipped_s, 1e3)
    fig = go.Figure(go.Bar(x=["full", "skipped"], y=[full, skip], marker_color=["#1c7ed6", RUN_COLOR],
                           error_y=dict(type="data", symmetric=False, array=[f_hi, s_hi], arrayminus=[f_lo, s_lo]),
                           text=[f"{full:.3f} ms", f"{skip:.3f} ms"], textposition="inside",
                           hovertemplate="%{x}: median %{y:.3f} ms per batch<extra></extra>"))
    fig.update_layout(title=dict(text=f"Latency, batch {saving.batch_size}<br><sup>{saving.label()}</sup>"),
                      xaxis_title=f"run ({saving.rounds} paired rounds; whiskers: IQR)",
                      yaxis_title=f"latency (ms per batch of {saving.batch_size})", height=340,
                      margin=dict(l=50, r=20, t=70, b=40))
    return fig


# ------------------------------------------------------------------------------------------- thresholds
def pareto_figure(sweep: "CalibrationSweep", current: "CalibrationPoint", latencies: "Mapping[float, PairedSaving]",
                  current_saving: "PairedSaving") -> go.Figure:
    """Accuracy (%) vs latency per image over the calibration set: every grid threshold with the 95 % interval
    of its paired saving as a horizontal error bar, the Pareto front, the full network and the current setting.

    Each threshold's saving was measured against the full network in its own interleaved rounds; it is drawn
    at the full network's median time (over all rounds of all points) minus that saving, so the bars are the
    saving's interval. Points whose interval contains zero are hollow: no measurable saving.
    """
    ts = [t for t in sorted(sweep.points) if t in latencies]
    if not ts:
        raise ValueError("no threshold of the sweep has a measured latency")
    per = {t: latencies[t].per_input() for t in ts}
    cur = current_saving.per_input()
    full_rounds = [v for s in [*per.values(), cur] for v in s.full_s]
    full_ms, full_lo, full_hi = _quartile_errors(full_rounds, 1e3)
    x = np.array([full_ms - 1e3 * per[t].saving_s for t in ts])
    minus = np.array([1e3 * (per[t].high_s - per[t].saving_s) for t in ts])  # faster end: larger saving
    plus = np.array([1e3 * (per[t].saving_s - per[t].low_s) for t in ts])
    acc = np.array([100 * sweep.points[t].accuracy for t in ts])
    flops = np.array([100 * sweep.points[t].flops_fraction for t in ts])
    measurable = [per[t].measurable for t in ts]
    words = np.array([per[t].label() for t in ts], dtype=object)
    front = pareto_mask(x, acc)
    order = np.argsort(x[front], kind="stable")
    acc_name = "accuracy" if sweep.calib.labelled else "agreement with full (no labels)"
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=x, y=acc, mode="markers", name="thresholds (bars: 95 % CI of the saving)",
        error_x=dict(type="data", symmetric=False, array=plus, arrayminus=minus, color="#868e96", thickness=1),
        marker=dict(color=ts, colorscale="Viridis", size=9, colorbar=dict(title="threshold", thickness=12, len=0.8),
                    symbol=["circle" if m else "circle-open" for m in measurable], line=dict(width=2)),
        customdata=np.stack([np.array(ts, dtype=object), flops.astype(object), words], 1),
        hovertemplate="threshold %{customdata[0]:.2f}<br>%{x:.3f} ms/image (full median minus the saving)<br>"
                      "%{y:.1f} %<br>FLOPs executed "
                      "%{customdata[1]:.1f} %<br>%{customdata[2]}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x[front][order], y=acc[front][order], mode="lines", name="Pareto front (medians)",
                             line=dict(color="#495057", shape="hv")))
    fig.add_trace(go.Scatter(x=[full_ms], y=[100 * sweep.full.accuracy], mode="markers", name="full network (IQR)",
                             error_x=dict(type="data", symmetric=False, array=[full_hi], arrayminus=[full_lo]),
                             marker=dict(symbol="square", size=12, color="#1c7ed6")))
    fig.add_trace(go.Scatter(x=[full_ms - 1e3 * cur.saving_s], y=[100 * current.accuracy], mode="markers",
                             name="current setting",
                             error_x=dict(type="data", symmetric=False, array=[1e3 * (cur.saving_s - cur.low_s)],
                                          arrayminus=[1e3 * (cur.high_s - cur.saving_s)]),
                             customdata=[[cur.label()]],
                             hovertemplate="current setting<br>%{x:.3f} ms/image<br>%{y:.1f} %<br>"
                                           "%{customdata[0]}<extra></extra>",
                             marker=dict(symbol="star" if cur.measurable else "star-open", size=18, color="#e03131",
                                         line=dict(width=1, color="black"))))
    s0 = latencies[ts[0]]
    # the legend goes under the plot, the colour bar to its right: they never overlap
    fig.update_layout(title=dict(text=f"{acc_name.capitalize().split(' (')[0]} vs latency, batch {s0.batch_size}"
                                      "<br><sup>hollow: no measurable saving (95 % CI contains 0)</sup>"),
                      xaxis_title="latency per image (ms)", yaxis_title=f"{acc_name} (%)", height=540,
                      legend=dict(orientation="h", x=0, xanchor="left", y=-0.24, yanchor="top"),
                      margin=dict(l=50, r=20, t=70, b=150))
    return fig


def skip_rate_figure(point: "CalibrationPoint", net: "SkipNetwork") -> go.Figure:
    """Share of calibration images that bypassed each block, in % (downsampling blocks outlined)."""
    rate = 100 * point.skip_rate
    fig = go.Figure(go.Bar(x=net.block_names, y=rate, marker=dict(
        color=rate, colorscale="Blues", cmin=0, cmax=100,
        line=dict(color=["#000" if b.downsample else "rgba(0,0,0,0)" for b in net.blocks],
                  width=[3 if b.downsample else 0 for b in net.blocks])),
        text=[f"{r:.0f} %" for r in rate], textposition="outside"))
    fig.update_layout(title="Skip rate per block", xaxis_title="block (outlined: downsampling)",
                      yaxis=dict(title="images bypassing the block (%)", range=[0, 110]), height=320,
                      margin=dict(l=40, r=20, t=50, b=40))
    return fig
