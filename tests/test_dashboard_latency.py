"""skipviz.dashboard_latency: the live view's paired saving and per-block estimate, the calibration sweep's
latencies and the Thresholds page's tables, checked against the engine on a fake clock."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from skipviz import GatePolicy, create_model, dashboard, figures, policies
from skipviz.evaluate import calibration
from skipviz.measure import clock

from test_dashboard import _threshold_with_mixed_decisions, cat_x as _cat_x

cat_x = _cat_x  # the fixture, shared


def test_live_latency_pairs_full_and_skipped_and_estimates_each_block(tiny_net, cat_x, monkeypatch):
    """A fake clock (a clear saving, little noise): the live view's saving, its batch and its per-block estimate."""
    from toys import FakeClock, varied_images

    FakeClock(full_s=4e-3, saving_s=1e-3, spread_s=1e-5, seed=0).install(monkeypatch)
    FakeClock.quiet(monkeypatch)
    policy = policies.make_policy(tiny_net, _threshold_with_mixed_decisions(tiny_net, cat_x))
    xb, described = dashboard.live_batch(cat_x, varied_images(5, seed=4), 16)
    assert xb.shape[0] == 16 and torch.equal(xb[0], cat_x[0]) and described.endswith("(repeated)")
    assert dashboard.live_batch(cat_x, None, 1) == (cat_x, "this image alone")
    with pytest.raises(ValueError):
        dashboard.live_batch(cat_x, None, 4)
    profile = dashboard.block_profile(tiny_net, xb)
    live = dashboard.live_latency(tiny_net, xb, policy, profile, described, rounds=7)
    assert live.batch_size == 16 and live.saving.batch_size == 16 and live.saving.rounds == 7
    assert live.device.startswith("GPU" if torch.cuda.is_available() else "CPU")
    assert live.saving.measurable and live.saving.saving_s == pytest.approx(1e-3, abs=5e-5)
    assert live.saving.headline().endswith(" ms saved")
    from skipviz.measure.predict import predict_latency

    with torch.no_grad():
        run = tiny_net.run(xb, policy)
    expected = predict_latency(profile, run.executed, ~torch.isnan(run.scores)) - profile.stem_ms - \
        profile.head_ms - profile.engine_ms
    assert sum(live.block_ms) == pytest.approx(expected)  # the prediction's per-block terms
    res = dashboard.inspect(tiny_net, cat_x, policy)
    table = dashboard.block_table(res.trace, live.block_ms, live.profile_device, 16)
    col = dashboard.profile_column(live.profile_device, 16)
    assert col in table.columns and col.startswith("profile estimate (ms per batch of 16, ")
    assert live.profile_device in col and list(table[col]) == pytest.approx(live.block_ms)
    with pytest.raises(ValueError, match="profile"):
        dashboard.live_latency(tiny_net, cat_x, policy, profile)
    # early exits: each block's estimate carries its exit check (probe_ms) for the share of the batch checked there
    exits = policies.EarlyExitPolicy(0.0, blocks=[2, 4])  # everyone leaves after block 2: one check each
    costly = type(profile)(**{**profile.__dict__, "probe_ms": 5.0})
    with_checks = dashboard.live_latency(tiny_net, xb, exits, costly, described, rounds=3).block_ms
    without = dashboard.live_latency(tiny_net, xb, exits, type(profile)(**{**profile.__dict__, "probe_ms": 0.0}),
                                     described, rounds=3).block_ms
    assert [a - b for a, b in zip(with_checks, without)] == pytest.approx([5.0 if i == 2 else 0.0
                                                                          for i in range(len(without))])
    # a plan at threshold 0 runs no head: its time is not charged to block 0; above 0 it is
    planned_net = create_model("cifar_resnet20", plan=True).eval()
    plan_profile = type(profile)(**{**dashboard.block_profile(planned_net, xb).__dict__, "plan_ms": 7.0})
    at_zero = dashboard.live_latency(planned_net, xb, policies.PlanPolicy(0.0), plan_profile, described, rounds=3)
    above = dashboard.live_latency(planned_net, xb, policies.PlanPolicy(1e-9), plan_profile, described, rounds=3)
    assert above.block_ms[0] - at_zero.block_ms[0] == pytest.approx(7.0)


