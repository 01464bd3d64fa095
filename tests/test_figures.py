"""Plotly figure builders: they build without Streamlit and carry the right traces and labels."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from skipviz import StaticMaskPolicy
from skipviz.explain import block_importance, explain
from skipviz.figures import (adjacent_kl_series, attribution_overlay, importance_bars, kl_heatmap,
                             kl_policy_scores)
from skipviz.policies.kl import KLRedundancyPolicy
from skipviz.redundancy import dataset_redundancy, kl_matrix


def test_kl_heatmap_names_on_both_axes(tiny_net, batch):
    m = kl_matrix(tiny_net, batch[:2])
    fig = kl_heatmap(m[0], tiny_net.block_names)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    hm = fig.data[0]
    assert hm.type == "heatmap"
    assert list(hm.x) == list(hm.y) == tiny_net.block_names
    assert np.allclose(np.asarray(hm.z), m[0].numpy())
    assert fig.layout.xaxis.title.text == "block j (compared)"
    assert fig.layout.yaxis.title.text == "block i (reference)"
    assert fig.layout.yaxis.autorange == "reversed"
    js = kl_heatmap(np.zeros((9, 9)), tiny_net.block_names, divergence="js")
    assert "Jensen-Shannon" in js.layout.title.text
    with pytest.raises(ValueError, match="one square"):
        kl_heatmap(m, tiny_net.block_names)
    with pytest.raises(ValueError, match="block names"):
        kl_heatmap(m[0], tiny_net.block_names[:3])


def test_adjacent_series_band(tiny_net, batch):
    stats = dataset_redundancy(tiny_net, batch)
    fig = adjacent_kl_series(stats)
    names = [t.name for t in fig.data]
    assert names == ["p90", "p10–p90", "mean", "median"]
    assert fig.data[1].fill == "tonexty"
    assert list(fig.data[2].x) == list(stats.adjacent["pair"])
    assert fig.layout.yaxis.title.text == "KL(i ‖ i+1)" and "8 inputs" in fig.layout.title.text
    with pytest.raises(ValueError, match="pair"):
        adjacent_kl_series(stats.io)


def test_policy_scores_figure():
    down = [False, False, False, True, False, False, True, False, False]
    pol = KLRedundancyPolicy([0.01, 0.002, 0.004, 0.05, 0.006, 0.02, 0.04, 0.012, 0.03], down, q=0.3)
    fig = kl_policy_scores(pol)
    bar = fig.data[0]
    assert bar.type == "bar" and len(bar.x) == 9
    red = [i for i, c in enumerate(bar.marker.color) if c == "#d62728"]
    assert red == sorted(pol.skip)
    assert any(s.type == "line" for s in fig.layout.shapes)  # the threshold line


def test_importance_bars_mark_skips(tiny_net):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    imp = block_importance(tiny_net, x, StaticMaskPolicy({2, 5}))
    fig = importance_bars(imp)
    assert [t.name for t in fig.data] == ["executed", "bypassed"]
    assert list(fig.data[1].x) == ["stage1.block2", "stage2.block2"]
    assert fig.data[1].marker.pattern.shape == "/"
    assert len(fig.data[0].x) == 7
    assert fig.layout.yaxis.title.text == "share of |importance|"
    assert "bypassed blocks carry" in fig.layout.title.text


def test_attribution_overlay_side_by_side(tiny_net):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    ex = explain(tiny_net, x, StaticMaskPolicy({1, 4}), methods=("gradcam",), importance=None)
    fig = attribution_overlay(ex, "gradcam")
    assert [t.type for t in fig.data] == ["image", "heatmap", "image", "heatmap"]
    assert fig.data[1].xaxis == "x" and fig.data[3].xaxis == "x2"
    assert np.asarray(fig.data[3].z).shape == (32, 32)
    assert fig.layout.annotations[0].text.startswith("full:")
    assert fig.layout.annotations[1].text.startswith("skipped:")
    assert "Spearman" in fig.layout.title.text
    with pytest.raises(ValueError, match="no 'integrated_gradients' map"):
        attribution_overlay(ex, "integrated_gradients")


# --------------------------------------------------------------------------------------------- latency
def _noisy_saving(seed: int, batch_size: int = 1):
    """What a noisy machine yields: full and skipped round times whose spread swamps any difference."""
    from skipviz.measure.saving import paired_saving

    rng = np.random.default_rng(seed)
    return paired_saving(2e-3 + rng.normal(0, 8e-4, 15), 2e-3 + rng.normal(0, 8e-4, 15), device="CPU (1 thread)",
                         batch_size=batch_size)


def _clear_saving(batch_size: int = 1, saving_s: float = 5e-4):
    from skipviz.measure.saving import paired_saving

    rng = np.random.default_rng(7)
    full = 2e-3 + rng.normal(0, 1e-5, 15)
    return paired_saving(full, full - saving_s + rng.normal(0, 1e-5, 15), device="CPU (1 thread)",
                         batch_size=batch_size)


def test_latency_figure_says_no_measurable_saving_on_a_noisy_machine():
    from skipviz.figures import latency_figure

    noisy = _noisy_saving(1)
    assert not noisy.measurable
    fig = latency_figure(noisy)
    title = fig.layout.title.text
    assert "no measurable saving (±" in title and "CPU (1 thread)" in title and "batch 1" in title
    assert "saved" not in title and "slower" not in title
    bars = fig.data[0]
    assert list(bars.x) == ["full", "skipped"]
    assert bars.y[0] == pytest.approx(1e3 * np.median(noisy.full_s))
    assert bars.error_y.array[0] > 0 and bars.error_y.arrayminus[1] > 0  # inter-quartile whiskers
    assert fig.layout.yaxis.title.text == "latency (ms per batch of 1)"
    clear = latency_figure(_clear_saving(batch_size=16))
    assert "0.50 ms saved (95 % CI" in clear.layout.title.text and "batch 16" in clear.layout.title.text


def _tiny_sweep(thresholds=(0.0, 0.5, 1.0)):
    from skipviz.evaluate.calibration import CalibrationPoint, CalibrationSet, CalibrationSweep

    calib = CalibrationSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["a"],
                           "test images", True)

    def point(acc: float, flops: float) -> CalibrationPoint:
        return CalibrationPoint({}, acc, acc, 1.0, flops, np.zeros(4), np.ones((4, 3), dtype=bool))

    full = point(0.9, 1.0)
    points = {t: point(0.9 - 0.2 * t, 1.0 - 0.5 * t) for t in thresholds}
    return CalibrationSweep(calib, full, points, "CPU (1 thread)")


def test_pareto_figure_has_error_bars_and_hollow_points_without_a_measurable_saving():
    from skipviz.figures import pareto_figure

    sweep = _tiny_sweep()
    latencies = {0.0: _noisy_saving(1, 16), 0.5: _clear_saving(16, 4e-4), 1.0: _clear_saving(16, 8e-4)}
    fig = pareto_figure(sweep, sweep.points[0.5], latencies, latencies[0.5])
    pts = [tr for tr in fig.data if tr.name.startswith("thresholds")][0]
    assert list(pts.marker.symbol) == ["circle-open", "circle", "circle"]
    per = {t: s.per_input() for t, s in latencies.items()}
    # each bar is the 95 % interval of its paired saving, per image
    assert pts.error_x.array[1] == pytest.approx(1e3 * (per[0.5].saving_s - per[0.5].low_s))
    assert pts.error_x.arrayminus[1] == pytest.approx(1e3 * (per[0.5].high_s - per[0.5].saving_s))
    assert pts.x[2] < pts.x[1]  # a larger saving sits further left
    assert list(pts.y) == pytest.approx([90.0, 80.0, 70.0])  # percents
    assert "no measurable saving (±" in pts.customdata[0][2] and "saved" in pts.customdata[2][2]
    assert fig.layout.xaxis.title.text.startswith("latency per image (ms)")
    assert fig.layout.yaxis.title.text == "accuracy (%)"
    assert "CPU (1 thread)" in fig.layout.title.text and "batch 16" in fig.layout.title.text
    star = [tr for tr in fig.data if tr.name == "current setting"][0]
    assert star.x[0] == pytest.approx(pts.x[1]) and star.marker.symbol == "star"
    noisy_star = pareto_figure(sweep, sweep.points[0.0], latencies, latencies[0.0])
    assert [tr for tr in noisy_star.data if tr.name == "current setting"][0].marker.symbol == "star-open"
    with pytest.raises(ValueError, match="no threshold"):
        pareto_figure(sweep, sweep.points[0.5], {}, latencies[0.5])
