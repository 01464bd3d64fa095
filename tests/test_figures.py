"""skipviz.figures: the dashboard's live figures (block map, latency, Pareto, skip rate) build without Streamlit and
carry the right traces, labels and units; every figure of the package is importable from here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from skipviz import dashboard, figures, load_image, policies
from skipviz.samples import sample_bytes, sample_names


@pytest.fixture(scope="module")
def cat_x(tiny_net):
    image, _ = load_image(sample_bytes(sample_names()[0]))
    return dashboard.preprocess(tiny_net, image)


def test_every_figure_is_importable_from_skipviz_figures():
    from skipviz import figures_audit, figures_explain

    for module in (figures_audit, figures_explain):
        assert all(getattr(figures, n) is getattr(module, n) for n in module.__all__)
    assert all(hasattr(figures, n) for n in figures.__all__)


@torch.no_grad()
def test_block_map_figure_shows_decisions_threshold_and_downsampling(tiny_net, cat_x):
    lo = dashboard.inspect(tiny_net, cat_x, policies.make_policy(tiny_net, 0.0))
    hi = dashboard.inspect(tiny_net, cat_x, policies.make_policy(tiny_net, 1.0))
    f_lo, f_hi = figures.block_map_figure(lo.trace), figures.block_map_figure(hi.trace)
    d_lo, d_hi = figures.block_map_decisions(f_lo), figures.block_map_decisions(f_hi)
    assert list(d_lo) == tiny_net.block_names or set(d_lo) == set(tiny_net.block_names)
    assert all(v == "fired" for v in d_lo.values())
    assert d_hi == dict(zip(tiny_net.block_names, dashboard.decisions(hi.trace)))
    assert d_lo != d_hi
    names = [tr.name for tr in f_hi.data]
    assert "threshold" in names
    thr = [tr for tr in f_hi.data if tr.name == "threshold"][0]
    assert {y for y in thr.y if y is not None} == {1.0}
    # downsampling blocks have a black outline and a marker in their text
    for tr in f_hi.data:
        if tr.type == "bar":
            for name, text, width in zip(tr.x, tr.text, tr.marker.line.width):
                down = tiny_net.blocks[tiny_net.block_names.index(name)].downsample
                assert (width > 0) == down and text.startswith("▼") == down
    assert list(f_hi.layout.xaxis.categoryarray) == tiny_net.block_names
    # the legend sits right of the plot, under the colour bar: clear of long block names and the axis title
    assert f_hi.layout.legend.x > 1 and f_hi.layout.legend.yanchor == "bottom"
    bar = next(tr for tr in f_hi.data if tr.type == "bar" and tr.marker.colorbar.len)
    assert bar.marker.colorbar.len <= 0.6 and bar.marker.colorbar.yanchor == "top"


def test_block_map_names_blocks_without_a_score_for_what_they_are(tiny_net, cat_x):
    forced = dashboard.overrides_from_choices({i: "skip" for i in range(tiny_net.num_blocks)})
    res = dashboard.inspect(tiny_net, cat_x, policies.make_policy(tiny_net, 0.5, forced))
    names = [tr.name for tr in figures.block_map_figure(res.trace).data if tr.type == "bar"]
    assert names == ["no score (ungated, forced, or threshold 0)"]


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
    assert "no measurable saving (±" in title and "batch 1" in title
    assert "CPU" not in title  # the device is the page's caption: the title stays short
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
    assert "batch 16" in fig.layout.title.text and "CPU" not in fig.layout.title.text
    # the legend goes under the plot and the colour bar to its right: they cannot overlap
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0 and fig.layout.legend.yanchor == "top"
    assert pts.marker.colorbar.x is None or pts.marker.colorbar.x >= 1
    star = [tr for tr in fig.data if tr.name == "current setting"][0]
    assert star.x[0] == pytest.approx(pts.x[1]) and star.marker.symbol == "star"
    noisy_star = pareto_figure(sweep, sweep.points[0.0], latencies, latencies[0.0])
    assert [tr for tr in noisy_star.data if tr.name == "current setting"][0].marker.symbol == "star-open"
    with pytest.raises(ValueError, match="no threshold"):
        pareto_figure(sweep, sweep.points[0.5], {}, latencies[0.5])


def test_block_map_names_the_exits_groups(tiny_net, batch):
    from skipviz import EarlyExitPolicy, figures

    with torch.no_grad():
        trace = tiny_net.run(batch[:1], EarlyExitPolicy(0.0, min_block=2)).traces()[0]
    fig = figures.block_map_figure(trace)
    names = {tr.name for tr in fig.data}
    assert {"blocks with an exit check", "no score (no exit check, or after the exit)"} <= names
