"""skipviz.views and skipviz.samples: computations and figures of the dashboard, checked against the engine."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import CheckpointError, GatePolicy, load_image, dashboard, figures, policies
from skipviz.evaluate import calibration
from skipviz.measure import clock
from skipviz.samples import sample_bytes, sample_names


@pytest.fixture(scope="module")
def cat_x(tiny_net):
    image, _ = load_image(sample_bytes(sample_names()[0]))
    return dashboard.preprocess(tiny_net, image)


def test_samples_load_offline_through_load_image():
    names = sample_names()
    assert len(names) >= 6
    for name in names:
        image, info = load_image(sample_bytes(name))
        assert image.mode == "RGB" and min(image.size) >= 8
        assert info.format in ("PNG", "JPEG", "GIF")
    gif = [n for n in names if "GIF" in n][0]
    assert load_image(sample_bytes(gif))[1].frames > 1  # an animated GIF: the first frame is used
    with pytest.raises(KeyError):
        sample_bytes("no such sample")


def _threshold_with_mixed_decisions(net, x) -> float:
    """A grid threshold at which some gated blocks fire and others do not (searched with the engine)."""
    for t in calibration.threshold_grid():
        ex = net.run(x, GatePolicy(t)).executed[0]
        gated = ex[net.gated_blocks]
        if gated.any() and not gated.all():
            return t
    pytest.skip("random gates give no mixed decisions for this input")


@torch.no_grad()
def test_inspect_matches_engine_and_tables(tiny_net, cat_x):
    t = _threshold_with_mixed_decisions(tiny_net, cat_x)
    policy = policies.make_policy(tiny_net, t)
    res = dashboard.inspect(tiny_net, cat_x, policy)
    expected = tiny_net.run(cat_x, GatePolicy(t))
    assert dashboard.decisions(res.trace) == ["fired" if e else "bypassed" for e in expected.executed[0].tolist()]
    assert torch.allclose(torch.tensor(res.trace.logits), expected.logits[0].float(), atol=1e-5)
    full_logits = tiny_net(cat_x)[0]
    assert np.allclose(res.probs_full, torch.softmax(full_logits, 0).numpy(), atol=1e-5)

    table = dashboard.block_table(res.trace)
    assert list(table["name"]) == tiny_net.block_names
    assert list(table["decision"]) == dashboard.decisions(res.trace)
    assert list(table["downsampling"]) == [b.downsample for b in tiny_net.blocks]
    scores = expected.scores[0].numpy()
    assert np.allclose(table["gate probability"].to_numpy(), scores, equal_nan=True)
    assert not [c for c in table.columns if "ms" in c]  # no time without a profile
    assert table["MFLOPs"].sum() * 1e6 == pytest.approx(sum(b.flops for b in res.trace.blocks))

    top = dashboard.top5_side_by_side(res, tiny_net.meta.classes)
    assert len(top) == 5 and top["skipped: probability"].is_monotonic_decreasing
    assert top["full: class"].iloc[0] == tiny_net.meta.classes[int(full_logits.argmax())]



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


def test_overrides_and_policy(tiny_net, cat_x):
    assert isinstance(policies.make_policy(tiny_net, 0.3), GatePolicy)
    ov = dashboard.overrides_from_choices({0: "skip", 1: "auto", 3: "skip", 4: "run"})
    assert ov == {0: "skip", 3: "skip", 4: "run"}
    res = dashboard.inspect(tiny_net, cat_x, policies.make_policy(tiny_net, 1.0, ov))
    d = dashboard.decisions(res.trace)
    assert d[0] == "bypassed" and d[3] == "bypassed" and d[4] == "fired"
    assert "forced" in res.trace.blocks[3].reason


def test_load_model_falls_back_with_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_DATA_DIR", str(tmp_path))
    lm = dashboard.load_model("cifar_resnet20.cifar10_gated")
    assert lm.warning and "missing" in lm.warning and "skipviz train" in lm.warning
    assert lm.net.meta.arch == "cifar_resnet20" and not lm.net.training
    assert lm.default_threshold == 0.5
    again = dashboard.load_model("cifar_resnet20.cifar10_gated")
    assert all(torch.equal(a, b) for a, b in zip(lm.net.state_dict().values(), again.net.state_dict().values()))


def test_uploaded_weights_round_trip_and_errors(tiny_net, cat_x, tmp_path):
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tiny_net.state_dict().items()})
    lm = dashboard.load_uploaded_weights("cifar_resnet20", data, "mine.safetensors")
    with torch.no_grad():
        assert torch.allclose(lm.net(cat_x), tiny_net(cat_x), atol=1e-6)
    assert lm.net.meta.weights_sha256 and lm.net.meta.weights_path == "mine.safetensors"
    with pytest.raises(CheckpointError):
        dashboard.load_uploaded_weights("cifar_resnet20", b"not a weights file at all", "bad.safetensors")
    with pytest.raises(CheckpointError, match="empty"):
        dashboard.load_uploaded_weights("cifar_resnet20", b"", "empty.pt")
    with pytest.raises(CheckpointError, match="expected"):
        dashboard.load_uploaded_weights("cifar_resnet20", b"abc", "weights.txt")
    with pytest.raises(CheckpointError):  # right format, wrong architecture
        dashboard.load_uploaded_weights("cifar_resnet32", data, "mine.safetensors")


def test_model_tables(tiny_net):
    card = dashboard.model_card_table(tiny_net)
    values = dict(zip(card["field"], card["value"]))
    assert values["FLOPs (full, one input)"] == f"{tiny_net.flop_table().full / 1e6:.2f} M"
    assert values["architecture"] == "cifar_resnet20"
    models = dashboard.models_table()
    assert "cifar_resnet20" in set(models["model"]) and "resnet18" in set(models["model"])


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


def test_threshold_grid_and_device_label():
    grid = calibration.threshold_grid()
    assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 21 and 0.35 in grid
    assert clock.device_label("cpu").startswith("CPU (")


def test_generated_images_are_seeded():
    a, b = calibration.generated_images(4, (32, 32), seed=3), calibration.generated_images(4, (32, 32), seed=3)
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    buf = io.BytesIO()
    Image.fromarray(a[0].permute(1, 2, 0).numpy()).save(buf, format="PNG")
    assert load_image(buf.getvalue())[0].size == (32, 32)


def test_damaged_default_weights_fall_back_with_a_warning_and_change_the_weights_state(tmp_path, monkeypatch):
    from skipviz import CIFAR_MODEL

    monkeypatch.setenv("SKIPVIZ_DATA_DIR", str(tmp_path))
    assert dashboard.weights_state(CIFAR_MODEL) == "missing" and dashboard.weights_state("cifar_resnet20") == ""
    name = "cifar_resnet20_cifar10_gated.safetensors"
    (tmp_path / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # a truncated safetensors header
    lm = dashboard.load_model(CIFAR_MODEL)
    assert lm.warning and "cannot be used" in lm.warning and lm.net.meta.arch == "cifar_resnet20"
    assert dashboard.weights_state(CIFAR_MODEL).startswith(str(tmp_path / name))


def test_block_map_names_blocks_without_a_score_for_what_they_are(tiny_net, cat_x):
    forced = dashboard.overrides_from_choices({i: "skip" for i in range(tiny_net.num_blocks)})
    res = dashboard.inspect(tiny_net, cat_x, policies.make_policy(tiny_net, 0.5, forced))
    names = [tr.name for tr in figures.block_map_figure(res.trace).data if tr.type == "bar"]
    assert names == ["no score (ungated or forced)"]


def test_percents_never_say_minus_zero():
    assert dashboard.percent(-0.0004) == "0.0%" and dashboard.percent(-0.0) == "0.0%"
    assert dashboard.percent(0.1234) == "12.3%" and dashboard.percent(-0.012) == "-1.2%"
    assert dashboard.percent_points(-0.0004) == "+0.0 pts" and dashboard.percent_points(-0.05) == "-5.0 pts"


def test_policies_in_words():
    from skipviz import FullPolicy, GatePolicy, PlanPolicy, policies

    assert dashboard.describe_policy(GatePolicy(0.3, {2: "skip", 5: "run"})) == "gates, threshold 0.30, 2 overrides"
    assert dashboard.describe_policy(PlanPolicy(0.2)) == "plan, threshold 0.20"
    assert dashboard.describe_policy({"name": "gates", "threshold": 0.5, "overrides": {"1": "skip"}}) == \
        "gates, threshold 0.50, 1 override"
    assert dashboard.describe_policy(FullPolicy()).startswith("full network")
    assert policies.describe_policy(policies.StaticMaskPolicy([1, 2])) == "static mask, 2 blocks skipped"


def test_overrides_refuse_blocks_without_a_bypass_and_flag_shape_changing_skips(tiny_net):
    from skipviz import DEFAULT_MODEL, create_model

    lite = create_model(DEFAULT_MODEL.partition(".")[0])
    fixed = next(i for i, b in enumerate(lite.blocks) if not b.bypassable)
    free = next(i for i, b in enumerate(lite.blocks) if b.bypassable)
    kept, refused = dashboard.refuse_unskippable(lite, {fixed: "skip", free: "skip", fixed + 100: "run"})
    assert kept == {free: "skip", fixed + 100: "run"} and list(refused) == [fixed]
    assert "no bypass" in refused[fixed] and dashboard.override_options(lite, fixed) == ["auto", "run"]
    assert dashboard.refuse_unskippable(lite, {fixed: "run"}) == ({fixed: "run"}, {})
    down = next(i for i, b in enumerate(tiny_net.blocks) if b.downsample)
    assert dashboard.shape_changing_skips(tiny_net, {down: "skip", 0: "skip", down + 1: "run"}) == [down]
    assert "shape" in dashboard.shape_change_warning(tiny_net, [down])


def test_shipped_weights_are_recognised_by_hash():
    from skipviz import CIFAR_MODEL, list_pretrained
    from skipviz.models.weights import sha256_file

    shipped = next(w for w in list_pretrained() if w.name == CIFAR_MODEL)
    if not shipped.available():
        pytest.skip("the shipped weights are not in data/")
    assert dashboard.shipped_weights_with_sha256(shipped.arch, sha256_file(shipped.path)) == CIFAR_MODEL
    assert dashboard.shipped_weights_with_sha256(shipped.arch, "0" * 64) is None
    assert dashboard.shipped_weights_with_sha256("cifar_resnet32", sha256_file(shipped.path)) is None
