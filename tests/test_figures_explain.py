"""skipviz.figures_explain: the Redundancy and Explain pages' figures build without Streamlit and carry the right
traces, labels and units (divergences in nats), and a blank attribution panel says why."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from skipviz import StaticMaskPolicy, figures
from skipviz.explain import block_importance, explain
from skipviz.figures_explain import (adjacent_kl_series, attribution_overlay, blank_map_reason, importance_bars,
                                     kl_heatmap, kl_policy_scores)
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
    assert "nats" in hm.colorbar.title.text and "nats" in hm.hovertemplate
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
    assert fig.layout.yaxis.title.text == "KL(i ‖ i+1) (nats)" and "8 inputs" in fig.layout.title.text
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
    assert "nats" in fig.layout.yaxis.title.text
    # skipped blocks score lowest: short bars, so each is also marked and labelled, with a red outline
    marks = [t for t in fig.data if t.name == "skipped"][0]
    assert list(marks.x) == [bar.x[i] for i in sorted(pol.skip)] and set(marks.text) == {"skipped"}
    assert [w > 0 for w in bar.marker.line.width] == [i in pol.skip for i in range(9)]
    assert fig.layout.yaxis.type == "log"  # scores from 0.002 to 0.05: small bars stay visible


def test_importance_bars_mark_skips(tiny_net):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    imp = block_importance(tiny_net, x, StaticMaskPolicy({2, 5}))
    fig = importance_bars(imp)
    assert [t.name for t in fig.data] == ["executed", "bypassed"]
    assert list(fig.data[1].x) == ["stage1.block2", "stage2.block2"]
    assert fig.data[1].marker.pattern.shape == "/"
    assert len(fig.data[0].x) == 7
    assert fig.layout.yaxis.title.text == "share of |importance| (%)"
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


def test_every_name_is_still_importable_from_skipviz_figures():
    from skipviz import figures_explain

    assert set(figures_explain.__all__) <= set(figures.__all__)
    assert all(getattr(figures, n) is getattr(figures_explain, n) for n in figures_explain.__all__)


def test_a_blank_skipped_map_says_why(tiny_net):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    ex = explain(tiny_net, x, StaticMaskPolicy({7, 8}), methods=("gradcam",), importance=None)
    if ex.maps["gradcam"]["full"].max() <= 0:
        pytest.skip("this random network's full Grad-CAM map is blank too")
    assert blank_map_reason(ex, "gradcam", "full") is None
    blank = replace(ex, maps={"gradcam": {"full": ex.maps["gradcam"]["full"],
                                          "skipped": np.zeros_like(ex.maps["gradcam"]["skipped"])}})
    reason = blank_map_reason(blank, "gradcam", "skipped")
    assert reason.startswith("The skipped run's gradcam map is zero everywhere")
    assert "blocks 7, 8 were bypassed" in reason and "positive evidence" in reason
    fig = attribution_overlay(blank, "gradcam")
    panel = [a.text.replace("<br>", " ") for a in fig.layout.annotations if "zero" in a.text]
    assert panel and panel[0] == reason  # written into the blank panel, wrapped
    faint = replace(ex, maps={"gradcam": {"full": ex.maps["gradcam"]["full"],
                                          "skipped": ex.maps["gradcam"]["full"] * 1e-3}})
    assert "faint" in blank_map_reason(faint, "gradcam", "skipped")
