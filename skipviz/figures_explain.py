"""Figures that explain a network (pure Plotly builders, no Streamlit): which blocks repeat each other (Redundancy
page) and where a prediction looks (Explain page). Divergences are natural-log KL or Jensen-Shannon, in nats.
Re-exported by :mod:`skipviz.figures`.

* :func:`kl_heatmap` - an L x L divergence matrix with block names on both axes;
* :func:`adjacent_kl_series` - the adjacent-block divergence over a data set, mean line + percentile band;
* :func:`kl_policy_scores` - the KL policy's per-block scores with the skip threshold and decisions;
* :func:`importance_bars` - per-block importance with the skip decisions marked;
* :func:`attribution_overlay` - attribution maps of the full and the skipped run side by side over the image,
  with :func:`blank_map_reason` written into a panel that has nothing to show.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:  # pragma: no cover
    from .explain import BlockImportance, Explanation
    from .policies.kl import KLRedundancyPolicy
    from .redundancy import RedundancyStats

__all__ = ["BYPASSED_COLOR", "EXECUTED_COLOR", "PROTECTED_COLOR", "RUN_COLOR", "adjacent_kl_series",
           "attribution_overlay", "blank_map_reason", "divergence_label", "importance_bars", "kl_heatmap",
           "kl_policy_scores"]

EXECUTED_COLOR = "#1f77b4"
BYPASSED_COLOR = "#d62728"
PROTECTED_COLOR = "#7f7f7f"
RUN_COLOR = "#2b8a3e"
#: A map whose largest value is below this share of the shared colour scale looks blank.
FAINT = 0.02


def divergence_label(divergence: str, pair: str = "i, j") -> str:
    """``"KL(i ‖ j)"`` or ``"JS(i, j)"`` for a divergence between the blocks named in ``pair``."""
    return f"JS({pair})" if divergence == "js" else f"KL({pair.replace(', ', ' ‖ ')})"


def _as_matrix(matrix) -> np.ndarray:
    m = matrix.detach().cpu().numpy() if hasattr(matrix, "detach") else np.asarray(matrix)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected one square (L, L) matrix, got shape {m.shape}; pick one input or the mean")
    return m.astype(np.float64)


def kl_heatmap(matrix, block_names: Sequence[str], divergence: str = "kl", method: str = "spatial",
               title: str | None = None) -> go.Figure:
    """Heatmap of an (L, L) matrix (``[i, j] = KL(p_i || p_j)``, nats): rows = block i (reference p), columns =
    block j, block names on both axes, first block at the top."""
    m = _as_matrix(matrix)
    names = list(block_names)
    if len(names) != m.shape[0]:
        raise ValueError(f"{len(names)} block names for a {m.shape[0]} x {m.shape[0]} matrix")
    label = divergence_label(divergence)
    fig = go.Figure(go.Heatmap(z=m, x=names, y=names, colorscale="Viridis", zmin=0,
                               colorbar={"title": {"text": f"{label}<br>nats"}, "thickness": 14},
                               hovertemplate="i = %{y}<br>j = %{x}<br>" + label + " = %{z:.4f} nats<extra></extra>"))
    fig.update_layout(title=title or f"{'Jensen-Shannon' if divergence == 'js' else 'KL'} between blocks ({method})",
                      xaxis_title="block j (compared)", yaxis_title="block i (reference)",
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=-45)
    return fig


def adjacent_kl_series(stats: "RedundancyStats | pd.DataFrame", band: tuple[str, str] | None = None,
                       title: str | None = None) -> go.Figure:
    """Mean divergence (nats) between adjacent blocks with a percentile band (default: lowest to highest
    percentile).

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
    fig.update_layout(title=title or (f"Adjacent-block {'JS' if div == 'js' else 'KL'}"
                                      + (f" over {n} inputs" if n else "")),
                      xaxis_title="block pair (i → i+1)", yaxis_title=f"{divergence_label(div, 'i, i+1')} (nats)",
                      legend={"x": 0.01, "xanchor": "left", "y": 0.99, "yanchor": "top",
                              "bgcolor": "rgba(255,255,255,0.8)"},  # inside, top left: clear of the title
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_xaxes(tickangle=-45)
    return fig


def kl_policy_scores(policy: "KLRedundancyPolicy", title: str | None = None) -> go.Figure:
    """The KL policy's per-block scores (mean KL block input ‖ output, nats), coloured by decision, with the
    threshold (the Beta ``q`` quantile in KL units) as a dashed line.

    Skipped blocks score lowest, so their bars are short: each is hatched with a red outline, marked with a red
    cross and labelled "skipped", and the axis is logarithmic when the scores span more than a factor of 20."""
    df = policy.to_dataframe()
    colors = [BYPASSED_COLOR if s else (PROTECTED_COLOR if not c else EXECUTED_COLOR)
              for s, c in zip(df["skipped"], df["candidate"])]
    status = ["skipped" if s else ("always runs (downsampling)" if not c else "runs")
              for s, c in zip(df["skipped"], df["candidate"])]
    kl = df["kl"].to_numpy(dtype=float)
    fig = go.Figure(go.Bar(x=df["name"], y=kl, marker_color=colors, customdata=np.array(status)[:, None],
                           marker_line=dict(color=[BYPASSED_COLOR if s else "rgba(0,0,0,0)" for s in df["skipped"]],
                                            width=[2 if s else 0 for s in df["skipped"]]),
                           marker_pattern_shape=["/" if s else "" for s in df["skipped"]],
                           hovertemplate="%{x}<br>KL %{y:.4f} nats<br>%{customdata[0]}<extra></extra>",
                           name="KL score", showlegend=False))
    skipped = df[df["skipped"]]
    if len(skipped):
        fig.add_trace(go.Scatter(x=skipped["name"], y=skipped["kl"], mode="markers+text",
                                 text=["skipped"] * len(skipped),
                                 textposition="top center", textfont=dict(color=BYPASSED_COLOR),
                                 marker=dict(symbol="x", size=11, color=BYPASSED_COLOR), name="skipped",
                                 hoverinfo="skip", cliponaxis=False))
    positive = kl[np.isfinite(kl)]
    log = positive.size > 0 and positive.min() > 0 and positive.max() / positive.min() > 20
    thr = policy.beta.threshold_kl
    if thr is not None:
        fig.add_hline(y=thr, line_dash="dash")  # a shape takes data values on a log axis, an annotation log10
        fig.add_annotation(x=1, xref="paper", y=float(np.log10(thr)) if log and thr > 0 else thr, yref="y",
                           text=f"q={policy.q:.2f} quantile ({policy.beta.fit})", showarrow=False, xanchor="right",
                           yanchor="bottom", bgcolor="rgba(255,255,255,0.7)")
    fig.update_layout(title=title or f"KL scores per block ({policy.method})",
                      xaxis_title="block (red: skipped, grey: downsampling, always runs)",
                      yaxis_title="mean KL(input ‖ output), nats" + (" (log)" if log else ""),
                      yaxis_type="log" if log else "linear", margin={"l": 10, "r": 10, "t": 50, "b": 10})
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
    fig.update_layout(title=title or f"Block importance for '{importance.target_label}' ({importance.method})<br>"
                                     f"<sup>bypassed blocks carry {importance.skipped_share:.0%}</sup>",
                      xaxis_title="block", yaxis_title="share of |importance| (%)", barmode="overlay",
                      margin={"l": 10, "r": 10, "t": 60, "b": 10})
    fig.update_xaxes(categoryorder="array", categoryarray=list(df["name"]), tickangle=-45)
    fig.update_yaxes(tickformat=".0%")
    return fig


def blank_map_reason(explanation: "Explanation", method: str, run: str = "skipped") -> str | None:
    """Why ``run``'s ``method`` map shows nothing, or None when it shows something: zero everywhere, or fainter
    than :data:`FAINT` of the colour scale both panels share. Grad-CAM keeps only positive evidence (ReLU), so
    it is zero where the read-out layer's features all speak against the explained class; that happens when
    the blocks before it were bypassed, and when the run predicts another class."""
    maps = explanation.maps[method]
    m, other = maps[run], maps["full" if run == "skipped" else "skipped"]
    vmax = float(max(m.max(), other.max(), 0.0))
    peak = float(m.max())
    if peak > 1e-12 and (vmax <= 0 or peak >= FAINT * vmax):
        return None
    dec = explanation.skipped if run == "skipped" else explanation.full
    target = explanation.target_label
    why: list[str] = []
    if method == "gradcam":
        why.append(f"at the read-out layer ({explanation.layers.get(method, 'the last feature map')}) every "
                   f"location's gradient-weighted evidence for '{target}' is zero or negative, and Grad-CAM keeps only "
                   "positive evidence")
        last = []  # the bypassed blocks at the end of the network, right before the read-out layer
        for i in range(len(dec.executed) - 1, -1, -1):
            if dec.executed[i]:
                break
            last.append(i)
        if last:
            which = ", ".join(str(i) for i in sorted(last))
            why.append(f"{'blocks ' + which + ' were' if len(last) > 1 else 'block ' + which + ' was'} bypassed, so "
                       "that layer reads an earlier block's features")
    else:
        why.append(f"the run's score for '{target}' barely changes between a black image and this one")
    if dec.predicted_label != target:
        why.append(f"the {run} run predicts '{dec.predicted_label}', not '{target}'")
    what = "zero everywhere" if peak <= 1e-12 else f"faint (its peak is {peak / vmax:.1%} of the shared scale)"
    return f"The {run} run's {method} map is {what}: " + "; ".join(why) + "."


def attribution_overlay(explanation: "Explanation", method: str = "gradcam", opacity: float = 0.55,
                        title: str | None = None) -> go.Figure:
    """The image with the full run's and the skipped run's attribution map on top, side by side (two
    panels, each an ``Image`` trace plus a semi-transparent ``Heatmap``), with Spearman and top-k overlap in
    the title. A panel with nothing to show says why (:func:`blank_map_reason`)."""
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
    for col, run in ((1, "full"), (2, "skipped")):
        reason = blank_map_reason(explanation, method, run)
        if reason:
            fig.add_annotation(text="<br>".join(_wrap(reason, 44)), xref=f"x{col if col > 1 else ''} domain",
                               yref=f"y{col if col > 1 else ''} domain", x=0.5, y=0.5, showarrow=False,
                               bgcolor="rgba(255,255,255,0.85)", font=dict(size=11, color="#212529"))
    fig.update_xaxes(showticklabels=False)
    for col in (1, 2):
        fig.update_yaxes(showticklabels=False, autorange="reversed", scaleanchor="x" if col == 1 else f"x{col}",
                         row=1, col=col)
    fig.update_layout(title=title or f"{method} for class '{explanation.target_label}'<br><sup>Spearman "
                                     f"{cmp.spearman:.2f}, top-{cmp.top_k:.0%} overlap {cmp.topk_overlap:.0%}</sup>",
                      margin={"l": 10, "r": 10, "t": 80, "b": 10})
    return fig


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most about ``width`` characters (Plotly annotations do not wrap)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])
