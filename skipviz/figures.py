"""Every Plotly figure of the package, pure builders (no Streamlit; the dashboard and the audit report lay
them out).

One input (Inspect page):

* :func:`block_map_figure` - every block's score, threshold and decision; :func:`top5_figure`,
  :func:`latency_figure` - skipped vs full (paired rounds, the saving in the words its interval allows).

Thresholds page: :func:`pareto_figure` (accuracy vs latency, error bars: the saving's 95 % interval),
:func:`skip_rate_figure` (per block).

Redundancy and explanations:

* :func:`kl_heatmap` - an L x L divergence matrix with block names on both axes;
* :func:`adjacent_kl_series` - the adjacent-block divergence over a data set, mean line + percentile band;
* :func:`kl_policy_scores` - the KL policy's per-block scores with the skip threshold and decisions;
* :func:`importance_bars` - per-block importance with the skip decisions marked;
* :func:`attribution_overlay` - attribution maps of the full and the skipped run side by side over the image.

Audit report: ``fig_skip_rate_per_block``, ``fig_skip_rate_per_class``, ``fig_flops_saved``,
``fig_throughput``, ``fig_agreement``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .evaluate.calibration import pareto_mask
from .policies.threshold import score_label

if TYPE_CHECKING:  # pragma: no cover
    from .audit.records import AuditRecord
    from .dashboard import InspectResult
    from .engine.network import SkipNetwork
    from .engine.trace import SampleTrace
    from .evaluate.calibration import CalibrationPoint, CalibrationSweep
    from .explain import BlockImportance, Explanation
    from .measure.saving import PairedSaving
    from .policies.kl import KLRedundancyPolicy
    from .redundancy import RedundancyStats

EXECUTED_COLOR = "#1f77b4"
BYPASSED_COLOR = "#d62728"
PROTECTED_COLOR = "#7f7f7f"
RUN_COLOR = "#2b8a3e"


def _as_matrix(matrix) -> np.ndarray:
    m = matrix.detach().cpu().numpy() if hasattr(matrix, "detach") else np.asarray(matrix)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected one square (L, L) matrix, got shape {m.shape}; pick one input or the mean")
    return m.astype(np.float64)


def kl_heatmap(matrix, block_names: Sequence[str], divergence: str = "kl", method: str = "spatial",
               title: str | None = None) -> go.Figure:
    """Heatmap of an (L, L) matrix (``[i, j] = KL(p_i || p_j)``): rows = block i (reference p), columns = block
    j, block names on both axes, first block at the top."""
    m = _as_matrix(matrix)
    names = list(block_names)
    if len(names) != m.shape[0]:
        raise ValueError(f"{len(names)} block names for a {m.shape[0]} x {m.shape[0]} matrix")
    label = "JS(i, j)" if divergence == "js" else "KL(i ‖ j)"
    fig = go.Figure(go.Heatmap(z=m, x=names, y=names, colorscale="Viridis", zmin=0,
                               colorbar={"title": {"text": label}},
                               hovertemplate="i = %{y}<br>j = %{x}<br>" + label + " = %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title or f"{'Jensen-Shannon' if divergence == 'js' else 'KL'} divergence between "
                                     f"blocks ({method})",
                      xaxis_title="block j (compared)", yaxis_title="block i (reference)",
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=-45)
    return fig


def adjacent_kl_series(stats: "RedundancyStats | pd.DataFrame", band: tuple[str, str] | None = None,
                       title: str | None = None) -> go.Figure:
    """Mean divergence between adjacent blocks with a percentile band (default: lowest to highest percentile).

    ``stats``: a :class:`~skipviz.redundancy.RedundancyStats` or its ``adjacent`` DataFrame (columns
    ``pair``, ``mean`` and ``p<percentile>``)."""
    frame = stats.adjacent if hasattr(stats, "adjacent") else stats
    pct_cols = [c for c in frame.columns if c.startswith("p") and c[1:].replace(".", "", 1).isdigit()]
    if "pair" not in frame.columns or "mean" not in frame.columns:
        raise ValueError("expected columns 'pair' and 'mean' (RedundancyStats.adjacent)")
    if band is None:
        if len(pct_cols) < 2:
            raise ValueError("need two percentile columns for the band, e.g. p10 and p90")
        pct_cols = sorted(pct_cols, key=lambda c: float(c[1:]))
        band = (pct_cols[0], pct_cols[-1])
    lo, hi = band
    x = list(frame["pair"])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=frame[hi], mode="lines", line={"width": 0}, name=hi, showlegend=False,
                             hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=x, y=frame[lo], mode="lines", line={"width": 0}, fill="tonexty",
                             fillcolor="rgba(31,119,180,0.25)", name=f"{lo}–{hi}"))
    fig.add_trace(go.Scatter(x=x, y=frame["mean"], mode="lines+markers", line={"color": EXECUTED_COLOR},
                             name="mean"))
    if "p50" in frame.columns:
        fig.add_trace(go.Scatter(x=x, y=frame["p50"], mode="lines", line={"dash": "dot", "color": EXECUTED_COLOR},
                                 name="median"))
    div = getattr(stats, "divergence", "kl")
    n = getattr(stats, "n", None)
    fig.update_layout(title=title or f"Adjacent-block {'JS' if div == 'js' else 'KL'} divergence"
                                     + (f" over {n} inputs" if n else ""),
                      xaxis_title="block pair (i → i+1)", yaxis_title="JS(i, i+1)" if div == "js" else "KL(i ‖ i+1)",
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_xaxes(tickangle=-45)
    return fig


def kl_policy_scores(policy: "KLRedundancyPolicy", title: str | None = None) -> go.Figure:
    """The KL policy's per-block scores (mean KL block input ‖ output), coloured by decision, with the
    threshold (the Beta ``q`` quantile in KL units) as a horizontal line."""
    df = policy.to_dataframe()
    colors = [BYPASSED_COLOR if s else (PROTECTED_COLOR if not c else EXECUTED_COLOR)
              for s, c in zip(df["skipped"], df["candidate"])]
    status = ["skipped" if s else ("always runs (downsampling)" if not c else "runs")
              for s, c in zip(df["skipped"], df["candidate"])]
    fig = go.Figure(go.Bar(x=df["name"], y=df["kl"], marker_color=colors, customdata=np.array(status)[:, None],
                           hovertemplate="%{x}<br>KL %{y:.4f}<br>%{customdata[0]}<extra></extra>", name="KL score"))
    thr = policy.beta.threshold_kl
    if thr is not None:
        fig.add_hline(y=thr, line_dash="dash", annotation_text=f"q={policy.q:.2f} quantile ({policy.beta.fit})")
    fig.update_layout(title=title or f"KL redundancy scores ({policy.method}); red = skipped",
                      xaxis_title="block", yaxis_title="mean KL(input ‖ output)",
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_xaxes(tickangle=-45)
    return fig


def importance_bars(importance: "BlockImportance", title: str | None = None) -> go.Figure:
    """Per-block importance share (full network) as bars: executed blocks in blue, bypassed ones in red with a
    hatch pattern, hover shows the policy's reason. Two traces (executed / bypassed) for the legend."""
    df = importance.to_dataframe()
    fig = go.Figure()
    for executed, name, color, pattern in ((True, "executed", EXECUTED_COLOR, ""),
                                           (False, "bypassed", BYPASSED_COLOR, "/")):
        part = df[df["executed"] == executed]
        fig.add_trace(go.Bar(x=part["name"], y=part["share"], name=name, marker_color=color,
                             marker_pattern_shape=pattern,
                             customdata=np.stack([part["importance"], part["reason"], part["rank"]], axis=1)
                             if len(part) else None,
                             hovertemplate="%{x}<br>share %{y:.1%}<br>importance %{customdata[0]:.4f}"
                                           "<br>rank %{customdata[2]}<br>%{customdata[1]}<extra></extra>"))
    fig.update_layout(title=title or f"Block importance for '{importance.target_label}' ({importance.method}); "
                                     f"bypassed blocks carry {importance.skipped_share:.0%}",
                      xaxis_title="block", yaxis_title="share of |importance|", barmode="overlay",
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_xaxes(categoryorder="array", categoryarray=list(df["name"]), tickangle=-45)
    fig.update_yaxes(tickformat=".0%")
    return fig


def attribution_overlay(explanation: "Explanation", method: str = "gradcam", opacity: float = 0.55,
                        title: str | None = None) -> go.Figure:
    """The image with the full run's and the skipped run's attribution map on top, side by side (two
    panels, each an ``Image`` trace plus a semi-transparent ``Heatmap``), with Spearman and top-k overlap in
    the title."""
    if method not in explanation.maps:
        raise ValueError(f"no {method!r} map in this explanation; it has {', '.join(explanation.maps)}")
    if not 0 <= opacity <= 1:
        raise ValueError("opacity must be in [0, 1]")
    img = (np.clip(explanation.image, 0, 1) * 255).astype(np.uint8)
    full, skipped = explanation.maps[method]["full"], explanation.maps[method]["skipped"]
    vmax = float(max(full.max(), skipped.max(), 1e-12))
    cmp = explanation.comparisons[method]
    titles = (f"full: {explanation.full.predicted_label} ({explanation.full.confidence:.0%})",
              f"skipped: {explanation.skipped.predicted_label} ({explanation.skipped.confidence:.0%}), "
              f"{sum(explanation.skipped.executed)}/{len(explanation.skipped.executed)} blocks")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.04)
    for col, m in ((1, full), (2, skipped)):
        fig.add_trace(go.Image(z=img, hoverinfo="skip"), row=1, col=col)
        fig.add_trace(go.Heatmap(z=m, zmin=0, zmax=vmax, colorscale="Inferno", opacity=opacity,
                                 showscale=col == 2, colorbar={"title": {"text": "attribution"}},
                                 hovertemplate="x %{x}, y %{y}: %{z:.3g}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(showticklabels=False)
    for col in (1, 2):
        fig.update_yaxes(showticklabels=False, autorange="reversed", scaleanchor="x" if col == 1 else f"x{col}",
                         row=1, col=col)
    fig.update_layout(title=title or f"{method} for class '{explanation.target_label}': Spearman "
                                     f"{cmp.spearman:.2f}, top-{cmp.top_k:.0%} overlap {cmp.topk_overlap:.0%}",
                      margin={"l": 10, "r": 10, "t": 70, "b": 10})
    return fig


# ------------------------------------------------------------------------------------------- one input
def block_map_figure(trace: "SampleTrace", title: str | None = None) -> go.Figure:
    """Every block in order as a bar: height and colour = the gate or plan probability (blocks without a score, ungated or
    forced by an override, drawn at 1 in grey),
    fired blocks solid, bypassed blocks hatched and faded, downsampling blocks outlined in black and marked
    with a down arrow; each block's threshold is drawn as a red dashed step line.

    Each bar's text is ``"fired"`` or ``"bypassed"`` (prefixed ``"▼ "`` for downsampling blocks).
    """
    names = [b.name for b in trace.blocks]
    label = score_label(trace.policy)  # gate or plan probability
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
                          colorbar=dict(title=label.split()[0] + " p"))
        else:
            marker.update(color="#868e96")
        fig.add_trace(go.Bar(
            x=[b.name for b in blocks], y=[b.score if gated else 1.0 for b in blocks],
            name=("gated blocks" if trace.policy != "plan" else "blocks the plan decides") if gated
            else "no score (ungated or forced)",
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
    fig.update_layout(title=title or (f"Block map: {trace.blocks_executed}/{trace.blocks_total} blocks fired, "
                                      f"{trace.flops_saved_fraction:.1%} FLOPs saved"),
                      barmode="overlay",
                      yaxis=dict(title=f"{label} (no score: 1)", range=[0, 1.2]),
                      xaxis=dict(title="block (▼ = downsampling, outlined)", categoryorder="array",
                                 categoryarray=names), bargap=0.15,
                      legend=dict(orientation="h", y=-0.45), height=400, margin=dict(l=40, r=20, t=50, b=40))
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
    fig.update_layout(barmode="group", xaxis=dict(title="probability", range=[0, 1]), height=300,
                      yaxis=dict(autorange="reversed"), margin=dict(l=40, r=20, t=30, b=40),
                      title="Top classes: skipped vs full")
    return fig


def _quartile_errors(values_s: Sequence[float], k: float) -> tuple[float, float, float]:
    """(median, median - q25, q75 - median) of round times in seconds, scaled by ``k``."""
    q25, med, q75 = (float(v) * k for v in np.percentile(np.asarray(values_s, dtype=np.float64), [25, 50, 75]))
    return med, med - q25, q75 - med


def latency_figure(saving: "PairedSaving") -> go.Figure:
    """Full vs skipped latency per batch (bars: medians of the interleaved paired rounds; whiskers: their
    inter-quartile range), titled with the batch size, the device and what may be said about the saving
    (:meth:`~skipviz.measure.saving.PairedSaving.label`: "no measurable saving (±x ms)" when its interval
    contains zero)."""
    full, f_lo, f_hi = _quartile_errors(saving.full_s, 1e3)
    skip, s_lo, s_hi = _quartile_errors(saving.skipped_s, 1e3)
    fig = go.Figure(go.Bar(x=["full", "skipped"], y=[full, skip], marker_color=["#1c7ed6", RUN_COLOR],
                           error_y=dict(type="data", symmetric=False, array=[f_hi, s_hi], arrayminus=[f_lo, s_lo]),
                           text=[f"{full:.3f} ms", f"{skip:.3f} ms"], textposition="inside",
                           hovertemplate="%{x}: median %{y:.3f} ms per batch<extra></extra>"))
    fig.update_layout(title=dict(text=f"Latency, batch {saving.batch_size}, {saving.device or 'device not recorded'}"
                                      f"<br><sup>{saving.label()}; {saving.rounds} paired rounds, whiskers: "
                                      "inter-quartile range</sup>"),
                      xaxis_title="run", yaxis_title=f"latency (ms per batch of {saving.batch_size})", height=320,
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
        marker=dict(color=ts, colorscale="Viridis", size=9, colorbar=dict(title="threshold"),
                    symbol=["circle" if m else "circle-open" for m in measurable], line=dict(width=2)),
        customdata=np.stack([np.array(ts, dtype=object), flops.astype(object), words], 1),
        hovertemplate="threshold %{customdata[0]:.2f}<br>%{x:.3f} ms/image<br>%{y:.1f} %<br>FLOPs executed "
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
    fig.update_layout(title=dict(text=f"{acc_name.capitalize()} vs measured latency ({s0.device or 'device not recorded'}"
                                      f", batch {s0.batch_size}; {len(sweep.calib)} images)<br><sup>hollow: no "
                                      "measurable saving (95 % interval contains zero)</sup>"),
                      xaxis_title="latency per image (ms): full median minus the paired saving",
                      yaxis_title=f"{acc_name} (%)", height=440, margin=dict(l=50, r=20, t=70, b=40))
    return fig


def skip_rate_figure(point: "CalibrationPoint", net: "SkipNetwork") -> go.Figure:
    """Fraction of calibration images that bypassed each block (downsampling blocks outlined)."""
    rate = 100 * point.skip_rate
    fig = go.Figure(go.Bar(x=net.block_names, y=rate, marker=dict(
        color=rate, colorscale="Blues", cmin=0, cmax=100,
        line=dict(color=["#000" if b.downsample else "rgba(0,0,0,0)" for b in net.blocks],
                  width=[3 if b.downsample else 0 for b in net.blocks])),
        text=[f"{r:.0f} %" for r in rate], textposition="outside"))
    fig.update_layout(title="Skip rate per block (calibration set)", xaxis_title="block",
                      yaxis=dict(title="images bypassing the block (%)", range=[0, 110]), height=320,
                      margin=dict(l=40, r=20, t=50, b=40))
    return fig


# ------------------------------------------------------------------------------------------- audit report
def fig_skip_rate_per_block(per_block: pd.DataFrame) -> go.Figure:
    """Bar chart: fraction of inputs for which each block was bypassed."""
    fig = go.Figure(go.Bar(x=per_block["name"], y=per_block["skip_rate"],
                           marker_color=["#999" if d else "#3b7dd8" for d in per_block["downsample"]],
                           hovertemplate="%{x}<br>skipped for %{y:.1%} of inputs<extra></extra>"))
    fig.update_layout(title="Skip rate per block (grey: downsampling block)", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1], xaxis_title="block", yaxis_title="inputs bypassing the block",
                      height=360, margin=dict(t=50, b=40, l=60, r=20))
    return fig


def fig_skip_rate_per_class(by_block: pd.DataFrame) -> go.Figure:
    """Heat map: skip rate of each block (columns) for each class (rows)."""
    fig = go.Figure(go.Heatmap(z=by_block.to_numpy(dtype=float), x=list(by_block.columns),
                               y=[str(i) for i in by_block.index], zmin=0, zmax=1, colorscale="Blues",
                               colorbar=dict(title="skip rate", tickformat=".0%"),
                               hovertemplate="class %{y}<br>%{x}: skipped %{z:.1%}<extra></extra>"))
    fig.update_layout(title="Skip rate per class and block", height=120 + 28 * max(len(by_block), 1),
                      margin=dict(t=50, b=40, l=100, r=20))
    return fig


def fig_flops_saved(records: Sequence["AuditRecord"]) -> go.Figure:
    """Histogram of the fraction of FLOPs saved per input, agreeing and disagreeing inputs separately."""
    fig = go.Figure()
    for agree, color, name in ((True, "#3b7dd8", "agrees with full"), (False, "#d62728", "disagrees")):
        vals = [r.flops_saved_fraction for r in records if r.ok and bool(r.agree) == agree]
        if vals:
            fig.add_trace(go.Histogram(x=vals, name=name, marker_color=color, xbins=dict(start=0, end=1, size=0.02)))
    fig.update_layout(title="FLOPs saved per input", barmode="stack", xaxis_tickformat=".0%",
                      xaxis_title="fraction of the full network's FLOPs saved", yaxis_title="inputs", height=340,
                      margin=dict(t=50, b=40, l=60, r=20))
    return fig


def fig_throughput(throughput: dict) -> go.Figure:
    """Bar chart: images/s of the skipped run, skipped + shadow full run, and the plain full network."""
    names = ["skipped", "skipped + shadow full", "full network"]
    vals = [throughput.get("skip_images_per_s"), throughput.get("skip_with_shadow_images_per_s"),
            throughput.get("full_images_per_s")]
    fig = go.Figure(go.Bar(x=names, y=[v or 0 for v in vals], marker_color=["#3b7dd8", "#7fa7e0", "#999"],
                           text=[f"{v:.1f}" if v else "n/a" for v in vals], textposition="auto"))
    fig.update_layout(title="Throughput measured during the audit (images/s)", yaxis_title="images / s",
                      height=320, margin=dict(t=50, b=40, l=60, r=20))
    return fig


def fig_agreement(summary: dict) -> go.Figure:
    """Agreement with the full network and accuracies, with their 95% Wilson intervals."""
    items = [("agreement with full", summary["agreement"]), ("accuracy (skipped)", summary["accuracy_skipped"]),
             ("accuracy (full)", summary["accuracy_full"])]
    items = [(n, p) for n, p in items if p["n"]]
    fig = go.Figure(go.Bar(
        x=[n for n, _ in items], y=[p["rate"] for _, p in items], marker_color="#3b7dd8",
        error_y=dict(type="data", symmetric=False, array=[p["ci_high"] - p["rate"] for _, p in items],
                     arrayminus=[p["rate"] - p["ci_low"] for _, p in items]),
        text=[f"{p['rate']:.1%} ({p['k']}/{p['n']})" for _, p in items], textposition="auto"))
    fig.update_layout(title="Agreement and accuracy (95% Wilson intervals)", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.05], height=320, margin=dict(t=50, b=40, l=60, r=20))
    return fig


__all__ = ["adjacent_kl_series", "attribution_overlay", "block_map_decisions", "block_map_figure", "fig_agreement",
           "fig_flops_saved", "fig_skip_rate_per_block", "fig_skip_rate_per_class", "fig_throughput",
           "importance_bars", "kl_heatmap", "kl_policy_scores", "latency_figure", "pareto_figure", "skip_rate_figure",
           "top5_figure"]
