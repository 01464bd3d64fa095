"""Pure Plotly figure builders for redundancy and explanations (no Streamlit; the dashboard lays them out).

* :func:`kl_heatmap` - an L x L divergence matrix with block names on both axes;
* :func:`adjacent_kl_series` - the adjacent-block divergence over a data set, mean line + percentile band;
* :func:`kl_policy_scores` - the KL policy's per-block scores with the skip threshold and decisions;
* :func:`importance_bars` - per-block importance with the skip decisions marked;
* :func:`attribution_overlay` - attribution maps of the full and the skipped run side by side over the image.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:  # pragma: no cover
    from .explain import BlockImportance, Explanation
    from .redundancy import KLRedundancyPolicy, RedundancyStats

EXECUTED_COLOR = "#1f77b4"
BYPASSED_COLOR = "#d62728"
PROTECTED_COLOR = "#7f7f7f"


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


__all__ = ["adjacent_kl_series", "attribution_overlay", "importance_bars", "kl_heatmap", "kl_policy_scores"]