@pytest.fixture(scope="module")
def sweep(tiny_net):
    import os

    old = os.environ.get("SKIPVIZ_CIFAR10")
    os.environ["SKIPVIZ_CIFAR10"] = "/nonexistent/cifar10"  # force generated images: independent of the data set
    try:
        calib = calibration.load_calibration(tiny_net, n=24)
    finally:
        if old is None:
            os.environ.pop("SKIPVIZ_CIFAR10")
        else:
            os.environ["SKIPVIZ_CIFAR10"] = old
    seen = []
    sw = calibration.sweep_calibration(tiny_net, calib, thresholds=[0.0, 0.5, 0.95],
                                 progress=lambda f, text: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    return sw


@torch.no_grad()
def test_calibration_sweep_matches_engine(tiny_net, sweep):
    calib = sweep.calib
    assert not calib.labelled and "generated" in calib.source and len(calib) == 24
    x = views_normalize(tiny_net, calib.images)
    full_pred = tiny_net(x).argmax(1).numpy()
    assert np.array_equal(calib.labels.numpy(), full_pred)  # generated images are labelled by the full network
    assert sweep.full.accuracy == 1.0 and sweep.full.agreement == 1.0 and sweep.full.flops_fraction == 1.0
    res = tiny_net.run(x, GatePolicy(0.95))
    p = sweep.point_for(tiny_net, 0.95)
    assert p is sweep.points[0.95]
    assert np.array_equal(p.executed, res.executed.numpy())
    assert np.allclose(p.skip_rate, 1 - res.executed.float().mean(0).numpy())
    assert p.agreement == pytest.approx(float((res.logits.argmax(1).numpy() == full_pred).mean()))
    assert p.latency_ms > 0
    ov = {0: "skip", 3: "skip"}
    q = sweep.point_for(tiny_net, 0.5, ov)
    assert sweep.point_for(tiny_net, 0.5, ov) is q  # memoised
    assert q.skip_rate[0] == 1.0 and q.skip_rate[3] == 1.0
    frame = sweep.frame()
    assert list(frame["threshold"]) == [0.0, 0.5, 0.95]


def views_normalize(net, images):
    from skipviz.data import normalize

    return normalize(images, net.meta.mean, net.meta.std)


def test_pareto_and_skip_rate_figures(tiny_net, sweep, monkeypatch):
    assert list(calibration.pareto_mask([1, 2, 3, 2], [0.5, 0.6, 0.6, 0.4])) == [True, True, False, False]
    cur = sweep.point_for(tiny_net, 0.95)
    from toys import FakeClock

    FakeClock(full_s=5e-3, saving_s=1e-3, spread_s=1e-5, seed=0).install(monkeypatch)
    FakeClock.quiet(monkeypatch)
    assert dashboard.sweep_batch(24, 256) == (24, 24) and dashboard.sweep_batch(24, 1) == (1, 16)
    assert dashboard.sweep_batch(256, 64) == (64, 64)
    seen = []
    latencies = dashboard.latency_sweep(tiny_net, sweep, 16, rounds=5, progress=lambda f, text: seen.append(f))
    assert sorted(latencies) == sorted(sweep.points) and seen[0] == 0.0 and seen[-1] == 1.0
    assert all(s.batch_size == 16 and s.rounds == 5 for s in latencies.values())
    saving = dashboard.point_saving(tiny_net, sweep.calib, policies.make_policy(tiny_net, 0.95), 16, rounds=5)
    fig = figures.pareto_figure(sweep, cur, latencies, saving)
    star = [tr for tr in fig.data if tr.name == "current setting"][0]
    assert star.y[0] == pytest.approx(100 * cur.accuracy)
    assert "agreement" in fig.layout.yaxis.title.text  # unlabelled set says so
    bars = figures.skip_rate_figure(cur, tiny_net)
    assert np.allclose(bars.data[0].y, 100 * cur.skip_rate) and "(%)" in bars.layout.yaxis.title.text
    summary = dashboard.calibration_table(cur, sweep.full, saving)
    assert list(summary["run"]) == ["current", "full"]
    assert summary["accuracy (%)"].iloc[1] == pytest.approx(100 * sweep.full.accuracy)
    # 1 ms saved per batch of 16 on the fake clock
    assert summary["saving ms/image"].iloc[0] == pytest.approx(1.0 / 16, rel=0.05)
    assert summary["latency saving"].iloc[0].startswith("0.062 ms saved (95 % CI")
    table = dashboard.sweep_table(sweep, latencies)
    assert list(table["threshold"]) == sorted(sweep.points) and (table["FLOPs executed (%)"] > 1).all()
    # the saving in words right after accuracy, agreement and FLOPs; every column with a short label
    key = ["accuracy (%)", "agreement with full (%)", "FLOPs executed (%)", "latency saving"]
    assert list(summary.columns[:5]) == ["run", *key] and list(table.columns[:5]) == ["threshold", *key]
    columns = dashboard.calibration_columns()
    assert set(summary.columns) | set(table.columns) <= set(columns)
    assert columns["accuracy (%)"].format == "%.1f%%" and columns["latency saving"].kind == "text"


def test_threshold_grid_and_device_label():
    grid = calibration.threshold_grid()
    assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 21 and 0.35 in grid
    assert clock.device_label("cpu").startswith("CPU (")
