"""skipviz.dashboard and skipviz.samples: one-input inspection, overrides and how an image is described,
checked against the engine; every name of the dashboard modules importable from skipviz.dashboard."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import GatePolicy, ImageInfo, dashboard, load_image, policies
from skipviz.evaluate import calibration
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


def test_overrides_and_policy(tiny_net, cat_x):
    assert isinstance(policies.make_policy(tiny_net, 0.3), GatePolicy)
    ov = dashboard.overrides_from_choices({0: "skip", 1: "auto", 3: "skip", 4: "run"})
    assert ov == {0: "skip", 3: "skip", 4: "run"}
    res = dashboard.inspect(tiny_net, cat_x, policies.make_policy(tiny_net, 1.0, ov))
    d = dashboard.decisions(res.trace)
    assert d[0] == "bypassed" and d[3] == "bypassed" and d[4] == "fired"
    assert "forced" in res.trace.blocks[3].reason


def test_generated_images_are_seeded():
    a, b = calibration.generated_images(4, (32, 32), seed=3), calibration.generated_images(4, (32, 32), seed=3)
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    buf = io.BytesIO()
    Image.fromarray(a[0].permute(1, 2, 0).numpy()).save(buf, format="PNG")
    assert load_image(buf.getvalue())[0].size == (32, 32)


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


def test_every_name_is_importable_from_skipviz_dashboard():
    from skipviz import dashboard_latency, dashboard_models, dashboard_tables

    assert all(hasattr(dashboard, n) for n in dashboard.__all__)
    for module in (dashboard_latency, dashboard_models, dashboard_tables):
        assert set(module.__all__) <= set(dashboard.__all__)
        assert all(getattr(dashboard, n) is getattr(module, n) for n in module.__all__)


def test_the_caption_gives_the_size_the_image_is_used_at():
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((30, 60, 3)) * 255).astype(np.uint8))  # 60 wide, 30 high as stored
    exif = photo.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", exif=exif)
    image, info = load_image(buf.getvalue())
    assert (info.width, info.height) == (60, 30) and image.size == (30, 60)  # turned upright
    caption = dashboard.image_caption("photo.jpg", info, image.size)
    assert caption.startswith("photo.jpg: 30x60 JPEG") and "rotated by its EXIF orientation (stored 60x30)" in caption
    plain, plain_info = load_image(sample_bytes(sample_names()[0]))
    assert dashboard.image_caption("cat", plain_info, plain.size) == \
        f"cat: {plain.size[0]}x{plain.size[1]} {plain_info.format}"
    gif = [n for n in sample_names() if "GIF" in n][0]
    frames, frames_info = load_image(sample_bytes(gif))
    assert dashboard.image_caption("g", frames_info, frames.size).endswith("frames (first used)")
    reduced = ImageInfo(sha256="", format="JPEG", width=4000, height=3000, mode="RGB", n_bytes=1, frames=1,
                        decoded_width=1000, decoded_height=750)
    assert dashboard.image_caption("big", reduced, (1000, 750)) == "big: 4000x3000 JPEG, decoded at 1000x750"


def test_the_verdict_names_both_predictions(tiny_net, cat_x):
    from dataclasses import replace

    res = dashboard.inspect(tiny_net, cat_x, policies.make_policy(tiny_net, 0.0))
    assert res.agrees and dashboard.prediction_verdict(res).startswith("Skipped and full network agree: **")
    other = (res.trace.predicted_index + 1) % tiny_net.meta.num_classes
    changed = replace(res, full_trace=replace(res.full_trace, predicted_index=other,
                                              predicted_label=tiny_net.meta.classes[other], confidence=0.25))
    words = dashboard.prediction_verdict(changed)
    assert words == (f"Skipping changed the prediction: **{res.trace.predicted_label}** "
                     f"{dashboard.percent(res.trace.confidence)} (skipped) vs **{tiny_net.meta.classes[other]}** "
                     "25.0% (full)")


def test_the_sessions_policy_is_named_with_its_overrides_in_comparisons():
    assert dashboard.compared_policy_label("gates", 0.5, {}) == "per-block gates (current threshold 0.50)"
    assert dashboard.compared_policy_label("plan", 0.2, {3: "skip", 4: "run"}).endswith(
        "(current threshold 0.20, 2 overrides in force)")
